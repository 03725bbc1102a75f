"""Fuzzing: hypothesis-generated raw bytes and hostile messages against a real collector over a
real channel. Every call ends with a defined status, the collector keeps serving, and its
resident memory stays bounded. 10,000 cases in all, derandomized (the same cases every run);
tests/bench/fuzz_long.py runs the same strategies for longer."""

from __future__ import annotations

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings

from thermoscope.collector.service import Collector

from helpers import fuzzing

pytestmark = pytest.mark.slow  # the last test checks what the two fuzz runs left

RAW_CASES = 4_000
HOSTILE_CASES = 6_000
RSS_BOUND = 200 << 20

FUZZ = settings(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    """One collector (in this process) and one client for the whole file; RSS before the cases."""
    db = tmp_path_factory.mktemp("fuzz") / "events.db"
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=db, **fuzzing.COLLECTOR_SETTINGS).running() as c:
        client = fuzzing.Client(c.grpc_target)
        try:
            yield c, client, fuzzing.rss_bytes()
        finally:
            client.close()


def _serving(target: str) -> bool:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="thermoscope.v1.Telemetry"), timeout=5
        )
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def test_raw_bytes_end_with_a_defined_status(fuzzed) -> None:
    collector, client, _ = fuzzed

    @settings(FUZZ, max_examples=RAW_CASES)
    @given(fuzzing.raw_streams())
    def case(requests: list[bytes]) -> None:
        client.send(requests)

    case()
    assert _serving(collector.grpc_target)


def test_hostile_messages_end_with_a_defined_status(fuzzed) -> None:
    collector, client, _ = fuzzed

    @settings(FUZZ, max_examples=HOSTILE_CASES)
    @given(fuzzing.hostile_streams())
    def case(requests: list[bytes]) -> None:
        client.send(requests)

    case()
    assert _serving(collector.grpc_target)
    # the hostile cases reach every kind of outcome, not only the first check
    assert {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED} <= set(
        client.statuses
    )
    assert len(collector.jobs) <= fuzzing.COLLECTOR_SETTINGS["max_jobs"]


def test_after_the_fuzz_the_collector_serves_and_its_memory_is_bounded(fuzzed) -> None:
    collector, client, rss_before = fuzzed
    assert sum(client.statuses.values()) >= RAW_CASES + HOSTILE_CASES
    assert _serving(collector.grpc_target)
    assert fuzzing.rss_bytes() - rss_before < RSS_BOUND
