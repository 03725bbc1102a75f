"""`thermoscope_rank_stale` is bounded by `--max-series-per-job`, like the layer series.

A job whose agents claim many ranks (one stream each, as a hostile or a huge job would) gets at
most `max_series_per_job` rank series: its stale ranks first (they are what the alerts read), then
the ranks that stream, the rest folded into one `rank="__other__"` series that is 1 if any rank
folded into it is stale. Real gRPC streams into a real collector, read from a real scrape.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import urllib.request

import pytest

from thermoscope.collector.exposition.catalogue import OTHER
from thermoscope.collector.service import Collector

from helpers.metrics import scrape, wait_until
from helpers.protocol import OpenStream, hello

RANKS = 12


def rank_series(url: str, job: str) -> dict[str, float]:
    """The job's `thermoscope_rank_stale` samples, by rank."""
    return {
        dict(labels)["rank"]: v
        for (name, labels), v in scrape(url).items()
        if name == "thermoscope_rank_stale" and dict(labels)["job_id"] == job
    }


def settles_to(url: str, job: str, expected: dict[str, float]) -> dict[str, float]:
    """The job's rank series once they read `expected` (a cancelled stream ends a moment later)."""
    seen: dict[str, float] = {}

    def reads_expected() -> bool:
        seen.clear()
        seen.update(rank_series(url, job))
        return seen == expected

    with contextlib.suppress(TimeoutError):
        wait_until(reads_expected, 15.0, f"{job}'s rank series")
    return seen


@pytest.fixture
def bounded_collector():
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=None, max_series_per_job=4).running() as c:
        yield c


def claim_ranks(target: str, job: str) -> list[OpenStream]:
    return [OpenStream(target, hello(job, rank=rank, world_size=RANKS)) for rank in range(RANKS)]


def test_many_ranks_make_at_most_max_series_rank_series_the_stale_first(bounded_collector) -> None:
    c = bounded_collector
    streams = claim_ranks(c.grpc_target, "wide")
    try:
        live = rank_series(c.metrics_url, "wide")
        assert live == {"0": 0.0, "1": 0.0, "2": 0.0, OTHER: 0.0}  # 4 series, not 12

        for rank in (5, 9):  # two agents crash: their ranks are stale, and shown by name
            streams[rank].cancel()
        expected = {"0": 0.0, "5": 1.0, "9": 1.0, OTHER: 0.0}
        assert settles_to(c.metrics_url, "wide", expected) == expected

        for rank in (2, 7, 11):  # more stale ranks than series: the rest of them are in __other__
            streams[rank].cancel()
        expected = {"2": 1.0, "5": 1.0, "7": 1.0, OTHER: 1.0}
        assert settles_to(c.metrics_url, "wide", expected) == expected
    finally:
        for s in streams:
            s.cancel()


def test_a_job_within_the_bound_keeps_one_series_per_rank(bounded_collector) -> None:
    c = bounded_collector
    streams = [OpenStream(c.grpc_target, hello("narrow", rank=rank, world_size=4)) for rank in range(4)]
    try:
        streams[3].cancel()
        expected = {"0": 0.0, "1": 0.0, "2": 0.0, "3": 1.0}
        assert settles_to(c.metrics_url, "narrow", expected) == expected
    finally:
        for s in streams:
            s.cancel()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool comes with Debian's prometheus")
def test_a_scrape_with_folded_ranks_passes_promtool(bounded_collector) -> None:
    c = bounded_collector
    streams = claim_ranks(c.grpc_target, "wide")
    try:
        streams[4].cancel()
        settles_to(c.metrics_url, "wide", {"0": 0.0, "1": 0.0, "4": 1.0, OTHER: 0.0})
        with urllib.request.urlopen(c.metrics_url, timeout=30) as resp:
            body = resp.read()
        assert f'thermoscope_rank_stale{{job_id="wide",rank="{OTHER}"}} 0.0'.encode() in body
        result = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, timeout=30)
        assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
        assert result.stdout.decode().strip() == "" and result.stderr.decode().strip() == ""
    finally:
        for s in streams:
            s.cancel()
