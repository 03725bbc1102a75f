"""One agent's call, as the servicer (server.py) handles it: its `Session`, the `Inbox` that orders
its requests and markers for its one handler, its frame-rate `Bucket`, and a `Refused` request's
gRPC status."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

import grpc

from thermoscope.v1 import telemetry_pb2 as pb

from ..state.job import Job
from ..state.stream import Stream
from .refusal import BadBytes

#: The gRPC status a refusal ends its call with, by reason (any other: INVALID_ARGUMENT).
STATUS = {
    "unknown_stream": grpc.StatusCode.FAILED_PRECONDITION,
    "forbidden_job": grpc.StatusCode.PERMISSION_DENIED,  # a token bound to other jobs (grpc_auth.py)
    "duplicate_hello": grpc.StatusCode.FAILED_PRECONDITION,
    "protocol_version": grpc.StatusCode.FAILED_PRECONDITION,
    "edges_mismatch": grpc.StatusCode.FAILED_PRECONDITION,
    "rank_taken": grpc.StatusCode.FAILED_PRECONDITION,  # another open stream's rank (state/job.py)
    "state_unreadable": grpc.StatusCode.FAILED_PRECONDITION,  # its run's stored state (checkpoint.py)
    "oversized": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "too_many_jobs": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "too_many_layers": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "too_many_ranks": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "rate_limited": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "rank_owned": grpc.StatusCode.PERMISSION_DENIED,  # another identity's rank (job.py)
    "table_changed": grpc.StatusCode.FAILED_PRECONDITION,  # its samples still wait under the old table
}


#: How far a stream's frame may number past its previous frame: an agent's frames on one stream
#: number consecutively (a spool's replay, then new frames), at most 64 (its window) unacknowledged.
SEQ_AHEAD = 256

#: Requests a stream reads ahead of the ones it has handled (then gRPC's flow control holds the agent).
READ_AHEAD = 8


class Bucket:
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
class ReadFailed:
    """Reading the requests failed (the server is stopping): the handler re-raises it."""

    error: Exception


END = object()  # the agent half-closed its requests
PUSH = object()  # the job's admission changed: tell the agent


class Inbox:
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
        if item is not PUSH and item is not END and not isinstance(item, ReadFailed):
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
        if not items or items[0] is PUSH or items[0] is END or isinstance(items[0], ReadFailed):
            return None
        return self._take()

    def _take(self) -> object:
        item = self.items.popleft()
        if item is not PUSH and item is not END and not isinstance(item, ReadFailed):
            self.unhandled -= 1
            if self._putter is not None:
                self._putter.done() or self._putter.set_result(None)
                self._putter = None
        return item


class Refused(Exception):
    """A request the call refuses: the handler acknowledges what it accepted before, then ends
    the call with the status (`reason`: counted as a rejection; "": not counted, e.g. draining)."""

    def __init__(self, reason: str, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.reason, self.message = reason, message
        self.code = code or STATUS.get(reason, grpc.StatusCode.INVALID_ARGUMENT)


@dataclass(eq=False)
class Session:
    """One call: what its reader task, its handler and admission changes share."""

    inbox: Inbox = field(default_factory=Inbox)  # requests, PUSH, then END
    stream: Stream | None = None  # after a valid hello
    job: Job | None = None  # the run its hello joined
    bucket: Bucket | None = None  # frames it may send (Limits.max_frame_rate), after the hello
    pushing: bool = False  # a PUSH is queued
    clean: bool = False  # the agent half-closed, and our last reply reached it
    ended: bool = False

    def push(self) -> None:
        if not self.pushing:
            self.pushing = True
            self.inbox.put(PUSH)
