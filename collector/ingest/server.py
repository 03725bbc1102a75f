"""The gRPC side of the collector: one `Telemetry.Stream` per agent, validated frame by frame.

A message that breaks the contract ends *its* stream with a gRPC status saying what was
wrong (the agent reconnects), is counted in `thermoscope_frames_rejected_total{reason}`,
and changes no state; every other stream carries on. Size and decoding are checked in the
request deserializer, before protobuf parses anything, so an oversized or garbled message
costs only its bytes.

The collector also decides which jobs stream at all (`Telemetry.admit`, admission.py:
attach/detach): a change reaches every open stream of the job at once as a `Config{paused}`,
and a new stream gets the job's state in the `Config` that answers its hello.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable

import grpc
from google.protobuf.message import DecodeError

from thermoscope.science.derive import Reading
from thermoscope.science.stats import Table
from thermoscope.v1 import telemetry_pb2 as pb
from thermoscope.wire import codec
from thermoscope.wire.contract import SERVICE
from thermoscope.wire.node import decode_node

from ..settings import DEFAULTS, CollectorSettings
from ..state.checkpoint import Checkpointer
from ..state.job import Job
from ..state.runs import Runs
from ..state.store import EventStore
from .admission import Admission
from .call import END, PUSH, READ_AHEAD, SEQ_AHEAD, Bucket, ReadFailed, Refused, Session
from .grpc_auth import bearer
from .intake import Intake
from .nonfinite import NonFinite
from .refusal import BadBytes

log = logging.getLogger("thermoscope.collector")


def deserializer(max_bytes: int):
    """Request deserializer that refuses oversized or undecodable messages without raising."""

    def decode(data: bytes) -> pb.AgentMessage | BadBytes:
        if len(data) > max_bytes:
            return BadBytes("oversized", f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
        try:
            return pb.AgentMessage.FromString(data)
        except DecodeError as exc:
            return BadBytes("undecodable", f"message is not a thermoscope.v1.AgentMessage: {exc}")

    return decode


class Telemetry:
    """The servicer: hello, then frames; acks the accepted frames, cumulatively (with a store, also
    saying how far the stream's frames are durable: `checkpoint.Checkpointer`); pushes admission
    changes. What a hello joins is `Intake`'s (intake.py), which jobs stream `Admission`'s
    (admission.py), the unusable values counted `NonFinite`'s (nonfinite.py): this class handles
    the calls.

    All its state lives on the server's event loop; other threads go through
    `Collector.attach` / `detach` / `snapshot`, which hop onto the loop.
    """

    def __init__(
        self,
        jobs: dict[str, Job],
        settings: CollectorSettings = DEFAULTS,
        *,
        store: EventStore | None = None,
        active: bool = True,
        on_reading: Callable[[str, Reading], None] | None = None,
    ) -> None:
        """`settings`: the collector's; the servicer reads the interval it asks agents for
        (`every`), the bounds on input (`limits`) and, for each job it opens, the window and
        `stale_after` (seconds of silence after which an open stream's rank is stale);
        `active`: whether jobs stream by default (False: every job paused until attached);
        `on_reading`: called with (job_id, reading) at each merged step, on the event loop (keep
        it short)."""
        self.jobs = jobs  # job id -> its current run: what /metrics and snapshots show
        self.store = store
        self.settings = settings
        self.limits = settings.limits
        self.admission = Admission(active, store)  # attach/detach
        self.runs = Runs(jobs, self.limits, durable=store is not None)  # every run held
        self.checkpointer = Checkpointer(self.runs.held, store)  # makes the runs durable in `store`
        self.nonfinite = NonFinite()  # unusable values received, by (job, what)
        self.intake = Intake(
            settings,
            self.runs,
            self.checkpointer,
            self.admission,
            self.nonfinite,
            store=store,
            on_reading=on_reading,
        )
        self.rejected: Counter[str] = Counter()
        self._sessions: dict[str, set[Session]] = {}  # by job: calls that sent a valid hello
        self.callers: Counter[str] = Counter()  # open calls by peer (`reaper.py` spares their connections)
        self._called: set[str] = set()  # peers that opened a call since `peers_calling` was last asked
        self.draining = False  # the collector is shutting down: see `drain`

    # -- graceful shutdown ------------------------------------------------------------------------

    def drain(self) -> None:
        """The collector is shutting down: refuse new streams and end every open one.

        Each open call handles the requests it already read, writes a last `Ack` and ends
        with OK, so its agent reconnects (to this collector's successor) and nothing counts
        as lost: a stream that ends while draining, even cut by the server's grace period,
        counts as ended cleanly, not as a lost rank. Call on the event loop's thread."""
        self.draining = True
        for sessions in list(self._sessions.values()):
            for session in list(sessions):
                session.inbox.put(END)

    # -- durability -------------------------------------------------------------------------------

    def _ack(self, session: Session, seq: int) -> pb.CollectorMessage:
        if self.store is None:  # nothing persists: `durable` absent means "as far as `seq`"
            return pb.CollectorMessage(ack=pb.Ack(seq=seq))
        return pb.CollectorMessage(ack=pb.Ack(seq=seq, durable=session.job.durable(session.stream)))

    @property
    def open_streams(self) -> int:
        """Calls that sent a valid hello and have not ended."""
        return sum(len(sessions) for sessions in self._sessions.values())

    # -- admission --------------------------------------------------------------------------------

    def active(self, job_id: str) -> bool:
        """Whether the job's agents should stream (not paused)."""
        return self.admission.active(job_id)

    def admit(self, job_id: str | None, active: bool) -> None:
        """attach (`active`) or detach one job, or every job (None: set the default, drop the
        per-job choices). Every open stream of a job whose state changes is told at once.
        Call on the event loop's thread."""
        now = time.monotonic()
        for j in self.admission.set(job_id, active, set(self.jobs) | set(self._sessions)):
            for run in self.runs.of(j):
                run.set_paused(not self.active(j), now)
            for session in self._sessions.get(j, ()):
                session.push()
        log.info("%s %s", "attached" if active else "detached", f"job {job_id}" if job_id else "every job")

    def _config(self, job_id: str) -> pb.CollectorMessage:
        return pb.CollectorMessage(
            config=pb.Config(
                every=self.settings.every,
                paused=not self.active(job_id),
                max_frame_rate=self.limits.max_frame_rate,
                protocol_version=codec.PROTOCOL_VERSION,
            )
        )

    # -- the call ---------------------------------------------------------------------------------

    async def Stream(
        self, requests: AsyncIterator[pb.AgentMessage | BadBytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.CollectorMessage]:
        """One agent's call: a reader task feeds the session's `Inbox`; this generator is its only writer.

        The replies must follow the requests (acks) and also admission changes, which happen
        while the agent sends nothing (a paused agent is silent). So a task reads the requests
        into the session's inbox, `Telemetry.admit` puts a `PUSH` marker in the same inbox,
        and this generator, the call's one writer, takes both in order. Why not
        `context.write` from `admit`: grpc.aio allows "only one write operation
        simultaneously" per call, and the runtime writes whatever this generator yields, so
        a second writer would race the acks. One writer keeps the replies ordered, and keeps
        validation, `abort` and the final status in the handler's own task. The reader
        holds at most `READ_AHEAD` requests unhandled, so gRPC's flow control still paces
        the agent.

        Acks are cumulative (`Ack.seq`: every frame up to it is accepted), so the handler
        answers the frames it takes together with one ack, the last one's. Before it writes
        it, it lets the event loop run one turn (the other calls' reads and acks), taking
        the frames that arrived meanwhile, and again while turns bring frames (at most
        `READ_AHEAD` turns); the first turn that brings none ends the batch. A busy collector
        thus writes fewer acks, and those of many calls in the same turn, which gRPC's
        transport sends together: each write is a round of gRPC's machinery (a completion, a
        wakeup of the loop, a `sendmsg`; at `loadgen --rate 0`, a third of the `sendmsg` and
        ~40 % of the futex calls went with it, and ~15-25 % of the collector's CPU per frame).
        An idle one acknowledges after one turn. A frame refused in a batch first has the
        frames accepted before it acknowledged, then ends the call.

        How the call ended decides whether the rank is stale: a client cancel or a broken
        connection cancels this task (the rank is lost); a half-close ends the requests (the
        rank finished). grpc.aio shows a cancel that races the reader as an end of requests
        too, so on that end a last `Ack` (the highest accepted seq: a no-op for the agent) is
        written first: if the agent is gone the write fails, this generator is not resumed,
        and the end counts as abnormal; only a rank whose agent read it ended cleanly.
        """
        session = Session()
        inbox = session.inbox
        context.add_done_callback(lambda _: self._end(session))
        reader = asyncio.create_task(self._read(requests, session))
        peer = context.peer()
        self.callers[peer] += 1
        self._called.add(peer)
        try:
            while True:
                item = await inbox.get()
                if item is PUSH:
                    session.pushing = False
                    if session.stream is not None:
                        yield self._config(session.stream.job_id)
                elif item is END:
                    if session.stream is not None:
                        await self.checkpointer.soon()  # the agent may be leaving: its frames go durable
                        yield self._ack(session, session.stream.last_seq)
                    session.clean = True
                    return
                elif isinstance(item, ReadFailed):
                    raise item.error
                else:
                    accepted = 0  # the last frame accepted and not acknowledged yet (0: none)
                    turns = 0  # turns of the event loop this batch let pass
                    while item is not None:
                        try:
                            reply = self._handle(item, session, context)
                        except Refused as refused:
                            if accepted:
                                yield self._ack(session, accepted)
                            await self._reject(context, refused)
                        if reply is None:  # a frame, accepted
                            accepted = session.stream.last_seq
                        else:
                            if accepted:
                                yield self._ack(session, accepted)
                                accepted = 0
                            yield reply
                        item = inbox.next_request()
                        if item is None and accepted and turns < READ_AHEAD:
                            turns += 1
                            await asyncio.sleep(0)  # one turn: see "Acks" above
                            item = inbox.next_request()
                            if item is None:
                                turns = READ_AHEAD  # that turn brought nothing: acknowledge now
                    if accepted:
                        yield self._ack(session, accepted)
        finally:
            reader.cancel()
            self._end(session)
            self.callers[peer] -= 1
            if not self.callers[peer]:
                del self.callers[peer]

    def peers_calling(self) -> set[str]:
        """The peers with a call open now or opened since the last time this was asked (the
        reaper's look): a client of many short calls, each refused at once, is a caller, not a
        PING flood."""
        seen, self._called = self._called | set(self.callers), set()
        return seen

    async def _read(self, requests: AsyncIterator[pb.AgentMessage | BadBytes], session: Session) -> None:
        inbox = session.inbox
        try:
            async for msg in requests:
                inbox.put(msg)
                await inbox.room()
        except Exception as exc:  # handed to the handler, which raises it
            inbox.put(ReadFailed(exc))
        else:
            inbox.put(END)

    def _handle(
        self, msg: pb.AgentMessage | BadBytes, session: Session, context: grpc.aio.ServicerContext
    ) -> pb.CollectorMessage | None:
        """Take one request: the reply to a hello, None for an accepted frame (the caller
        acknowledges it), or `Refused`."""
        if isinstance(msg, BadBytes):
            raise Refused(msg.reason, msg.message)
        stream = session.stream
        kind = msg.WhichOneof("body")
        if kind == "frame":
            self._frame(msg.frame, session)
            return None
        if kind == "hello":
            if stream is not None:
                raise Refused("duplicate_hello", "a stream sends one hello, first")
            if self.draining:
                raise Refused("", "the collector is shutting down", grpc.StatusCode.UNAVAILABLE)
            try:
                session.job, stream = self.intake.open(msg.hello, _tenant(context))
            except codec.WireError as exc:
                raise Refused(exc.reason, str(exc)) from None
            session.stream = stream
            session.bucket = Bucket(self.limits.max_frame_rate)
            self._sessions.setdefault(stream.job_id, set()).add(session)
            return self._config(stream.job_id)
        raise Refused("empty", "message carries neither hello nor frame")

    def _frame(self, frame: pb.Frame, session: Session) -> None:
        """Validate and apply one frame of the session's stream (`Refused` otherwise)."""
        stream = session.stream
        if stream is None:
            raise Refused("unknown_stream", "frame on a stream that sent no hello")
        if not session.bucket.take():
            raise Refused(
                "rate_limited", f"more than {self.limits.max_frame_rate:g} frames per second on this stream"
            )
        nonfinite: dict[str, int] = {}
        energy_ranks, ranks = None, ()
        try:
            if stream.ranks:  # a node aggregator's frame
                table = Table(stream.layers, stream.spans, stream.sites)
                sample, energy_ranks, ranks = decode_node(frame, stream.ranks, table, stream.bins, nonfinite)
            else:
                sample = codec.decode(frame, len(stream.layers), len(stream.sites), stream.bins, nonfinite)
        except codec.WireError as exc:
            raise Refused(exc.reason, str(exc)) from None
        if frame.seq <= stream.last_seq:
            raise Refused("sequence", f"frame seq {frame.seq} after seq {stream.last_seq}")
        if stream.last_seq and frame.seq > stream.last_seq + SEQ_AHEAD:  # (a stream's first: any)
            raise Refused(
                "seq_jump", f"frame seq {frame.seq} leaps from seq {stream.last_seq} (at most {SEQ_AHEAD})"
            )
        last_seq, stream.last_seq = stream.last_seq, frame.seq
        job = session.job
        try:
            job.accept(stream, sample, energy_ranks, ranks, stamp=frame.wall_time)
        except codec.WireError as exc:  # a step beyond the bound, or tables the job's ranks disagree with
            stream.last_seq = last_seq
            raise Refused(exc.reason, str(exc)) from None
        if nonfinite:
            self.nonfinite.count(stream, frame.step, nonfinite)
        if self.jobs.get(stream.job_id) is not job:
            self.nonfinite.forget(self.runs.follow(job))

    def _end(self, session: Session) -> None:
        """The call is over (called from the handler and from the call's done callback)."""
        if session.ended:
            return
        session.ended = True
        stream = session.stream
        if stream is None:
            return
        sessions = self._sessions.get(stream.job_id)
        if sessions is not None:
            sessions.discard(session)
            if not sessions:
                del self._sessions[stream.job_id]
        clean = session.clean or self.draining
        session.job.close(stream, clean=clean)
        self.nonfinite.forget(self.runs.forget_ended(stream.job_id))
        if not clean:
            log.warning(
                "agent lost: job %s rank %d on %s (its stream ended abnormally)",
                stream.job_id,
                stream.rank,
                stream.host,
            )

    async def _reject(self, context: grpc.aio.ServicerContext, refused: Refused) -> None:
        """End the call with the refusal's status (raises); count and log it if it has a reason."""
        if refused.reason:
            self.rejected[refused.reason] += 1
            log.warning("rejected a message (%s): %s", refused.reason, refused.message)
        # the error it was made from holds, through its traceback, what was refused (a node
        # hello's ranks): let go of it now, not when gRPC lets go of the call's end
        refused.__context__ = None
        await context.abort(refused.code, refused.message)

    def handler(self, max_message_bytes: int) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Stream": grpc.stream_stream_rpc_method_handler(
                    self.Stream,
                    request_deserializer=deserializer(max_message_bytes),
                    response_serializer=pb.CollectorMessage.SerializeToString,
                )
            },
        )


def _tenant(context: grpc.aio.ServicerContext) -> str:
    """Who opened a call, for quotas: a digest of its bearer token, else its client certificate's
    subject (mutual TLS), else "" (anonymous: only the collector's own bounds apply).

    The token is the one `bearer` extracts, as the token interceptor does, not the header's raw
    value: "Bearer T", "bearer  T" and "BEARER T" are one token and one tenant, so no spelling of
    it holds more runs than its quota."""
    token = bearer(context.invocation_metadata())
    if token is not None:
        return "token:" + hashlib.sha256(token.encode()).hexdigest()[:16]
    names = context.auth_context().get("x509_common_name")
    return "cert:" + names[0].decode(errors="replace") if names else ""
