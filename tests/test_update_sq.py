"""Each layer's update sum of squares, sum (theta_{t+1} - theta_t)^2 of a sampled step (the findings'
update-to-weight ratio): the agent's is exact on small layers and unbiased on a large layer's work
blocks, against float64 truths from theta before and after the step; it survives the wire, the
merge of shards (summed) and of replicas (one copy), a node aggregator and a saved state; and a
frame of an agent before it (no column) reads NaN, "not sent", never 0 nor a non-finite count.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from thermoscope.agent import Monitor
from thermoscope.collector.merge import JobMerge
from thermoscope.science.stats import LayerInfo, LayerStats, Sample, SiteInfo, SiteStats
from thermoscope.wire import codec

SITES: list[SiteInfo] = []


def sampled(model: nn.Module, opt: torch.optim.Optimizer, monitor: Monitor, steps: int, at: int):
    """Train `steps` steps on a fixed task; the agent's samples, and the float64 truth of every
    layer's sum (theta_{t+1} - theta_t)^2 at step `at`."""
    gen = torch.Generator().manual_seed(1)
    truth = []
    for step in range(steps):
        x = torch.randn(64, 16, generator=gen)
        loss = nn.functional.mse_loss(model(x), x[:, :1] * 2)
        opt.zero_grad()
        loss.backward()
        before = [p.detach().double().clone() for p in model.parameters()]
        opt.step()
        if step == at:
            truth = [
                float((p.detach().double() - b).square().sum())
                for p, b in zip(model.parameters(), before, strict=True)
            ]
        monitor.step(loss)
    samples = [pending.to_sample() for pending in monitor.sink.pending]
    monitor.close()
    return samples, truth


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 300), nn.ReLU(), nn.Linear(300, 300), nn.Tanh(), nn.Linear(300, 1))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_update_sq_is_exact_against_a_direct_float64_computation(optimizer: str) -> None:
    model = mlp()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=1e-2) if optimizer == "sgd" else torch.optim.Adam(params, lr=1e-3)
    # a subset above the 300 x 300 layer's size: every layer read whole, so exact
    monitor = Monitor(model, opt, every=5, subset=1 << 17)
    samples, truth = sampled(model, opt, monitor, steps=21, at=20)
    sample = next(s for s in samples if s.step == 20)
    assert sample.layers.update_sq == pytest.approx(truth, rel=1e-9)
    assert min(truth) > 0


def test_a_frozen_layer_sends_an_update_of_exactly_zero() -> None:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    model[2].weight.requires_grad_(False)  # frozen: SGD skips a parameter without a gradient
    monitor = Monitor(model, opt, every=5, subset=1 << 17)
    samples, truth = sampled(model, opt, monitor, steps=21, at=20)
    sample = next(s for s in samples if s.step == 20)
    frozen = [name for name, _ in model.named_parameters()].index("2.weight")
    assert truth[frozen] == 0.0
    assert sample.layers.update_sq[frozen] == 0.0
    assert sample.layers.update_sq == pytest.approx(truth, rel=1e-9)


