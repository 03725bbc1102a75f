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
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import grpc
from google.protobuf.message import DecodeError

from thermoscope.science.derive import Reading
from thermoscope.v1 import telemetry_pb2 as pb
from thermoscope.wire import codec
from thermoscope.wire.contract import SERVICE

from .. import aggregate
from ..settings import DEFAULTS, CollectorSettings
from ..state.checkpoint import Checkpointer
from ..state.job import Job
from ..state.runs import Runs
from ..state.store import EventStore
from ..state.stream import Stream
from .admission import Admission
from .intake import Intake
from .nonfinite import NonFinite
from .refusal import BadBytes

log = logging.getLogger("thermoscope.collector")


_STATUS = {
    "unknown_stream": grpc.StatusCode.FAILED_PRECONDITION,
    "forbidden_job": grpc.StatusCode.PERMISSION_DENIED,  # a token bound to other jobs (grpc_auth.py)
    "duplicate_hello": grpc.StatusCode.FAILED_PRECONDITION,
    "protocol_version": grpc.StatusCode.FAILED_PRECONDITION,
    "edges_mismatch": grpc.StatusCode.FAILED_PRECONDITION,
    "state_unreadable": grpc.StatusCode.FAILED_PRECONDITION,  # its run's stored state (checkpoint.py)
    "oversized": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "too_many_jobs": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "too_many_layers": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "too_many_ranks": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "rate_limited": grpc.StatusCode.RESOURCE_EXHAUSTED,
}


#: Requests a stream reads ahead of the ones it has handled (then gRPC's flow control holds the agent).
READ_AHEAD = 8


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


