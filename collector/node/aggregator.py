"""A node's aggregator: its ranks' streams in, one exact node frame per step out (docs/ray.md,
"One job of thousands of ranks").

It serves the same `Telemetry/Stream` as the collector, so an agent needs nothing but its
address. Once the `ranks` it expects have said hello, it opens one stream to the job's
collector with the node's hello (`wire.node.node_hello`), holds each step until every open rank
sent it (or a rank moved past it, or more than MAX_PENDING_STEPS wait, as the collector's
pipeline does), merges it (`merge.Merger`, into the node's runs of shards) and forwards one node
frame naming the ranks it merges.

No frame is acknowledged before the collector acknowledged it: each rank's frame is kept in
flight until the node frame that holds it is acknowledged (`seq`) and until that node frame is
durable (`durable`); a frame for a step already forwarded (late: its node frame went without
it) waits likewise for the last node frame sent, which the collector takes after that step's.
Each rank's frames are tied to its call, not to its rank number, so a call that replaced an
earlier one of the same rank (a restarted process numbers its frames from 1 again) is never
acknowledged for the earlier call's frames. The ack a rank gets is cumulative, up to the lowest
of its frames not yet so, and speaks for nothing below its call's first frame until the
collector confirmed one of the call's own: the frames before it went on earlier calls, which
the collector may never have taken. The aggregator keeps nothing itself: when its stream to the
collector breaks (or the collector refuses it) it ends every rank's stream (UNAVAILABLE) and
takes no further frame from them (nor from a call a newer one of its rank replaced), and the
agents reconnect and replay what their spools hold (what the collector had not made durable);
the collector's marks count what it had merged already as late, not twice.

The node's ranks are fixed by the hellos of its first `ranks` streams; a hello from another rank
is refused (FAILED_PRECONDITION), and so is one for a rank whose call is still open: a rank's slot
is its call's until that call ends (a second process cannot take its place, nor its acks). It
listens on loopback only: its agents are on its node.

Who may stream through it, and as whom it streams on. Upstream it proves itself as an agent does
(`agent.security.Security`: a bearer token, TLS, a client certificate; `cli/aggregator.py` reads
them from the agents' environment variables), so a collector run with `--tokens` or mutual TLS
takes its node streams. Its ranks present bearer tokens checked as the collector checks them
(`grpc_auth.TokenInterceptor`: UNAUTHENTICATED without a known token, PERMISSION_DENIED for a job
outside the token's prefix): those of its own tokens file (`tokens`), else its own upstream
token, so that a local process without the job's token can neither fix the node's job nor
forward frames under the aggregator's identity. With neither, any local process is accepted
(a node whose collector is open).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from thermoscope.agent.security import Security
from thermoscope.collector.ingest.call import STATUS
from thermoscope.collector.ingest.grpc_auth import TokenInterceptor, TokenTable
from thermoscope.collector.ingest.refusal import BadBytes
from thermoscope.collector.ingest.server import deserializer
from thermoscope.collector.merge import Merger, Target
from thermoscope.collector.state.pipeline import MAX_PENDING_STEPS
from thermoscope.science.stats import Sample, Table
from thermoscope.v1 import telemetry_pb2 as pb
from thermoscope.v1 import telemetry_pb2_grpc as pb_grpc
from thermoscope.wire import codec
from thermoscope.wire.contract import SERVICE, is_loopback, split_address
from thermoscope.wire.node import encode_node, node_hello

log = logging.getLogger("thermoscope.aggregator")

#: The oldest collector a node stream may go to: one that says its protocol version in its config
#: (a collector of an earlier release reads a node's hello as one rank's, its merged frames as that
#: rank's: wrong readings, silently). Below it the aggregator forwards nothing and says why.
NODE_PROTOCOL_VERSION = 1
OLDER_COLLECTOR = (
    "the collector is of an earlier release that does not read node streams (its config says no"
    " protocol version): nothing is forwarded to it; upgrade the collector, or let the ranks stream"
    " to it directly (no aggregator)"
)
#: Seconds a rank that half-closed waits for its last frames to be durable at the collector.
FLUSH_WAIT = 30.0
_UPSTREAM_OPTIONS = [
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.max_receive_message_length", 64 << 20),
]


@dataclass(eq=False)
class _Rank:
    """One rank's call: its replies, its tables and its frames not yet acknowledged or durable."""

    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)  # replies; None ends the call
    rank: int = -1
    table: Table | None = None
    hello: pb.Hello | None = None
    first_seq: int = 0  # its first frame's: its acks speak for nothing below (earlier calls' frames)
    last_seq: int = 0
    last_step: int = -1
    unacked: set[int] = field(default_factory=set)  # its seqs the collector has not acknowledged
    undurable: set[int] = field(default_factory=set)  # ... nor said are durable
    open: bool = True