def test_a_large_layers_update_sq_is_estimated_on_its_work_blocks_scaled_to_the_layer() -> None:
    """A 300 x 300 layer read on 8192 of its 90,000 values (n/k ~ 11): each sample's estimate is
    within a few tens of percent of the truth, and their mean over samples within a few percent
    (unbiased: the blocks are redrawn every sample)."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    monitor = Monitor(model, opt, every=1, subset=8192)
    gen = torch.Generator().manual_seed(1)
    ratios = []
    for _ in range(40):
        x = torch.randn(64, 16, generator=gen)
        loss = nn.functional.mse_loss(model(x), x[:, :1] * 2)
        opt.zero_grad()
        loss.backward()
        before = model[2].weight.detach().double().clone()
        opt.step()
        truth = float((model[2].weight.detach().double() - before).square().sum())
        monitor.step(loss)
        ratios.append(monitor.sink.pending[-1].to_sample().layers.update_sq[2] / truth)
    monitor.close()
    assert max(abs(r - 1) for r in ratios) < 0.5
    assert np.mean(ratios) == pytest.approx(1.0, abs=0.05)


def sample(update_sq: list[float] | None, count: list[int], step: int = 3) -> Sample:
    n = len(count)
    layers = LayerStats(
        count=np.array(count, dtype=np.int64),
        mean=np.zeros(n),
        m2=np.ones(n),
        dot_before=np.zeros(n),
        dot_after=np.zeros(n),
        histogram=None,
        update_sq=None if update_sq is None else np.array(update_sq),
    )
    none = np.zeros(0)
    sites = SiteStats(np.zeros(0, dtype=np.int64), none, none, none, none, none)
    return Sample(step, 1.7e9, 1.0, layers, sites)


def through_wire(s: Sample) -> Sample:
    return codec.decode(codec.encode(s, seq=1).frame, len(s.layers), 0, bins=4)


def test_update_sq_survives_the_wire() -> None:
    decoded = through_wire(sample([0.0, 2.5e-7, 3.0], [4, 5, 6]))
    assert decoded.layers.update_sq.tolist() == [0.0, 2.5e-7, 3.0]


def test_an_older_agents_frame_without_the_column_decodes_to_nan_and_counts_nothing() -> None:
    frame = codec.encode(sample([1.0, 2.0], [4, 5]), seq=1).frame
    frame.layers.ClearField("update_sq")  # what an agent before the column sends
    nonfinite: dict[str, int] = {}
    decoded = codec.decode(frame, 2, 0, bins=4, nonfinite=nonfinite)
    assert np.isnan(decoded.layers.update_sq).all()
    assert decoded.layers.m2.tolist() == [1.0, 1.0]  # the rest of the row is kept
    assert nonfinite == {}


def test_a_negative_or_misfit_update_sq_column_is_refused_with_its_name() -> None:
    with pytest.raises(codec.WireError, match="update_sq has negative values"):
        through_wire(sample([1.0, -1.0], [4, 5]))
    frame = codec.encode(sample([1.0, 2.0], [4, 5]), seq=1).frame
    frame.layers.update_sq = frame.layers.update_sq[:8]
    with pytest.raises(codec.WireError, match=r"layer\.update_sq holds 8 bytes"):
        codec.decode(frame, 2, 0, bins=4)


def test_a_sharded_layers_update_sq_sums_over_its_shards_and_a_replicas_is_taken_once() -> None:
    """Two ranks: layer "rep" a replica on both (the same update), layer "sh" split in two shards."""
    tables = {
        r: ([LayerInfo("rep", (4,), 4, "float32"), LayerInfo("sh", (2, 3), 3, "float32", r, 2)], SITES)
        for r in range(2)
    }
    parts = {0: through_wire(sample([0.5, 1.25], [4, 3])), 1: through_wire(sample([0.5, 2.0], [4, 3]))}
    merged = JobMerge().merge(3, parts, tables, ["rep", "sh"], [])
    assert merged.layers.update_sq.tolist() == [0.5, 3.25]
    # a rank of an older agent makes the layers it holds "not sent", not smaller
    parts[1] = codec.decode(_without_update_sq(parts[1]), 2, 0, bins=4)
    merged = JobMerge().merge(3, parts, tables, ["rep", "sh"], [])
    assert merged.layers.update_sq[0] == 0.5 and math.isnan(merged.layers.update_sq[1])


def _without_update_sq(s: Sample):
    frame = codec.encode(s, seq=1).frame
    frame.layers.ClearField("update_sq")
    return frame


def test_update_sq_survives_a_saved_state_and_a_state_saved_before_it_reads_nan() -> None:
    s = sample([1.0, 2.0], [4, 5])
    assert Sample.from_state(s.to_state()).layers.update_sq.tolist() == [1.0, 2.0]
    older = s.to_state()
    del older["layers"]["update_sq"]
    assert np.isnan(Sample.from_state(older).layers.update_sq).all()
