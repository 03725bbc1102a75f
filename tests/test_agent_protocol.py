"""A collector that breaks the protocol cannot make the agent lie or crash.

Before, an agent believed acks for frames it never sent (`delivered` 2^64 - 1, or 1,000 of 400,
and `close()` True), and a collector asking for 1e-300 frames per second made it log OverflowError
tracebacks. Now acks count only up to the last frame sent, a rate no agent could keep is paced at
the floor, and each violation is logged once. The collector here is a real gRPC server on
loopback that answers as the test scripts it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc
import pytest

from thermoscope.agent import Monitor
from thermoscope.agent.link import MIN_FRAME_RATE
from thermoscope.v1 import telemetry_pb2 as pb
from thermoscope.wire.contract import SERVICE

from helpers.training import small_model, train_steps

VIOLATION = "protocol violation"


class LyingCollector:
    """Answers each frame with `ack(frame seq)`, after a config with `rate` frames per second."""

    def __init__(self, ack: Callable[[int], pb.Ack], rate: float = 0.0) -> None:
        self.received: list[int] = []
        self._ack, self._rate = ack, rate
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        handler = grpc.stream_stream_rpc_method_handler(
            self._stream,
            request_deserializer=pb.AgentMessage.FromString,
            response_serializer=pb.CollectorMessage.SerializeToString,
        )
        self._server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"Stream": handler}),)
        )
        self.target = f"127.0.0.1:{self._server.add_insecure_port('127.0.0.1:0')}"
        self._server.start()

    def _stream(self, requests: Iterator[pb.AgentMessage], context) -> Iterator[pb.CollectorMessage]:
        yield pb.CollectorMessage(config=pb.Config(max_frame_rate=self._rate))
        for message in requests:
            if message.HasField("frame"):
                self.received.append(message.frame.seq)
                yield pb.CollectorMessage(ack=self._ack(message.frame.seq))

    def __enter__(self) -> LyingCollector:
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.stop(grace=None)


def violations(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if VIOLATION in r.getMessage()]


@pytest.mark.parametrize(
    "ack",
    [
        pytest.param(lambda seq: pb.Ack(seq=2**64 - 1, durable=2**64 - 1), id="the largest seq"),
        pytest.param(lambda seq: pb.Ack(seq=seq + 600, durable=seq + 600), id="600 ahead"),
        pytest.param(lambda seq: pb.Ack(seq=seq, durable=seq + 600), id="durable ahead"),
    ],
)
def test_acks_for_frames_never_sent_count_only_up_to_the_last_frame_sent(
    ack, caplog: pytest.LogCaptureFixture
) -> None:
    model, opt = small_model()
    with LyingCollector(ack) as collector, caplog.at_level(logging.WARNING, logger="thermoscope.agent"):
        monitor = Monitor(model, opt, collector=collector.target, job="lied-to", every=1)
        train_steps(monitor, model, opt, 40)
        monitor.close(timeout=20)
    assert collector.received == list(range(1, 41))
    assert (monitor.delivered, monitor.dropped, monitor.undurable) == (40, 0, 0)  # never 1,000 of 40
    assert len(violations(caplog)) == 1, violations(caplog)


def test_a_frame_rate_no_agent_could_keep_is_paced_at_the_floor_and_logged_once(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture
) -> None:
    """1e-300 frames per second (said in the config that opens the stream): once it is read, a
    frame goes, and each next one waits 1 / (0.9 * MIN_FRAME_RATE) s; nothing overflows (the
    relay's output is captured too: it inherits this process' stderr)."""
    model, opt = small_model()
    with (
        LyingCollector(lambda seq: pb.Ack(seq=seq, durable=seq), rate=1e-300) as collector,
        caplog.at_level(logging.WARNING, logger="thermoscope.agent"),
    ):
        monitor = Monitor(model, opt, collector=collector.target, job="slow", every=1)
        train_steps(monitor, model, opt, 1)
        assert monitor.flush(timeout=20)  # its ack came after the config: the pace is set now
        train_steps(monitor, model, opt, 3)
        assert not monitor.flush(timeout=3)  # at 0.1 frames/s the three cannot all go in 3 s
        # (the first frame paced may have been frame 1 or 2: whichever the relay pulled after the
        # config; every frame after it waits 1 / 0.09 s)
        assert monitor.delivered in (1, 2)
        monitor.close(timeout=1)
    (line,) = violations(caplog)
    assert "1e-300" in line and f"pacing at {MIN_FRAME_RATE}" in line
    err = capfd.readouterr().err
    assert "OverflowError" not in err and "Traceback" not in err
