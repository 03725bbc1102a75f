"""Training is never blocked by its collector: one that stalls the stream, or one that is down.

The agent's memory stays within its queue bound, its drops are counted (every sampled step is
delivered or dropped) and logged once. Step times are a benchmark's business, not a test's
(`tests/bench/bench_overhead.py`, the `stalled` and `down` arms).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from thermoscope.agent.monitor import Monitor

from helpers.processes import free_port
from helpers.protocol import stalled_collector
from helpers.training import train_steps

MAX_QUEUE = 8
STEPS = 400


@pytest.fixture
def stalling_server() -> Iterator[str]:
    with stalled_collector() as target:
        yield target


def train_against(target: str, caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(16, 16) for _ in range(20)))  # 40 layers: ~1.6 kB frames, cheap steps
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = Monitor(model, opt, collector=target, job="blocked", every=1, max_queue=MAX_QUEUE)
    sender = monitor.sink
    longest = 0
    with caplog.at_level(logging.WARNING, logger="thermoscope.agent"):
        for _ in range(STEPS):
            train_steps(monitor, model, opt, 1)
            longest = max(longest, len(sender._queue))
        assert monitor.close(timeout=1.0) is False  # nothing could be delivered
    assert longest <= MAX_QUEUE
    assert sender.submitted == STEPS
    assert monitor.dropped > 0
    assert sender.submitted == sender.delivered + sender.dropped
    drops = [r for r in caplog.records if "dropping frames" in r.getMessage()]
    assert len(drops) == 1, [r.getMessage() for r in drops]


@pytest.mark.slow
def test_a_collector_that_never_reads_does_not_block_training(stalling_server, caplog) -> None:
    train_against(stalling_server, caplog)


@pytest.mark.slow
def test_a_collector_that_is_down_does_not_block_training(caplog) -> None:
    train_against(f"127.0.0.1:{free_port()}", caplog)
