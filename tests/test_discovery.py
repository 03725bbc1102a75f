"""Agents that look for their collector: dormant (no hook, no sample) until they find one."""

from __future__ import annotations

import time

import pytest
from torch import nn

from thermoscope.agent import Monitor, discovery
from thermoscope.collector.service import Collector

from helpers.training import small_model, train_steps

INTERVAL = 0.2


@pytest.fixture(autouse=True)
def fast_discovery(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THERMOSCOPE_DISCOVERY_INTERVAL", str(INTERVAL))
    monkeypatch.delenv("THERMOSCOPE_COLLECTOR", raising=False)


def test_a_monitor_without_a_collector_to_find_is_dormant_and_arms_no_hook() -> None:
    model, opt = small_model(8, 16, nn.ReLU, lr=0.01)
    monitor = Monitor(model, opt, collector=lambda: None, every=1)
    train_steps(monitor, model, opt, 20)
    assert monitor.dormant
    assert not monitor._sampler.armed  # no hook ran on any of the steps
    assert monitor._sender.submitted == 0
    assert monitor.close(timeout=1)


def test_a_dormant_monitor_streams_within_two_intervals_of_the_collector_appearing(
    collector: Collector,
) -> None:
    found: list[str] = []
    model, opt = small_model(8, 16, nn.ReLU, lr=0.01)
    monitor = Monitor(model, opt, collector=lambda: found[0] if found else None, job="late", every=1)
    train_steps(monitor, model, opt, 5)
    assert monitor.dormant and "late" not in collector.jobs

    found.append(collector.grpc_target)
    appeared = time.monotonic()
    while monitor.dormant:
        assert time.monotonic() - appeared < 2 * INTERVAL + 1.0, "the agent did not find the collector"
        train_steps(monitor, model, opt, 1)
        time.sleep(0.01)
    train_steps(monitor, model, opt, 10)
    assert monitor.flush(5)
    monitor.close()
    job = collector.jobs["late"]
    assert job.frames_received == monitor.delivered >= 9  # armed from the step after it connected
    assert monitor.dropped == 0


def test_a_failing_lookup_keeps_the_agent_dormant_and_the_training_running() -> None:
    def broken() -> str:
        raise RuntimeError("the cluster is unreachable")

    model, opt = small_model(8, 16, nn.ReLU, lr=0.01)
    monitor = Monitor(model, opt, collector=broken, every=1)
    time.sleep(3 * INTERVAL)  # several failed lookups
    train_steps(monitor, model, opt, 5)
    assert monitor.dormant and monitor._sender._thread.is_alive()
    assert "unreachable" in monitor._sender.last_error
    monitor.close(timeout=1)


def test_the_collector_address_can_come_from_the_environment(
    collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("THERMOSCOPE_COLLECTOR", collector.grpc_target)
    assert discovery.find_collector() == collector.grpc_target


def test_a_bad_discovery_interval_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THERMOSCOPE_DISCOVERY_INTERVAL", "-1")
    with pytest.raises(ValueError, match="THERMOSCOPE_DISCOVERY_INTERVAL"):
        discovery.interval()


def test_without_ray_or_an_address_there_is_no_collector_to_find() -> None:
    assert discovery.find_collector() is None