class _Bucket:
    """Token bucket: `rate` tokens per second, holding at most one second's worth (at least 1)."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.capacity = max(rate, 1.0)
        self.tokens = self.capacity
        self.stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


@dataclass(frozen=True)
class _ReadFailed:
    """Reading the requests failed (the server is stopping): the handler re-raises it."""

    error: Exception


_END = object()  # the agent half-closed its requests
_PUSH = object()  # the job's admission changed: tell the agent


class _Inbox:
    """A call's requests and markers in arrival order, for its one handler.

    The reader waits (`room`) while more than `READ_AHEAD` requests are unhandled, so gRPC's
    flow control still paces the agent; markers always go in. The handler takes one item
    (`get`), then every request right behind it (`next_request`): what it reads together, it
    acknowledges together. (A deque and two futures: `asyncio.Queue` and a semaphore cost
    several Python calls per request, and cannot show the next item without taking it.)
    """

    def __init__(self) -> None:
        self.items: deque = deque()
        self.unhandled = 0  # requests put and not taken
        self._taker: asyncio.Future | None = None  # the handler, waiting for an item
        self._putter: asyncio.Future | None = None  # the reader, waiting for room

    def put(self, item: object) -> None:
        """A marker, or a request (then `room` before the next one)."""
        self.items.append(item)
        if item is not _PUSH and item is not _END and not isinstance(item, _ReadFailed):
            self.unhandled += 1
        if self._taker is not None:
            self._taker.done() or self._taker.set_result(None)
            self._taker = None

    async def room(self) -> None:
        while self.unhandled > READ_AHEAD:
            self._putter = asyncio.get_running_loop().create_future()
            await self._putter

    async def get(self) -> object:
        while not self.items:
            self._taker = asyncio.get_running_loop().create_future()
            await self._taker
        return self._take()

    def next_request(self) -> pb.AgentMessage | BadBytes | None:
        """The next item if it is a request (taken), else None (left in place)."""
        items = self.items
        if not items or items[0] is _PUSH or items[0] is _END or isinstance(items[0], _ReadFailed):
            return None
        return self._take()

    def _take(self) -> object:
        item = self.items.popleft()
        if item is not _PUSH and item is not _END and not isinstance(item, _ReadFailed):
            self.unhandled -= 1
            if self._putter is not None:
                self._putter.done() or self._putter.set_result(None)
                self._putter = None
        return item


class _Refused(Exception):
    """A request the call refuses: the handler acknowledges what it accepted before, then ends
    the call with the status (`reason`: counted as a rejection; "": not counted, e.g. draining)."""

    def __init__(self, reason: str, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message
        self.code = code or _STATUS.get(reason, grpc.StatusCode.INVALID_ARGUMENT)


@dataclass(eq=False)
class _Session:
    """One call: what its reader task, its handler and admission changes share."""

    inbox: _Inbox = field(default_factory=_Inbox)  # requests, _PUSH, then _END
    stream: Stream | None = None  # after a valid hello
    job: Job | None = None  # the run its hello joined
    bucket: _Bucket | None = None  # frames it may send (Limits.max_frame_rate), after the hello
    pushing: bool = False  # a _PUSH is queued
    clean: bool = False  # the agent half-closed, and our last reply reached it
    ended: bool = False

    def push(self) -> None:
        if not self.pushing:
            self.pushing = True
            self.inbox.put(_PUSH)


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
        self._sessions: dict[str, set[_Session]] = {}  # by job: calls that sent a valid hello
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
                session.inbox.put(_END)

    # -- durability -------------------------------------------------------------------------------

    def _ack(self, session: _Session, seq: int) -> pb.CollectorMessage:
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
            )
        )

    # -- the call ---------------------------------------------------------------------------------

    async def Stream(
        self, requests: AsyncIterator[pb.AgentMessage | BadBytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.CollectorMessage]:
        """One agent's call: a reader task feeds the session's `_Inbox`; this generator is its only writer.

        The replies must follow the requests (acks) and also admission changes, which happen
        while the agent sends nothing (a paused agent is silent). So a task reads the requests
        into the session's inbox, `Telemetry.admit` puts a `_PUSH` marker in the same inbox,
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
        session = _Session()
        inbox = session.inbox
        context.add_done_callback(lambda _: self._end(session))
        reader = asyncio.create_task(self._read(requests, session))
        try:
            while True:
                item = await inbox.get()
                if item is _PUSH:
                    session.pushing = False
                    if session.stream is not None:
                        yield self._config(session.stream.job_id)
                elif item is _END:
                    if session.stream is not None:
                        await self.checkpointer.soon()  # the agent may be leaving: its frames go durable
                        yield self._ack(session, session.stream.last_seq)
                    session.clean = True
                    return
                elif isinstance(item, _ReadFailed):
                    raise item.error
                else:
                    accepted = 0  # the last frame accepted and not acknowledged yet (0: none)
                    turns = 0  # turns of the event loop this batch let pass
                    while item is not None:
                        try:
                            reply = self._handle(item, session, context)
                        except _Refused as refused:
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

    async def _read(self, requests: AsyncIterator[pb.AgentMessage | BadBytes], session: _Session) -> None:
        inbox = session.inbox
        try:
            async for msg in requests:
                inbox.put(msg)
                await inbox.room()
        except Exception as exc:  # handed to the handler, which raises it
            inbox.put(_ReadFailed(exc))
        else:
            inbox.put(_END)

    def _handle(
        self, msg: pb.AgentMessage | BadBytes, session: _Session, context: grpc.aio.ServicerContext
    ) -> pb.CollectorMessage | None:
        """Take one request: the reply to a hello, None for an accepted frame (the caller
        acknowledges it), or `_Refused`."""
        if isinstance(msg, BadBytes):
            raise _Refused(msg.reason, msg.message)
        stream = session.stream
        kind = msg.WhichOneof("body")
        if kind == "frame":
            self._frame(msg.frame, session)
            return None
        if kind == "hello":
            if stream is not None:
                raise _Refused("duplicate_hello", "a stream sends one hello, first")
            if self.draining:
                raise _Refused("", "the collector is shutting down", grpc.StatusCode.UNAVAILABLE)
            try:
                session.job, stream = self.intake.open(msg.hello, _tenant(context))
            except codec.WireError as exc:
                raise _Refused(exc.reason, str(exc)) from None
            session.stream = stream
            session.bucket = _Bucket(self.limits.max_frame_rate)
            self._sessions.setdefault(stream.job_id, set()).add(session)
            return self._config(stream.job_id)
        raise _Refused("empty", "message carries neither hello nor frame")

    def _frame(self, frame: pb.Frame, session: _Session) -> None:
        """Validate and apply one frame of the session's stream (`_Refused` otherwise)."""
        stream = session.stream
        if stream is None:
            raise _Refused("unknown_stream", "frame on a stream that sent no hello")
        if not session.bucket.take():
            raise _Refused(
                "rate_limited", f"more than {self.limits.max_frame_rate:g} frames per second on this stream"
            )
        nonfinite: dict[str, int] = {}
        energy_ranks, ranks = None, ()
        try:
            if stream.ranks:  # a node aggregator's frame
                table = aggregate.Table(stream.layers, stream.spans, stream.sites)
                sample, energy_ranks, ranks = aggregate.decode_node(
                    frame, stream.ranks, table, stream.bins, nonfinite
                )
            else:
                sample = codec.decode(frame, len(stream.layers), len(stream.sites), stream.bins, nonfinite)
        except codec.WireError as exc:
            raise _Refused(exc.reason, str(exc)) from None
        if frame.seq <= stream.last_seq:
            raise _Refused("sequence", f"frame seq {frame.seq} after seq {stream.last_seq}")
        stream.last_seq = frame.seq
        job = session.job
        try:
            job.accept(stream, sample, energy_ranks, ranks)
        except codec.WireError as exc:  # its tables no longer agree with what the job's ranks bound
            raise _Refused(exc.reason, str(exc)) from None
        if nonfinite:
            self.nonfinite.count(stream, frame.step, nonfinite)
        if self.jobs.get(stream.job_id) is not job:
            self.nonfinite.forget(self.runs.follow(job))

    def _end(self, session: _Session) -> None:
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

    async def _reject(self, context: grpc.aio.ServicerContext, refused: _Refused) -> None:
        """End the call with the refusal's status (raises); count and log it if it has a reason."""
        if refused.reason:
            self.rejected[refused.reason] += 1
            log.warning("rejected a message (%s): %s", refused.reason, refused.message)
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
    subject (mutual TLS), else "" (anonymous: only the collector's own bounds apply)."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return "token:" + hashlib.sha256(value.encode()).hexdigest()[:16]
    names = context.auth_context().get("x509_common_name")
    return "cert:" + names[0].decode(errors="replace") if names else ""
