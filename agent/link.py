"""The relay's link to one collector address: one gRPC channel, kept, and one stream at a time.

It runs in the relay process (`agent/relay.py`), never in the training process, and forwards the
frames as the bytes the training process serialized (no parse, no re-encode).

The channel is made once per address and kept across streams. grpc connects it, and reconnects
it after the collector went away, by itself, with its own jittered exponential backoff (bounded
by the sender's `backoff` through the channel options), so a collector restarted on the same
address is found again on the same channel. `connect` waits, bounded, for the channel to be
READY; `stream` runs one bidi `Stream` call on it: the hello, then the frames it is given,
paced below the collector's `max_frame_rate` (its `Config` says it), handing each ack and config
back to the sender. A refusal the agent's side must fix (UNAUTHENTICATED) is described with the
hint from `security`, which the sender logs once.

A collector's `Config` that asks for a frame rate no agent could keep (negative, not a number,
or below `MIN_FRAME_RATE`; 0 means no limit) is a protocol violation: logged once, and paced at
the floor.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator

import grpc

from thermoscope.v1 import telemetry_pb2 as pb
from thermoscope.wire.contract import STREAM_METHOD, is_loopback

from .security import Security

log = logging.getLogger("thermoscope.agent")

#: Seconds grpc's channel connectivity poller takes to stop after its last watcher leaves:
#: closing the channel before that makes the poller print a traceback (grpc/grpc#29848).
POLL_SETTLE = 0.25
#: How often the channel pings the collector, also while it sends nothing (a paused job, rare
#: samples): a dead collector is found within it and its timeout. Above the collector's least
#: interval between pings without data (`collector.ingest.keepalive.MIN_PING_INTERVAL_MS`).
PING_INTERVAL_MS = 30_000
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", PING_INTERVAL_MS),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),  # grpc's default stops after 2 pings without data
    ("grpc.max_send_message_length", 64 << 20),
]
#: The slowest pace a collector may ask for (frames per second): a slower one is a broken
#: collector, and pacing at it would hold a frame back for ever.
MIN_FRAME_RATE = 0.1
_warned: set[str] = set()  # what was logged once: plaintext targets, protocol violations


class Link:
    """The channel to one collector address, the stream of the current attempt and its pacing."""

    def __init__(self, target: str, security: Security, backoff: tuple[float, float]) -> None:
        """`security`: the agent's token and TLS settings; `backoff`: the first and the longest
        wait between reconnects."""
        self.target = target
        options = [
            *CHANNEL_OPTIONS,
            ("grpc.initial_reconnect_backoff_ms", round(backoff[0] * 1000)),
            ("grpc.max_reconnect_backoff_ms", round(backoff[1] * 1000)),
        ]
        self._metadata: tuple[tuple[str, str], ...] = ()
        if not security.tls:
            if security.token is not None:
                self._metadata = (("authorization", f"Bearer {security.token}"),)
                _warn_plaintext(target)
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            credentials = grpc.ssl_channel_credentials(
                root_certificates=security.root_cert,
                private_key=security.client_key,
                certificate_chain=security.client_cert,
            )
            if security.token is not None:
                credentials = grpc.composite_channel_credentials(
                    credentials, grpc.access_token_call_credentials(security.token)
                )
            self._channel = grpc.secure_channel(target, credentials, options=options)
        # frames travel as the bytes the training process serialized: no parse, no re-encode
        self._stream = self._channel.stream_stream(
            STREAM_METHOD, request_serializer=None, response_deserializer=pb.CollectorMessage.FromString
        )
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
        hello: bytes,
        frames: Iterator[bytes],
        *,
        on_open: Callable[[], None],
        on_ack: Callable[[int, int], None],
        on_config: Callable[[pb.Config], None] | None,
        stopping: threading.Event,
    ) -> str | None:
        """Run one `Stream` call to its end: None if the collector ended it, else what went wrong.

        `on_open()` comes after the first reply, `on_ack(accepted, durable)` with each ack (`seq`:
        accepted up to there; `durable`: persisted up to there, `seq` from a collector without a
        database), `on_config(config)` with each config (after pacing adopted its frame rate);
        all on this (the caller's) thread. `hello` and `frames` are serialized AgentMessages."""
        answered, ended = threading.Event(), threading.Event()
        call = self._stream(self._requests(hello, frames, answered, ended), metadata=self._metadata or None)
        self._call = call
        if stopping.is_set():  # `cancel` may have come before the call existed
            call.cancel()
        try:
            for reply in call:
                if reply.HasField("ack"):
                    ack = reply.ack
                    on_ack(ack.seq, ack.durable if ack.HasField("durable") else ack.seq)
                elif reply.HasField("config"):
                    self._gap = _gap(reply.config.max_frame_rate)
                    if on_config is not None:
                        on_config(reply.config)
                if not answered.is_set():  # (after the config it answers the hello with: paced)
                    answered.set()
                    on_open()
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}{refusal_hint(exc.code())}"
        finally:
            ended.set()
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

    def _requests(
        self, hello: bytes, frames: Iterator[bytes], answered: threading.Event, ended: threading.Event
    ) -> Iterator[bytes]:
        """The request stream, on gRPC's request thread: the hello, then, once the collector
        answered it (with its config: the pace to keep), the frames, paced. Frames sent before
        the answer would go at whatever rate they were queued, and a replay after an outage
        would be refused for its burst."""
        yield hello
        while not answered.wait(0.1):
            if ended.is_set():
                return
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


def _gap(rate: float) -> float:
    """Least seconds between two frames for a collector's `max_frame_rate` (0: unpaced; a
    little under the rate, so that clock jitter never crosses it)."""
    if rate == 0:
        return 0.0
    if not (math.isfinite(rate) and rate >= MIN_FRAME_RATE):
        _once(
            f"rate {rate!r}",
            f"thermoscope: protocol violation: the collector asked for {rate!r} frames per second; "
            f"pacing at {MIN_FRAME_RATE} instead",
        )
        rate = MIN_FRAME_RATE
    return 1.0 / (0.9 * rate)


def _warn_plaintext(target: str) -> None:
    """Warn when a token would cross a non-loopback plaintext channel."""
    if not is_loopback(target.rpartition(":")[0].strip("[]")):
        _once(target, f"thermoscope: sending the bearer token to {target} without TLS")


def _once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


def refusal_hint(code: grpc.StatusCode) -> str:
    """What to add to the agent's (once-only) log line about a refusal the agent's side must fix.

    UNAUTHENTICATED: the collector wants a token this agent was not given (or not this one).
    Typical for agents that discovered a Ray collector actor started with --tokens, whose
    launcher set no token in the workers' environment; the stream is retried with backoff
    meanwhile (the collector may be restarted with other tokens), so this line is all it says.
    """
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return (
            "; this collector requires a bearer token from its tokens file: give Monitor(token=...) or set "
            "$THERMOSCOPE_TOKEN or $THERMOSCOPE_TOKEN_FILE (Ray workers: the job's runtime_env env_vars). "
            "Until then nothing is delivered (training is unaffected)"
        )
    return ""
