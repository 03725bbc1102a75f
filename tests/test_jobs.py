"""`thermoscope jobs`: the jobs a user can attach to or look at, by the names they know them by,
read from a real collector's /metrics by the real command (the Ray side: tests/test_ray.py)."""

from __future__ import annotations

import re

import pytest

from thermoscope.cli import raw_protocol
from thermoscope.collector.service import Collector

from helpers.metrics import scrape, value, wait_until
from helpers.processes import free_port, thermoscope
from helpers.protocol import OpenStream, hello

TRAIN_RUN = "ray_train_run-2026-12-08_02-00-00"


def test_jobs_lists_the_jobs_the_collector_sees_with_the_run_their_agents_named(
    collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # no Ray cluster asked
    ray_job = OpenStream(collector.grpc_target, raw_protocol.hello("01000000", run=TRAIN_RUN, agent="test"))
    other = OpenStream(collector.grpc_target, hello("my-run"))
    try:
        url = collector.metrics_url
        wait_until(
            lambda: value(scrape(url), "thermoscope_agents_connected", job_id="01000000") == 1, 30, "no"
        )
        collector.detach("my-run")
        shown = thermoscope("jobs", "--collector", url)
        assert shown.returncode == 0, shown.stderr
        rows = {line.split()[0]: line for line in shown.stdout.splitlines()[1:]}
        assert set(rows) == {"01000000", "my-run"}, shown.stdout
        assert re.match(rf"01000000\s+{TRAIN_RUN}\s+—\s+—\s+1 live\s*$", rows["01000000"]), rows
        assert "paused" in rows["my-run"] and "entrypoint" not in shown.stdout  # no Ray cluster asked
    finally:
        ray_job.close()
        other.close()


def test_jobs_without_a_collector_says_where_it_looked_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    address = f"127.0.0.1:{free_port()}"
    shown = thermoscope("jobs", "--collector", address)
    assert shown.returncode == 1 and shown.stdout == ""
    (line,) = shown.stderr.splitlines()
    assert f"http://{address}/metrics" in line and "cannot reach" in line, line
