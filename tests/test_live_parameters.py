"""The monitor follows the live model: a module replaced mid-run is measured from the next sampled
step on (a new layer table, streamed as a new run of the job), and an optimizer rebuilt mid-run is
measured in place of the old one; each change is logged once.

On a tiny Llama built from a transformers config (tests/helpers/architectures.py), trained with
AdamW and SGD with momentum at real learning rates, in-process and against a real collector process.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from thermoscope.agent import Monitor

from helpers.architectures import VOCAB, Arch, build
from helpers.metrics import scrape, wait_until
from helpers.reference import entropy64

BEFORE, AFTER = 4, 6  # steps before the change, and after it


def new_head(arch: Arch) -> nn.Linear:
    """A fresh output layer for the model (as a fine-tuning's new head), seeded."""
    torch.manual_seed(1)
    return nn.Linear(arch.model.config.hidden_size, VOCAB, bias=False)


def train(arch: Arch, opt: torch.optim.Optimizer, monitor: Monitor, steps: range) -> torch.Tensor:
    """Monitored steps; returns lm_head's weight at the last step, before its update (theta_t of
    the last sample)."""
    for step in steps:
        loss = arch.loss(step)
        loss.backward()
        before = arch.model.lm_head.weight.detach().clone()
        opt.step()
        opt.zero_grad()
        monitor.step(loss)
    return before


def changes_logged(caplog: pytest.LogCaptureFixture, words: str) -> int:
    return sum(words in r.getMessage() for r in caplog.records if r.name == "thermoscope.agent")


def test_a_replaced_lm_head_is_measured_from_the_next_sample_on_and_logged_once(caplog) -> None:
    arch = build("llama")
    opt = torch.optim.AdamW(arch.model.parameters(), lr=1e-3)
    monitor = Monitor(arch.model, opt, every=1, job="live", run="r1")
    old = train(arch, opt, monitor, range(BEFORE))
    layer = [layer.name for layer in monitor.layers].index("lm_head.weight")
    assert monitor.latest().layer_entropy[layer] == pytest.approx(entropy64(old), rel=1e-6)

    with caplog.at_level(logging.INFO, logger="thermoscope.agent"):
        arch.model.lm_head = new_head(arch)
        initial = arch.model.lm_head.weight.detach().clone()
        opt.add_param_group({"params": arch.model.lm_head.parameters()})
        last = train(arch, opt, monitor, range(BEFORE, BEFORE + AFTER))
    reading = monitor.latest()

    assert changes_logged(caplog, "parameters changed") == 1
    assert monitor.run == f"r1@{BEFORE}"  # a new table is a new run
    assert reading.step == BEFORE + AFTER - 1 and reading.layer_names[layer] == "lm_head.weight"
    # the new tensor's entropy, not the old one's, and it moves as the new head learns
    assert reading.layer_entropy[layer] == pytest.approx(entropy64(last), rel=1e-6)
    assert entropy64(last) != pytest.approx(entropy64(initial), rel=1e-6)
    assert np.isfinite(reading.layer_work[layer]) and reading.layer_work[layer] != 0
    monitor.close()


@pytest.mark.parametrize(
    "rebuild",
    [
        lambda params: torch.optim.AdamW(params, lr=1e-3),
        lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    ],
    ids=["adamw", "sgd-momentum"],
)
def test_a_rebuilt_optimizer_is_adopted_and_every_layer_keeps_its_work(caplog, rebuild) -> None:
    arch = build("llama")
    opt = torch.optim.AdamW(arch.model.parameters(), lr=1e-3)
    monitor = Monitor(arch.model, opt, every=1)
    train(arch, opt, monitor, range(BEFORE))
    working = np.count_nonzero(monitor.latest().layer_work)

    with caplog.at_level(logging.INFO, logger="thermoscope.agent"):
        opt = rebuild(arch.model.parameters())  # the loop's new optimizer; the old one is gone
        for start in range(BEFORE, BEFORE + AFTER, 2):
            train(arch, opt, monitor, range(start, start + 2))
            assert np.count_nonzero(monitor.latest().layer_work) == working
    assert working == len(monitor.layers)
    assert changes_logged(caplog, f"a new {type(opt).__name__}") == 1
    assert monitor.latest().step == BEFORE + AFTER - 1
    monitor.close()


@pytest.mark.parametrize("spooled", [False, True], ids=["no-spool", "spool"])
def test_a_replaced_module_streams_its_new_table_to_a_real_collector_as_a_new_run(
    collector_process, tmp_path, spooled
) -> None:
    arch = build("llama")
    opt = torch.optim.SGD(arch.model.parameters(), lr=0.1, momentum=0.9)
    spool = tmp_path / "spool" if spooled else None
    monitor = Monitor(
        arch.model, opt, collector=collector_process.grpc_target, job="live", run="r1", every=1, spool=spool
    )
    train(arch, opt, monitor, range(BEFORE))
    arch.model.lm_head = new_head(arch)
    opt.add_param_group({"params": arch.model.lm_head.parameters()})
    last = train(arch, opt, monitor, range(BEFORE, BEFORE + AFTER))
    assert monitor.close(timeout=15)  # every step of both tables delivered and durable
    assert monitor.delivered == BEFORE + AFTER - 1  # the step of the change read the old head: not sent
    if spool is not None:  # each table's spool emptied as the collector made its frames durable
        assert not list(spool.glob("*.spool"))

    url = collector_process.metrics_url
    labels = frozenset({"job_id": "live", "layer": "lm_head.weight"}.items())
    last_step = ("thermoscope_last_step", frozenset({"job_id": "live"}.items()))
    wait_until(lambda: scrape(url).get(last_step) == BEFORE + AFTER - 1, 15, "the new run's last step")
    metrics = scrape(url)
    assert metrics[("thermoscope_layer_entropy_nats", labels)] == pytest.approx(entropy64(last), rel=1e-6)
    assert metrics[("thermoscope_layer_work", labels)] != 0
