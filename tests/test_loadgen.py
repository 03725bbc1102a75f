"""`thermoscope loadgen`: a small load holds its rate with no error, and the command's bounds."""

from __future__ import annotations

import io
import math
import threading

import pytest

from thermoscope.cli import loadgen

from helpers.processes import start_collector_process, thermoscope


@pytest.mark.slow
def test_a_small_load_is_held_and_measured() -> None:
    out = io.StringIO()
    agents, layers, rate, duration = 20, 10, 5.0, 3.0
    f = loadgen.run(
        agents=agents, layers=layers, rate=rate, duration=duration, scrape_interval=1.0, warmup=1.0, out=out
    )
    text = out.getvalue()
    assert "| agents | layers |" in text and "acked frames/s=" in text and "full /metrics scrapes: " in text
    assert f["errors"] == 0
    assert 0.7 * agents * rate <= f["frames_per_s"] <= 1.3 * agents * rate, text
    assert f["layer_samples_per_s"] == f["frames_per_s"] * layers
    assert f["frames_acked"] == f["frames_sent"]
    assert f["latency_samples"] > 0 and "warm-up (steps sent in the first 1 s" in text
    assert 0 < f["latency_p50_s"] <= f["latency_p99_s"] < 5, text
    assert f["collector_cpu_cores"] > 0
    assert 10 < f["collector_rss_peak_mib"] < 2048


@pytest.mark.slow
def test_loadgen_refuses_what_it_must_not_drive() -> None:
    remote = thermoscope(
        "loadgen", "--target", "10.1.2.3:50051", "--target-metrics", "http://10.1.2.3:9108/metrics"
    )
    assert remote.returncode == 2 and "loopback" in remote.stderr
    many = thermoscope("loadgen", "--agents", str(loadgen.MAX_AGENTS + 1))
    assert many.returncode == 2 and "--agents" in many.stderr
    long = thermoscope("loadgen", "--duration", str(loadgen.MAX_DURATION + 1))
    assert long.returncode == 2 and "--duration" in long.stderr
    scrapes = thermoscope("loadgen", "--scrape-interval", "-1")
    assert scrapes.returncode == 2 and "--scrape-interval" in scrapes.stderr
    warmup = thermoscope("loadgen", "--duration", "5", "--warmup", "5")
    assert warmup.returncode == 2 and "--warmup" in warmup.stderr
    assert math.isfinite(loadgen.MAX_DURATION)


@pytest.mark.slow
def test_collectors_share_the_jobs_as_agents_would() -> None:
    """--collectors 2: jobs go to the collector `discovery.shard` picks, each merged whole."""
    out = io.StringIO()
    f = loadgen.run(agents=16, layers=4, rate=5.0, duration=2.0, collectors=2, scrape_interval=0, out=out)
    assert f["errors"] == 0 and f["frames_acked"] == f["frames_sent"] > 0, out.getvalue()
    assert f["latency_samples"] > 0 and f["collector_rss_total_mib"] > f["collector_rss_peak_mib"]


@pytest.mark.slow
def test_agents_whose_streams_the_collector_refuses_end_and_count_as_errors(tmp_path) -> None:
    """A collector that refuses the streams mid-run (here: above its frame rate) must not leave
    the loadgen waiting forever for acks of a stream that ended: each agent ends with an error."""
    collector = start_collector_process(tmp_path / "c.db", None, "--max-frame-rate", "5")
    result: dict[str, float] = {}
    try:
        runner = threading.Thread(
            target=lambda: result.update(
                loadgen.run(
                    agents=4,
                    layers=10,
                    rate=0,
                    duration=2.0,
                    target=collector.grpc_target,
                    target_metrics=collector.metrics_url,
                    scrape_interval=0,
                    out=io.StringIO(),
                )
            ),
            daemon=True,
        )
        runner.start()
        runner.join(timeout=120)  # not a speed bound: without the fix it never returns
        assert not runner.is_alive(), "loadgen still waits for acks of refused streams"
    finally:
        collector.stop()
    assert result["errors"] == 4
    assert result["frames_acked"] < result["frames_sent"]
