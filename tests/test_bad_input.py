"""Bad input gets a clear gRPC status, is counted by reason, changes nothing, and harms no one else."""

from __future__ import annotations

import math

import grpc
import pytest

from thermoscope.v1 import telemetry_pb2 as pb

from conftest import OpenStream, frame, hello, scrape, stream, value


def nan_column() -> pb.AgentMessage:
    msg = frame(1, 0)
    msg.frame.layers.mean = bytes(8) + b"\x00\x00\x00\x00\x00\x00\xf8\x7f"  # 0.0, NaN
    return msg


def short_column() -> pb.AgentMessage:
    msg = frame(1, 0)
    msg.frame.layers.m2 = msg.frame.layers.m2[:8]  # one value for two layers
    return msg


def wrong_version() -> pb.AgentMessage:
    msg = hello("bad")
    msg.hello.protocol_version = 99
    return msg


CASES = {
    "frame before hello": ([frame(1, 0)], grpc.StatusCode.FAILED_PRECONDITION, "unknown_stream", "no hello"),
    "wrong protocol version": (
        [wrong_version()],
        grpc.StatusCode.FAILED_PRECONDITION,
        "protocol_version",
        "99",
    ),
    "mismatched column length": (
        [hello("bad"), short_column()],
        grpc.StatusCode.INVALID_ARGUMENT,
        "length_mismatch",
        "layer.m2",
    ),
    "NaN in a column": ([hello("bad"), nan_column()], grpc.StatusCode.INVALID_ARGUMENT, "non_finite", "NaN"),
    "infinite energy": (
        [hello("bad"), frame(1, 0, energy=math.inf)],
        grpc.StatusCode.INVALID_ARGUMENT,
        "non_finite",
        "energy",
    ),
    "second hello": (
        [hello("bad"), hello("bad")],
        grpc.StatusCode.FAILED_PRECONDITION,
        "duplicate_hello",
        "hello",
    ),
    "oversized message": (
        [hello("bad", n_layers=20_000)],
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "oversized",
        "exceeds the limit",
    ),
    "empty message": ([pb.AgentMessage()], grpc.StatusCode.INVALID_ARGUMENT, "empty", "neither"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_with_a_status_and_counted_while_others_stream_on(collector, case: str) -> None:
    messages, code, reason, words = CASES[case]
    good = OpenStream(collector.grpc_target, hello("good"))
    try:
        assert good.ack(frame(1, step=1)) == 1
        before = scrape(collector.metrics_url)

        replies, error = stream(collector.grpc_target, messages)

        assert error is not None and error.code() == code
        assert words in error.details()
        after = scrape(collector.metrics_url)
        assert value(after, "thermoscope_frames_rejected_total", reason=reason) == 1
        assert not any(r.HasField("ack") for r in replies)  # nothing of the bad stream was accepted
        assert after.get(("thermoscope_frames_received_total", frozenset({("job_id", "bad")})), 0) == 0
        assert good.ack(frame(2, step=2)) == 2  # the other agent never noticed
        assert value(after, "thermoscope_last_step", job_id="good") == value(
            before, "thermoscope_last_step", job_id="good"
        )
    finally:
        good.close()


def test_garbage_bytes_are_refused_as_undecodable(collector) -> None:
    with grpc.insecure_channel(collector.grpc_target) as channel:
        raw = channel.stream_stream(
            "/thermoscope.v1.Telemetry/Stream", request_serializer=None, response_deserializer=None
        )
        with pytest.raises(grpc.RpcError) as info:
            list(raw(iter([b"\xff\xff\xff\xff not a protobuf"]), timeout=10))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a thermoscope.v1.AgentMessage" in info.value.details()
    assert (
        value(scrape(collector.metrics_url), "thermoscope_frames_rejected_total", reason="undecodable") == 1
    )


def test_a_rejected_frame_leaves_the_jobs_state_as_it_was(collector) -> None:
    _, error = stream(collector.grpc_target, [hello("j"), frame(1, 0), frame(2, 1, energy=math.nan)])
    assert error is None  # NaN energy is allowed: "no loss given"
    _, error = stream(collector.grpc_target, [hello("j"), frame(3, 2), nan_column()])
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT
    metrics = scrape(collector.metrics_url)
    assert value(metrics, "thermoscope_frames_received_total", job_id="j") == 3
    assert value(metrics, "thermoscope_last_step", job_id="j") == 2
