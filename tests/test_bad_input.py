"""Bad input gets a clear gRPC status, is counted by reason, changes nothing, and harms no one else."""

from __future__ import annotations

import math

import grpc
import pytest

from thermoscope.collector.service import Collector
from thermoscope.v1 import telemetry_pb2 as pb
from thermoscope.wire.contract import STREAM_METHOD

from helpers.metrics import scrape, value
from helpers.protocol import OpenStream, frame, hello, stream


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
    "name too long": (
        [hello("x" * 300)],
        grpc.StatusCode.INVALID_ARGUMENT,
        "name_too_long",
        "300 characters",
    ),
    "second hello": (
        [hello("bad"), hello("bad")],
        grpc.StatusCode.FAILED_PRECONDITION,
        "duplicate_hello",
        "hello",
    ),
    "oversized message": (
        [hello("bad", n_layers=10_000)],  # between the limit and twice it, where gRPC lets us judge
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
        raw = channel.stream_stream(STREAM_METHOD, request_serializer=None, response_deserializer=None)
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
    _, error = stream(collector.grpc_target, [hello("j"), frame(3, 2), short_column()])
    assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT
    metrics = scrape(collector.metrics_url)
    assert value(metrics, "thermoscope_frames_received_total", job_id="j") == 3
    assert value(metrics, "thermoscope_last_step", job_id="j") == 2


def test_nan_and_inf_are_counted_not_merged_and_the_stream_goes_on(collector) -> None:
    """A diverging run sends NaN weights and an infinite loss: counted, the layer NaN at that
    step, the energy's +inf seen by the detector, and the stream carries on."""
    nan = nan_column()  # layer1's mean is NaN at step 0
    nan.frame.seq, nan.frame.step = 2, 1
    replies, error = stream(
        collector.grpc_target,
        [hello("div"), frame(1, 0), nan, frame(3, 2, energy=math.inf), frame(4, 3)],
    )
    assert error is None
    assert max(r.ack.seq for r in replies if r.HasField("ack")) == 4  # cumulative: all four taken
    metrics = scrape(collector.metrics_url)
    assert value(metrics, "thermoscope_frames_received_total", job_id="div") == 4
    assert value(metrics, "thermoscope_nonfinite_values_total", job_id="div", what="layer") == 1
    assert value(metrics, "thermoscope_nonfinite_values_total", job_id="div", what="energy") == 1
    assert value(metrics, "thermoscope_phase", job_id="div", scope="job", layer="", phase="unstable") == 1
    assert not any(name == "thermoscope_frames_rejected_total" and v for (name, _), v in metrics.items())


def test_limits_on_layers_rate_and_series(tmp_path) -> None:
    with Collector(
        "127.0.0.1:0",
        "127.0.0.1:0",
        db=None,
        max_jobs=2,
        max_frame_rate=5,
        max_series_per_job=3,
        max_layers=6,
    ).running() as c:
        _, error = stream(c.grpc_target, [hello("a", n_layers=7)])
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "the limit is 6" in error.details()
        assert stream(c.grpc_target, [hello("a", n_layers=5, n_sites=4), frame(1, 0, 5, 4)])[1] is None
        assert stream(c.grpc_target, [hello("b")])[1] is None
        assert stream(c.grpc_target, [hello("a", n_layers=5, n_sites=4)])[1] is None  # a known job: fine
        replies, error = stream(c.grpc_target, [hello("b"), *(frame(i, i) for i in range(1, 20))])
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "per second" in error.details()
        # the bucket holds one second: 5 frames taken (acks are cumulative: the highest says it)
        assert max(r.ack.seq for r in replies if r.HasField("ack")) == 5
        metrics = scrape(c.metrics_url)
        for reason in ("too_many_layers", "rate_limited"):  # too_many_jobs: test_job_bounds.py
            assert value(metrics, "thermoscope_frames_rejected_total", reason=reason) == 1
        layers = {dict(k[1])["layer"]: v for k, v in metrics.items() if k[0] == "thermoscope_layer_work"}
        assert set(layers) == {"layer0", "layer1", "__other__"}
        assert layers["__other__"] == pytest.approx(3 * (0.4 - 0.5))  # work folds exactly: a sum
        entropy = {
            dict(k[1])["layer"]: v for k, v in metrics.items() if k[0] == "thermoscope_layer_entropy_nats"
        }
        assert sum(entropy.values()) == pytest.approx(value(metrics, "thermoscope_entropy_nats", job_id="a"))
        assert value(metrics, "thermoscope_layers_folded", job_id="a") == 3
        assert value(metrics, "thermoscope_sites_folded", job_id="a") == 2


def test_the_limits_are_collector_flags() -> None:
    from thermoscope.cli.main import parser

    flags = {"--max-layers": "7", "--max-name-length": "9", "--max-jobs": "3"}
    flags |= {"--max-series-per-job": "5", "--max-frame-rate": "2.5"}
    args = parser().parse_args(["collector", *(x for item in flags.items() for x in item)])
    assert (args.max_layers, args.max_name_length, args.max_jobs) == (7, 9, 3)
    assert (args.max_series_per_job, args.max_frame_rate) == (5, 2.5)
    with pytest.raises(SystemExit):
        parser().parse_args(["collector", "--max-series-per-job", "1"])
