"""The agent's link to one collector address: one gRPC channel, kept, and one stream at a time.

The channel is made once per address and kept across streams. grpc connects it, and reconnects
it after the collector went away, by itself, with its own jittered exponential backoff (bounded
by the sender's `backoff` through the channel options), so a collector restarted on the same
address is found again on the same channel. `connect` waits, bounded, for the channel to be
READY; `stream` runs one bidi `Stream` call on it: the hello, then the frames it is given,
paced below the collector's `max_frame_rate` (its `Config` says it), handing each ack and config
back to the sender. A refusal the agent's side must fix (UNAUTHENTICATED) is described with the
hint from `security`, which the sender logs once.

grpc's fork support is off, so a forked child must never touch its parent's channel, not even
by letting it be garbage-collected (that closes it): `abandon` keeps it referenced, unused, for
the child's whole life.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import grpc

from thermoscope.v1 import telemetry_pb2 as pb
from thermoscope.v1 import telemetry_pb2_grpc as pb_grpc

from . import security

#: Seconds grpc's channel connectivity poller takes to stop after its last watcher leaves:
#: closing the channel before that makes the poller print a traceback (grpc/grpc#29848).
POLL_SETTLE = 0.25
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.max_send_message_length", 64 << 20),
]

_abandoned: list[Link] = []  # a forked child's inherited links: kept, so that they are never closed


class Link:
    """The channel to one collector address, the stream of the current attempt and its pacing."""

    def __init__(
        self,
        target: str,
        credentials: grpc.ChannelCredentials | None,
        metadata: tuple[tuple[str, str], ...],
        backoff: tuple[float, float],
    ) -> None:
        """`credentials`: TLS (None: plaintext), `metadata`: per-call metadata (a token), both from
        `security.channel_security`; `backoff`: the first and the longest wait between reconnects."""
        self.target = target
        self._metadata = metadata
        options = [
            *CHANNEL_OPTIONS,
            ("grpc.initial_reconnect_backoff_ms", round(backoff[0] * 1000)),
            ("grpc.max_reconnect_backoff_ms", round(backoff[1] * 1000)),
        ]
        if credentials is None:
            security.warn_plaintext(target, metadata)
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self._call: grpc.RpcContext | None = None
        self._watched_until = float("-inf")  # when a wait for READY last stopped watching the channel
        self._gap = 0.0  # least seconds between two frames: below the collector's max_frame_rate
        self._next_send = 0.0

    def connect(self, timeout: float, wait: Callable[[float], None], stopping: threading.Event) -> bool:
        """Wait until the channel is READY (grpc connects and reconnects meanwhile); False if
        `timeout` passed or `stopping` was set first. `wait(seconds)` is the caller's own way to
        pass the time (the sender spills its queue into the spool meanwhile)."""
        ready = grpc.channel_ready_future(self._channel)
        deadline = time.monotonic() + timeout
        try:
            while not ready.done():
                left = deadline - time.monotonic()
                if left <= 0 or stopping.is_set():
                    ready.cancel()
                    return False
                wait(min(left, 0.05))
            return True
        finally:
            self._watched_until = time.monotonic()

    def stream(
        self,
        hello: pb.AgentMessage,
        frames: Iterator[pb.AgentMessage],
        *,
        on_open: Callable[[], None],
        on_ack: Callable[[int, int], None],
        on_config: Callable[[pb.Config], None] | None,
        stopping: threading.Event,
    ) -> str | None:
        """Run one `Stream` call to its end: None if the collector ended it, else what went wrong.

        `on_open()` comes with the first reply, `on_ack(accepted, durable)` with each ack (`seq`:
        accepted up to there; `durable`: persisted up to there, `seq` from a collector without a
        database), `on_config(config)` with each config (after pacing adopted its frame rate);
        all on this (the caller's) thread."""
        call = pb_grpc.TelemetryStub(self._channel).Stream(
            self._requests(hello, frames), metadata=self._metadata or None
        )
        self._call = call
        if stopping.is_set():  # `cancel` may have come before the call existed
            call.cancel()
        opened = False
        try:
            for reply in call:
                if not opened:
                    opened = True
                    on_open()
                if reply.HasField("ack"):
                    ack = reply.ack
                    on_ack(ack.seq, ack.durable if ack.HasField("durable") else ack.seq)
                elif reply.HasField("config"):
                    rate = reply.config.max_frame_rate
                    self._gap = 1.0 / (0.9 * rate) if rate > 0 else 0.0
                    if on_config is not None:
                        on_config(reply.config)
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}{security.refusal_hint(exc.code())}"
        finally:
            self._call = None
        return None

    def cancel(self) -> None:
        """Cancel the current stream, if any (from another thread: a shutdown that waited enough)."""
        call = self._call
        if call is not None:
            call.cancel()

    def close(self) -> None:
        """Close the channel, once grpc's connectivity poller has stopped (grpc/grpc#29848)."""
        settle = self._watched_until + POLL_SETTLE - time.monotonic()
        if settle > 0:
            time.sleep(settle)
        self._channel.close()

    def abandon(self) -> None:
        """In a forked child: never use, close or free this (the parent's) channel."""
        _abandoned.append(self)

    def _requests(
        self, hello: pb.AgentMessage, frames: Iterator[pb.AgentMessage]
    ) -> Iterator[pb.AgentMessage]:
        """The request stream, on gRPC's request thread: the hello, then the frames, paced."""
        yield hello
        for frame in frames:
            self._pace()
            yield frame

    def _pace(self) -> None:
        """Stay below the collector's `max_frame_rate`: a replay after an outage would otherwise
        come as one burst and be refused. Sleeps on gRPC's request thread; training never waits."""
        if not self._gap:
            return
        now = time.monotonic()
        if self._next_send > now:
            time.sleep(self._next_send - now)
            now = self._next_send
        self._next_send = now + self._gap