class Aggregator:
    """The servicer of one node (see the module docstring); all its state lives on its event loop."""

    def __init__(
        self,
        collector: str,
        ranks: int,
        max_message_bytes: int = 64 << 20,
        *,
        security: Security | None = None,
        tokens: TokenTable | None = None,
    ) -> None:
        """`collector`: the job's collector "host:port"; `ranks`: how many ranks run on this node;
        `security`: how it proves itself to the collector (an agent's settings; None: plain, no
        token); `tokens`: the
        bearer tokens its ranks may present (None: its own upstream token, if it has one)."""
        self.collector = collector
        self.expected = ranks
        self.max_message_bytes = max_message_bytes
        self.security = security = security or Security()
        if tokens is None and security.token is not None:
            tokens = TokenTable([(security.token, "")])
        self.tokens = tokens
        self.rejected: Counter[str] = Counter()  # the ranks' calls refused unauthenticated
        self.sessions: dict[int, _Rank] = {}  # by rank: the open or last call of each
        self.pending: dict[int, dict[int, _Part]] = {}  # step -> rank -> its frame
        self.forwarded_step = -1
        self.node_seq = 0  # node frames sent, numbered 1, 2, 3... for this process
        self.in_flight: dict[int, list[tuple[_Rank, int]]] = {}  # node seq -> (call, seq) it settles
        self.config = pb.Config()  # the collector's last word, relayed to every rank
        self.frames_in = 0
        self.frames_out = 0
        self.frames_late = 0  # for a step already forwarded: not merged, settled with the last node frame
        self._upstream: asyncio.Queue | None = None  # node messages to send; None when not open
        self._upstream_task: asyncio.Task | None = None
        self._merger: Merger | None = None
        self._tables: dict[int, Table] = {}
        self._ranks: tuple[int, ...] = ()
        self._channel: grpc.aio.Channel | None = None
        self._metadata: tuple[tuple[str, str], ...] | None = None  # the upstream call's (a plaintext token)
        self._changed = asyncio.Event()  # acks arrived (a closing rank waits for its own)

    # -- the server ------------------------------------------------------------------------------

    async def start(self, listen: str) -> grpc.aio.Server:
        """Serve on `listen` (loopback only: ValueError otherwise); returns the started server."""
        host, _ = split_address(listen)
        if not is_loopback(host):
            raise ValueError(
                f"the aggregator listens on loopback only (its agents are on its node), not {listen}"
            )
        self._channel = self._upstream_channel()
        server = grpc.aio.server(
            options=[("grpc.max_receive_message_length", self.max_message_bytes)],
            interceptors=None if self.tokens is None else [TokenInterceptor(self.tokens, self.rejected)],
        )
        server.add_generic_rpc_handlers((self.handler(),))
        self.port = server.add_insecure_port(listen)
        await server.start()
        log.info(
            "aggregator: listening on %s for %d ranks, forwarding to %s",
            listen,
            self.expected,
            self.collector,
        )
        return server

    def _upstream_channel(self) -> grpc.aio.Channel:
        """The channel to the collector, with the aggregator's credentials (as `agent/link.py`
        makes an agent's: on a plaintext channel the token goes as the call's metadata)."""
        sec = self.security
        self._metadata = None if sec.tls or sec.token is None else (("authorization", f"Bearer {sec.token}"),)
        if not sec.tls:
            return grpc.aio.insecure_channel(self.collector, options=_UPSTREAM_OPTIONS)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=sec.root_cert, private_key=sec.client_key, certificate_chain=sec.client_cert
        )
        if sec.token is not None:
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.access_token_call_credentials(sec.token)
            )
        return grpc.aio.secure_channel(self.collector, credentials, options=_UPSTREAM_OPTIONS)

    async def close(self) -> None:
        if self._upstream_task is not None:
            self._upstream_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._upstream_task
        if self._channel is not None:
            await self._channel.close()

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Stream": grpc.stream_stream_rpc_method_handler(
                    self.Stream,
                    request_deserializer=deserializer(self.max_message_bytes),
                    response_serializer=pb.CollectorMessage.SerializeToString,
                )
            },
        )

    # -- a rank's call ---------------------------------------------------------------------------

    async def Stream(
        self, requests: AsyncIterator[pb.AgentMessage | BadBytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.CollectorMessage]:
        """One rank's call: a reader task takes its requests; this generator writes its replies
        (the config, acks as the collector acknowledges, relayed configs) in order."""
        session = _Rank()
        reader = asyncio.create_task(self._read(requests, session, context))
        try:
            while True:
                reply = await session.outbox.get()
                if reply is None or isinstance(reply, Exception):  # done, or the call broke
                    return
                if isinstance(reply, _Abort):
                    await context.abort(reply.code, reply.text)
                yield reply
        finally:
            reader.cancel()
            session.open = False
            self._merge_ready()

    async def _read(self, requests, session: _Rank, context: grpc.aio.ServicerContext) -> None:
        try:
            async for msg in requests:
                error = self._take(msg, session)
                if error is not None:
                    code, text = error
                    log.warning("aggregator: refused a message (%s)", text)
                    session.outbox.put_nowait(_Abort(code, text))
                    return
        except Exception as exc:  # the call broke: the handler ends
            session.outbox.put_nowait(exc)
            return
        session.open = False  # the rank half-closed: its steps merge, then its last ack
        self._merge_ready()
        upstream = self._upstream  # the node stream its frames went on: only its acks settle them
        if upstream is not None:
            if not any(s.open for s in self.sessions.values()):
                upstream.put_nowait(None)  # the node is done: the collector makes it durable, acks
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(FLUSH_WAIT):
                    while (session.unacked or session.undurable) and self._upstream is upstream:
                        self._changed.clear()
                        await self._changed.wait()
        session.outbox.put_nowait(self._ack(session))
        session.outbox.put_nowait(None)

    def _take(self, msg: pb.AgentMessage | BadBytes, session: _Rank) -> tuple[grpc.StatusCode, str] | None:
        """Handle one request; (status, why) when the call must end."""
        if isinstance(msg, BadBytes):  # undecodable, or a hello for a job outside its token's prefix
            return STATUS.get(msg.reason, grpc.StatusCode.INVALID_ARGUMENT), msg.message
        kind = msg.WhichOneof("body")
        if kind == "hello":
            if session.hello is not None:
                return grpc.StatusCode.FAILED_PRECONDITION, "a stream sends one hello, first"
            try:
                return self._hello(msg.hello, session)
            except codec.WireError as exc:
                return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        if kind == "frame":
            if session.hello is None:
                return grpc.StatusCode.FAILED_PRECONDITION, "frame on a stream that sent no hello"
            if self.sessions.get(session.rank) is not session:  # the node started over, or a newer call
                return grpc.StatusCode.UNAVAILABLE, "this call no longer belongs to the node: reconnect"
            try:
                sample = codec.decode(
                    msg.frame,
                    len(session.table.layers),
                    len(session.table.sites),
                    session.hello.histogram_bins,
                )
            except codec.WireError as exc:
                return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
            if msg.frame.seq <= session.last_seq:
                return (
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"frame seq {msg.frame.seq} after seq {session.last_seq}",
                )
            seq = msg.frame.seq
            session.first_seq = session.first_seq or seq
            session.last_seq = seq
            session.last_step = max(session.last_step, sample.step)
            self.frames_in += 1
            if sample.step <= self.forwarded_step:  # late: its node frame went without it
                self.frames_late += 1
                self._settle_late(session, seq)
                return None
            session.unacked.add(seq)
            session.undurable.add(seq)
            self.pending.setdefault(sample.step, {})[session.rank] = _Part(sample, session, seq)
            if self._upstream is None and len(self.pending) > MAX_PENDING_STEPS:
                self._open_upstream()  # a rank that never said hello holds the node back no longer
            self._merge_ready()
            return None
        return grpc.StatusCode.INVALID_ARGUMENT, "message carries neither hello nor frame"

    def _hello(self, hello: pb.Hello, session: _Rank) -> tuple[grpc.StatusCode, str] | None:
        layers, sites = codec.decode_hello(hello)
        if self.sessions and not any(s.open and s.hello is not None for s in self.sessions.values()):
            self._start_over()  # no rank of the last job is left (they died): the node starts over
        first = next((s.hello for s in self.sessions.values() if s.hello is not None), None)
        if first is not None:
            for name in ("job_id", "run_id", "world_size", "histogram_bins"):
                if getattr(hello, name) != getattr(first, name):
                    return (
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"{name} differs from this node's other ranks'",
                    )
        if self._ranks and hello.rank not in self._ranks:
            return (
                grpc.StatusCode.FAILED_PRECONDITION,
                f"rank {hello.rank} is not one of this node's {list(self._ranks)}",
            )
        held = self.sessions.get(hello.rank)
        if held is not None and held.open:
            return (
                grpc.StatusCode.FAILED_PRECONDITION,
                f"rank {hello.rank} streams on this node already (its call is open)",
            )
        table = Table.of_rank(layers, sites)
        if self._ranks and table != self._tables[hello.rank]:
            return (
                grpc.StatusCode.FAILED_PRECONDITION,
                f"rank {hello.rank}'s tables differ from its first hello's",
            )
        session.rank, session.table, session.hello = hello.rank, table, hello
        self.sessions[hello.rank] = session
        session.outbox.put_nowait(pb.CollectorMessage(config=self.config))
        if not self._ranks and len(self.sessions) >= self.expected:
            self._open_upstream()
        return None

    # -- merging ---------------------------------------------------------------------------------

    def _merge_ready(self) -> None:
        """Forward, in step order, each pending step no open rank still owes (or beyond the bound)."""
        if self._upstream is None:
            return
        open_ranks = [s for s in self.sessions.values() if s.open and s.hello is not None]
        horizon = min((s.last_step for s in open_ranks), default=math.inf)
        for step in sorted(self.pending):
            parts = self.pending[step]
            complete = all(s.rank in parts for s in open_ranks) or step < horizon
            if not (complete or len(self.pending) > MAX_PENDING_STEPS):
                break
            del self.pending[step]
            self._forward(step, parts)
            self.forwarded_step = max(self.forwarded_step, step)

    def _forward(self, step: int, parts: dict[int, _Part]) -> None:
        merged, energy_ranks = self._merger.merge(step, {r: p.sample for r, p in parts.items()}, self._tables)
        self.node_seq += 1
        self.in_flight[self.node_seq] = [(p.session, p.seq) for p in parts.values()]
        self._upstream.put_nowait(encode_node(merged, self.node_seq, energy_ranks, sorted(parts)))
        self.frames_out += 1

    # -- the stream to the collector ---------------------------------------------------------------

    def _open_upstream(self) -> None:
        self._ranks = tuple(sorted(self.sessions))
        self._tables = {r: self.sessions[r].table for r in self._ranks}
        table = Table.of_node(self._tables)
        self._merger = Merger(Target.runs(table))
        first = self.sessions[self._ranks[0]].hello
        hello = node_hello(
            job_id=first.job_id,
            run_id=first.run_id,
            ranks=list(self._ranks),
            world_size=first.world_size,
            host=first.host,
            agent_version=first.agent_version,
            node=first.node,
            every=first.every,
            table=table,
            bins=first.histogram_bins,
        )
        self._upstream = asyncio.Queue()
        self._upstream.put_nowait(hello)
        self._upstream_task = asyncio.create_task(self._run_upstream(self._upstream))
        self._merge_ready()

    async def _run_upstream(self, outbox: asyncio.Queue) -> None:
        answered = asyncio.Event()

        async def requests():
            yield await outbox.get()  # the node's hello; its frames only once the collector read it
            await answered.wait()
            while (msg := await outbox.get()) is not None:
                yield msg

        call = pb_grpc.TelemetryStub(self._channel).Stream(requests(), metadata=self._metadata)
        why = "the collector ended the node's stream"
        try:
            async for reply in call:
                if self._upstream is not outbox:  # a node stream the aggregator started over from
                    break
                if reply.HasField("ack"):
                    ack = reply.ack
                    self._acked(ack.seq, ack.durable if ack.HasField("durable") else ack.seq)
                elif reply.HasField("config"):
                    if not answered.is_set() and reply.config.protocol_version < NODE_PROTOCOL_VERSION:
                        why = OLDER_COLLECTOR
                        call.cancel()
                        break
                    answered.set()
                    self.config = reply.config
                    for s in self.sessions.values():
                        if s.open:
                            s.outbox.put_nowait(pb.CollectorMessage(config=reply.config))
        except grpc.aio.AioRpcError as exc:
            why = f"{exc.code().name}: {exc.details()}"
        if self._upstream is outbox:
            self._lost_upstream(why)

    def _settle_late(self, session: _Rank, seq: int) -> None:
        """A frame for a step already forwarded is not merged: it is settled as the collector
        settles a late frame, but only once the collector took its step, that is with the last
        node frame sent (it follows the step's); at once only if that one is durable already."""
        last = self.in_flight.get(self.node_seq)
        if last is None:  # every node frame sent is durable (the step's among them)
            session.outbox.put_nowait(self._ack(session))
            return
        session.unacked.add(seq)
        session.undurable.add(seq)
        last.append((session, seq))

    def _acked(self, seq: int, durable: int) -> None:
        """The collector acknowledged node frames up to `seq`, durable up to `durable`: tell
        each call how far its own frames are (a node frame counts as durable only once
        acknowledged, and the frames it holds settle only the calls that sent them)."""
        touched = set()
        for node_seq in [n for n in self.in_flight if n <= seq]:
            for s, rank_seq in self.in_flight[node_seq]:
                s.unacked.discard(rank_seq)
                if node_seq <= durable:
                    s.undurable.discard(rank_seq)
                touched.add(s)
            if node_seq <= durable:
                del self.in_flight[node_seq]
        for s in touched:
            if s.open:
                s.outbox.put_nowait(self._ack(s))
        self._changed.set()

    @staticmethod
    def _ack(s: _Rank) -> pb.CollectorMessage:
        """The call's cumulative ack; 0 until the collector confirmed one of the call's own frames
        (an ack is cumulative, and the frames below the call's first are not the call's)."""
        seq = min(s.unacked) - 1 if s.unacked else s.last_seq
        durable = min(min(s.undurable) - 1 if s.undurable else s.last_seq, seq)
        return pb.CollectorMessage(
            ack=pb.Ack(seq=seq if seq >= s.first_seq else 0, durable=durable if durable >= s.first_seq else 0)
        )

    def _start_over(self) -> None:
        """Forget the node's ranks and end its stream (half-closed: the collector makes what it
        took durable); the next hellos make a new node."""
        if self._upstream is not None:
            self._upstream.put_nowait(None)
        self._reset()

    def _lost_upstream(self, why: str) -> None:
        """The node's stream ended: end every rank's call (they replay from their spools) and
        start over, keeping only the node frames' numbering."""
        log.warning("aggregator: the stream to %s ended (%s); ending the ranks' streams", self.collector, why)
        for s in self.sessions.values():
            if s.open:
                s.outbox.put_nowait(
                    _Abort(grpc.StatusCode.UNAVAILABLE, f"the collector's stream ended: {why}")
                )
        self._reset()

    def _reset(self) -> None:
        """No node: no ranks, nothing pending or in flight; only the node frames' numbering stays."""
        self.sessions.clear()
        self.pending.clear()
        self.in_flight.clear()
        self.forwarded_step = -1  # the replays to come merge anew; the collector counts its own late
        self._upstream = None
        self._ranks = ()
        self._changed.set()


@dataclass(frozen=True)
class _Part:
    """One rank's frame of a pending step: its sample, the call that sent it and its seq there."""

    sample: Sample
    session: _Rank
    seq: int


@dataclass(frozen=True)
class _Abort:
    """End a rank's call with this status (its handler aborts the call)."""

    code: grpc.StatusCode
    text: str
