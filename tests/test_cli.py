"""The `thermoscope` command as a user runs it."""

from __future__ import annotations

import inspect
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request

import pytest

from thermoscope.cli.main import parser
from thermoscope.collector.service import Collector
from thermoscope.collector.settings import DEFAULTS

from helpers.processes import stop_process, thermoscope


@pytest.mark.slow
def test_the_default_demo_trains_streams_detects_the_shift_and_shows_it_all() -> None:
    result = thermoscope("demo")  # the README's command: 1200 steps, every 5, data shift at 600
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "/metrics" in out and "gRPC 127.0.0.1:" in out
    assert "job 'demo' at step 1195" in out
    for layer in ("0.weight", "0.bias", "2.weight", "4.bias"):
        assert layer in out
    assert "ReLU" in out and "Tanh" in out
    assert "A (scale-invariant)" in out and "B (temperature-dependent)" in out  # the sites' engine types
    assert "step 600: the data shift" in out
    assert "job phases: type_i -> transition -> type_ii -> refresh -> transition -> type_ii" in out
    assert "240 frames merged, 0 dropped" in out


def test_demo_prints_the_page_beside_metrics_and_serves_it_after_the_run_with_serve() -> None:
    env = {**os.environ, "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "thermoscope.cli", "demo", "--steps", "40", "--every", "2"]
    proc = subprocess.Popen(
        [*command, "--shift-at", "0", "--serve"], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        out = ""
        while "until Ctrl-C" not in out and (line := proc.stdout.readline()):
            out += line
        page = re.search(r"page (http://127\.0\.0\.1:\d+/)\s", out)
        assert page and f"metrics {page[1]}metrics" in out, out
        assert f"serving {page[1]} and {page[1]}metrics until Ctrl-C" in out
        # the run is over and the page still answers, with the job's last step
        with urllib.request.urlopen(page[1] + "api/v1/jobs", timeout=10) as answer:
            assert [(j["job"], j["step"]) for j in json.load(answer)["jobs"]] == [("demo", 38)]
        with urllib.request.urlopen(page[1], timeout=10) as answer:
            assert answer.status == 200 and b"<title>Thermoscope</title>" in answer.read()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        stop_process(proc)


@pytest.mark.slow
def test_demo_draws_its_run_when_asked(tmp_path) -> None:
    figure = tmp_path / "run.png"
    result = thermoscope("demo", "--steps", "40", "--every", "2", "--shift-at", "0", "--figure", str(figure))
    assert result.returncode == 0, result.stderr
    assert f"figure written to {figure}" in result.stdout.replace("\n", "")
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and figure.stat().st_size > 20_000


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["demo", "--steps", "0"], "--steps: must be at least 1, got 0"),
        (["demo", "--every", "x"], "--every: must be an integer, got 'x'"),
        (["collector", "--window", "1"], "--window: must be at least 2"),
        (["collector", "--grpc", "nonsense"], "HOST:PORT"),
        (["collector", "--stale-after", "0"], "--stale-after: must be a positive number, got 0"),
    ],
)
def test_bad_arguments_get_a_clear_error(args: list[str], message: str) -> None:
    result = thermoscope(*args, timeout=30)
    assert result.returncode == 2
    assert message in result.stderr


@pytest.mark.slow
def test_demo_runs_as_a_two_worker_ray_train_job_and_merges_both_ranks() -> None:
    pytest.importorskip("ray")
    result = thermoscope("demo", "--workers", "2", "--steps", "400", "--every", "5", timeout=300)
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert "job 'demo' at step 395" in out
    assert "160 frames merged, 0 dropped" in out  # 80 samples from each of the 2 ranks
    assert "type_ii -> refresh" in out  # the data shift at step 200 is seen in the merged job


def test_collectors_flat_keywords_build_the_one_settings_object_its_parts_read() -> None:
    """`Collector(grpc, metrics, window=..., max_jobs=...)` (the flags' names) keeps working: the
    keywords become its `CollectorSettings`, and the servicer reads them from there."""
    collector = Collector("127.0.0.1:0", "127.0.0.1:0", db=None, window=7, every=3, max_jobs=2)
    assert collector.settings == DEFAULTS.with_flat(
        grpc="127.0.0.1:0", metrics="127.0.0.1:0", db=None, window=7, every=3, max_jobs=2
    )
    assert (collector.settings.window, collector.settings.limits.max_jobs) == (7, 2)
    assert collector.telemetry.settings is collector.settings
    assert collector.telemetry.limits.max_jobs == 2
    with pytest.raises(TypeError):
        Collector("127.0.0.1:0", "127.0.0.1:0", db=None, no_such_setting=1)
    with pytest.raises(ValueError, match="checkpoint_interval must be positive"):
        Collector("127.0.0.1:0", "127.0.0.1:0", db=None, checkpoint_interval=0)


def test_every_collector_default_is_the_settings_objects() -> None:
    """`thermoscope collector`, `thermoscope attach` and `Collector` all read `DEFAULTS`."""
    limits = DEFAULTS.limits
    expected = {
        "window": DEFAULTS.window,
        "every": DEFAULTS.every,
        "max_message_bytes": DEFAULTS.max_message_bytes,
        "stale_after": DEFAULTS.stale_after,
        "phase_layers": DEFAULTS.phase_layers,
        "history_interval": DEFAULTS.history_interval,
        "checkpoint_interval": DEFAULTS.checkpoint_interval,
        "max_series_per_job": DEFAULTS.max_series_per_job,
        "max_layers": limits.max_layers,
        "max_name_length": limits.max_name_length,
        "max_jobs": limits.max_jobs,
        "max_frame_rate": limits.max_frame_rate,
        "max_jobs_per_token": limits.max_jobs_per_token,
        "max_ranks": limits.max_ranks,
    }
    flags = vars(parser().parse_args(["collector"]))
    assert {name: flags[name] for name in expected} == expected
    assert (flags["grpc"], flags["metrics"]) == (DEFAULTS.grpc, DEFAULTS.metrics)
    assert flags["db"] == str(DEFAULTS.db)
    assert inspect.signature(Collector).parameters["settings"].default is DEFAULTS
    assert DEFAULTS.with_flat(**expected) == DEFAULTS  # each flag names a field of the settings
    attach = vars(parser().parse_args(["attach"]))
    assert (attach["grpc_port"], attach["metrics_port"]) == (DEFAULTS.grpc_port, DEFAULTS.metrics_port)
    assert attach["sd_file"] == flags["sd_file"] == str(DEFAULTS.sd_file)
