"""Acks are cumulative (`Ack.seq`: every frame of the stream up to it is accepted), so a collector
that takes several frames of a stream at once answers them with one ack: at peak load each ack
it does not write is a round of gRPC's machinery saved (docs/benchmarks.md, issue 15)."""

from __future__ import annotations

from helpers.metrics import scrape, value
from helpers.protocol import frame, hello, stream

FRAMES = 100


def test_frames_taken_together_are_acknowledged_together_and_every_one_is_covered(collector_process) -> None:
    """An agent that sends its frames without waiting for acks (as the `Sender` does) gets acks
    in order, the last one covering its last frame, and fewer acks than frames; every frame was
    taken."""
    frames = [frame(seq, seq - 1) for seq in range(1, FRAMES + 1)]
    replies, error = stream(collector_process.grpc_target, [hello("burst"), *frames])
    assert error is None
    acks = [r.ack.seq for r in replies if r.HasField("ack")]
    assert acks == sorted(acks) and acks[-1] == FRAMES
    assert len(acks) < FRAMES
    metrics = scrape(collector_process.metrics_url)
    assert value(metrics, "thermoscope_frames_received_total", job_id="burst") == FRAMES
    assert value(metrics, "thermoscope_last_step", job_id="burst") == FRAMES - 1
