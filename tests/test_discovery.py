"""Agents that look for their collector: they sample from their first step and deliver what they
sampled once the link is up; only a lookup that found no collector makes them dormant (no hook,
no sample) until one is found."""

from __future__ import annotations

import threading
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


def wait_for(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_a_monitor_told_there_is_no_collector_is_dormant_and_arms_no_hook() -> None:
    model, opt = small_model(8, 16, nn.ReLU, lr=0.01)
    monitor = Monitor(model, opt, collector=lambda: None, every=1)
    wait_for(lambda: monitor.dormant, "the first lookup did not answer")
    train_steps(monitor, model, opt, 1)  # (the step armed before the answer came, if any)
    sampled = monitor.sampled
    train_steps(monitor, model, opt, 20)
    assert monitor.dormant
    assert not monitor._sampler.armed  # no hook ran on any of the steps
    assert monitor.sampled == sampled <= 1
    assert monitor.close(timeout=1) is (sampled == 0)  # a sample taken and never delivered is not


def test_steps_sampled_before_the_first_lookup_answers_are_delivered_once_it_finds_the_collector(
    collector: Collector,
) -> None:
    """A lookup that takes its time (a Ray actor being looked up): the steps meanwhile are sampled,
    queued, and delivered; `close()` is True because every sampled step arrived."""
    answer = threading.Event()

    def slow_lookup() -> str:
        answer.wait(30)
        return collector.grpc_target

    model, opt = small_model(8, 16, nn.ReLU, lr=0.01)
    monitor = Monitor(model, opt, collector=slow_lookup, job="early", every=2)
    train_steps(monitor, model, opt, 20)  # while the lookup is under way
    assert not monitor.dormant and not monitor.connected and "early" not in collector.jobs
    answer.set()
    train_steps(monitor, model, opt, 4)
    assert monitor.close(timeout=20)
    assert (monitor.delivered, monitor.dropped) == (12, 0)
    assert collector.jobs["early"].frames_received == 12


def test_steps_sampled_while_the_collector_from_the_environment_comes_up_are_all_delivered(
    collector: Collector, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`THERMOSCOPE_COLLECTOR` names it (the docs' examples): a short loop closes before or
    while the link comes up, and still delivers each of its sampled steps."""
    monkeypatch.setenv("THERMOSCOPE_COLLECTOR", collector.grpc_target)
    model, opt = small_model(8, 16, nn.ReLU, lr=0.01)
    monitor = Monitor(model, opt, collector=discovery.find_collector, job="short", every=5)
    train_steps(monitor, model, opt, 20)
    assert monitor.close(timeout=20)
    assert (monitor.delivered, monitor.dropped) == (4, 0)
    assert collector.jobs["short"].frames_received == 4


def test_a_dormant_monitor_streams_within_two_intervals_of_the_collector_appearing(
    collector: Collector,
) -> None:
    found: list[str] = []
    model, opt = small_model(8, 16, nn.ReLU, lr=0.01)
    monitor = Monitor(model, opt, collector=lambda: found[0] if found else None, job="late", every=1)
    wait_for(lambda: monitor.dormant, "the first lookup did not answer")
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
    assert job.frames_received == monitor.delivered >= 9  # armed again once it found the collector
    assert monitor.dropped == 0


def test_a_failing_lookup_keeps_the_agent_dormant_and_the_training_running() -> None:
    def broken() -> str:
        raise RuntimeError("the cluster is unreachable")

    model, opt = small_model(8, 16, nn.ReLU, lr=0.01)
    monitor = Monitor(model, opt, collector=broken, every=1)
    time.sleep(3 * INTERVAL)  # several failed lookups
    train_steps(monitor, model, opt, 5)
    assert monitor.dormant and monitor.sink._thread.is_alive()
    assert "unreachable" in monitor.last_error
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
