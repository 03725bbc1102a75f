"""The site table grows as sites are first applied: an MoE expert first given tokens after the first
sampled step gets its site then (in-process, and at a real collector process, by a new hello on
a new stream, nothing lost), and a site module that is never called is no site at all."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from torch import nn

from thermoscope.agent.monitor import Monitor
from thermoscope.science.derive import WINDOW

from helpers.metrics import scrape, wait_until
from helpers.processes import CollectorProcess

EXPERTS, VOCAB, STEPS = 8, 64, 12


def tiny_mixtral() -> transformers.MixtralForCausalLM:
    """A one-layer Mixtral of 8 experts, one per token, its experts run one by one (the eager
    loop: the fused grouped matmul applies one activation to every expert's tokens at once)."""
    torch.manual_seed(0)
    config = transformers.MixtralConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, num_local_experts=EXPERTS,
        num_experts_per_tok=1, max_position_embeddings=16, experts_implementation="eager",
    )  # fmt: skip
    return transformers.MixtralForCausalLM(config).train()


def train(model: nn.Module, monitor: Monitor, read: bool = False) -> list[list[str]]:
    """STEPS AdamW steps on two tokens each (few experts a step); the site table after each
    (`read`: and the in-process reading derived after each)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tables = []
    for step in range(STEPS):
        ids = torch.randint(0, VOCAB, (1, 2), generator=torch.Generator().manual_seed(step))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        monitor.step(loss)
        if read:
            monitor.latest()
        tables.append([s.name for s in monitor.sites])
    return tables


EXPERT_SITE = "model.layers.0.mlp.experts.act_fn[{}]"


def test_an_moe_expert_first_given_tokens_later_gets_its_site_then() -> None:
    model = tiny_mixtral()
    monitor = Monitor(model, every=1)
    tables = train(model, monitor, read=True)
    reading = monitor.latest()
    thermometer = monitor.sink.thermometer
    monitor.close()
    first, last = set(tables[0]), set(tables[-1])
    assert 0 < len(first) < len(last)  # experts joined after the first sampled step
    assert all(a == b[: len(a)] for a, b in itertools.pairwise(tables))  # it only grows
    assert last <= {EXPERT_SITE.format(e) for e in range(EXPERTS)}  # one site per expert, by index
    assert reading is not None and list(reading.site_names) == tables[-1]
    used = [e for e in reading.site_efficiency if not math.isnan(e)]
    assert used and all(0 < e < 1 for e in used)  # the experts that ran on the last step read
    # one thermometer took each grown table and went on: its window holds samples from before
    assert thermometer is not None and list(thermometer._steps)[-WINDOW:] == list(range(STEPS))[-WINDOW:]


@pytest.mark.parametrize("spooled", [False, True])
def test_a_grown_site_table_reaches_a_collector_process_by_a_new_stream(
    collector_process: CollectorProcess, tmp_path: Path, spooled: bool
) -> None:
    model = tiny_mixtral()
    spool = tmp_path / "spool" if spooled else None
    monitor = Monitor(model, collector=collector_process.grpc_target, job="moe", every=1, spool=spool)
    tables = train(model, monitor)
    assert monitor.close(30), monitor.last_error  # every step delivered and durable
    assert (monitor.dropped, monitor.delivered) == (0, STEPS)
    assert len(tables[0]) < len(tables[-1])
    scraped = scrape(collector_process.metrics_url)
    exported = {
        dict(labels)["site"]
        for name, labels in scraped
        if name == "thermoscope_site_efficiency_ratio" and dict(labels).get("job_id") == "moe"
    }
    assert exported == set(tables[-1])  # the sites that joined later are the job's too
    step = scraped[("thermoscope_last_step", frozenset({"job_id": "moe"}.items()))]
    assert step == STEPS - 1


def test_ranks_that_used_different_experts_merge_by_site_name(collector_process: CollectorProcess) -> None:
    """Two data-parallel ranks whose tables grew apart (each gives tokens to its own experts):
    the job's sites are the union, a site a rank has not used counting 0 values there. (Each
    rank's step is delivered before the next is taken: a rank declares a grown table on a new
    stream, and the collector merges a step that reaches it while no stream of that rank is
    open without it: docs/science.md, section 5.)"""
    models = [tiny_mixtral(), tiny_mixtral()]
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in models]
    monitors = [
        Monitor(
            m, collector=collector_process.grpc_target, job="dp-moe", run="r", rank=r, world_size=2, every=1
        )
        for r, m in enumerate(models)
    ]
    for step in range(STEPS):
        for rank, (model, opt, monitor) in enumerate(zip(models, opts, monitors, strict=True)):
            seed = 1000 * rank + step
            ids = torch.randint(0, VOCAB, (1, 2), generator=torch.Generator().manual_seed(seed))
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            monitor.step(loss)
            wait_until(lambda m=monitor, n=step + 1: m.delivered == n, 30, f"rank {rank} step {step}")
    closed = [m.close(30) for m in monitors]
    assert all(closed), [(m.delivered, m.dropped, m.undurable, m.spooled, m.last_error) for m in monitors]
    tables = [{s.name for s in m.sites} for m in monitors]
    assert tables[0] != tables[1]
    scraped = scrape(collector_process.metrics_url)
    exported = {
        dict(labels)["site"]
        for name, labels in scraped
        if name == "thermoscope_site_efficiency_ratio" and dict(labels).get("job_id") == "dp-moe"
    }
    assert exported == tables[0] | tables[1]
    assert scraped[("thermoscope_last_step", frozenset({"job_id": "dp-moe"}.items()))] == STEPS - 1


class Unused(nn.Module):
    """A block holding an activation its forward never calls (as Mamba's `mixer.act` on the path
    that does not use it)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.act, self.idle = nn.Linear(8, 8), nn.GELU(), nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


def test_a_site_module_never_called_is_not_a_site() -> None:
    torch.manual_seed(0)
    model = Unused()
    monitor = Monitor(model, every=1)
    assert [s.name for s in monitor.sites] == ["act", "idle"]  # candidates, before the first step
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(3):
        loss = model(torch.randn(32, 8)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        monitor.step(loss)
    reading = monitor.latest()
    monitor.close()
    assert [s.name for s in monitor.sites] == ["act"]
    assert reading is not None and list(reading.site_names) == ["act"]
    assert not np.isnan(reading.site_efficiency).any()


def test_mamba_on_its_cpu_path_has_no_never_called_site_and_two_silu_applications() -> None:
    """transformers' Mamba off CUDA runs its reference path: `mixer.act` is never called there,
    and each mixer applies F.silu twice (to the convolution's output and to the gate)."""
    torch.manual_seed(0)
    config = transformers.MambaConfig(
        vocab_size=VOCAB, hidden_size=32, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=4
    )
    model = transformers.MambaForCausalLM(config).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    monitor = Monitor(model, opt, every=1)
    for step in range(3):
        ids = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(step))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        monitor.step(loss)
    reading = monitor.latest()
    monitor.close()
    assert reading is not None
    names = list(reading.site_names)
    assert not [n for n in names if n.endswith("mixer.act")]
    for layer in (0, 1):
        assert {f"backbone.layers.{layer}.mixer:silu", f"backbone.layers.{layer}.mixer:silu#2"} <= set(names)
    assert not np.isnan(reading.site_efficiency).any()
