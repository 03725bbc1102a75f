"""A sampled step's cost is level: histograms and probes are spread over the samples.

Each layer's histogram and each site's engine probe are still taken once every SHAPE_EVERY
samples (and all of them on the first sample), but a sample takes only one share of them, of
about equal size, so that no sample costs much more than another (issue 15 item 3). A frame's
histogram row of zeros says that layer's histogram was not taken then; the readings keep each
layer's last one. The CUDA check counts the kernels a sampled step launches.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from thermoscope.agent import Monitor
from thermoscope.agent.histograms import shares
from thermoscope.agent.reduce import BLOCK, Buckets
from thermoscope.agent.sampler import SHAPE_EVERY, SUBSET, Sampler
from thermoscope.agent.tensors import power_sums

WIDTHS = [64, 128, 96, 256, 64, 200, 128, 300, 64, 80, 128, 32]


def deep(activation=nn.ReLU) -> nn.Sequential:
    """Linear layers of uneven sizes, each followed by an activation site."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(WIDTHS):
        layers += [nn.Linear(a, b), activation()]
    return nn.Sequential(*layers)


def samples(model: nn.Module, count: int) -> list:
    monitor = Monitor(model, every=1)
    out = []
    for _ in range(count):
        model(torch.randn(32, WIDTHS[0]))
        monitor.step(None)
        out.append(monitor.sink.pending[-1].to_sample())
    monitor.close()
    return out


def test_after_the_first_sample_each_sample_counts_one_share_of_the_layers_histograms() -> None:
    model = deep()
    taken = samples(model, 1 + 2 * SHAPE_EVERY)
    counted = [min(p.numel(), SUBSET) for p in model.parameters()]
    assert (taken[0].layers.histogram.sum(axis=1) == counted).all()  # the first: every layer
    rows = [
        np.zeros(len(counted), bool) if s.layers.histogram is None else s.layers.histogram.any(axis=1)
        for s in taken[1:]
    ]
    for period in (rows[:SHAPE_EVERY], rows[SHAPE_EVERY:]):
        # every layer once per SHAPE_EVERY samples, whole
        assert (np.sum(period, axis=0) == 1).all()
        # and no sample counts much more than an even share of the values
        values = [sum(c for c, r in zip(counted, row, strict=True) if r) for row in period]
        assert max(values) <= max(sum(counted) / SHAPE_EVERY, max(counted)) * 1.5
    for s in taken[1:]:
        if s.layers.histogram is not None:
            hist = s.layers.histogram
            taken_rows = hist.any(axis=1)
            assert (hist[taken_rows].sum(axis=1) == np.array(counted)[taken_rows]).all()


def test_each_sample_probes_one_share_of_the_sites() -> None:
    model = deep(nn.Tanh)
    taken = samples(model, 1 + SHAPE_EVERY)
    n_sites = len(WIDTHS) - 1
    assert (taken[0].sites.probe_spread >= 0).all()
    probed = np.array([s.sites.probe_spread >= 0 for s in taken[1:]])
    assert (probed.sum(axis=0) == 1).all()  # each site once per SHAPE_EVERY samples
    assert probed.sum(axis=1).max() <= -(-n_sites // SHAPE_EVERY)


def test_readings_keep_each_layers_histogram_entropy_until_it_is_counted_again() -> None:
    model = deep()
    monitor = Monitor(model, every=1)
    readings = []
    for _ in range(1 + SHAPE_EVERY):
        model(torch.randn(32, WIDTHS[0]))
        monitor.step(None)
        readings.append(monitor.latest())
    monitor.close()
    first = readings[0].layer_histogram_entropy
    # untrained and unchanged: every layer keeps the entropy its last histogram gave
    for r in readings[1:]:
        np.testing.assert_array_equal(r.layer_histogram_entropy, first)


def counted_rows(monitor: Monitor, steps: int) -> dict[int, np.ndarray]:
    """Per sampled step, the layers whose histogram the monitor's frame counted."""
    model, out = deep(), {}
    for _ in range(steps):
        model(torch.randn(32, WIDTHS[0]))
        monitor.step(None)
        while monitor.sink.pending:
            s = monitor.sink.pending.popleft().to_sample()
            out[s.step] = (
                np.zeros(len(s.layers.count), bool)
                if s.layers.histogram is None
                else s.layers.histogram.any(axis=1)
            )
    monitor.close()
    return out


def test_a_restarted_worker_counts_the_same_layers_histograms_as_the_other_ranks_at_each_step() -> None:
    every, restart, end = 2, 14, 2 * (1 + 2 * SHAPE_EVERY)
    steady = counted_rows(Monitor(deep(), every=every), end)
    restarted = counted_rows(Monitor(deep(), every=every, step=restart), end - restart)
    first = min(restarted)
    assert first == restart and restarted[first].all()  # its first frame: every layer's shape
    later = [s for s in restarted if s > first]
    assert len(later) >= SHAPE_EVERY
    for s in later:
        np.testing.assert_array_equal(restarted[s], steady[s], err_msg=f"step {s}")


def test_shares_split_the_layers_evenly_and_deterministically() -> None:
    sizes = [65536, 65536, 4096, 300, 300, 1, 90000, 65536, 65536, 1024]
    parts = shares(sizes, 4)
    assert sorted(i for p in parts for i in p) == list(range(len(sizes)))
    loads = [sum(sizes[i] for i in p) for p in parts]
    assert max(loads) - min(loads) <= max(sizes)
    assert parts == shares(sizes, 4)


def test_the_sampler_holds_a_small_share_of_the_parameters_between_steps() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(4)])
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    monitor = Monitor(model, opt, every=1)
    model(torch.randn(8, 1024)).square().mean().backward()
    opt.step()
    monitor.step(None)  # now holding its update d_t for the next step's gradient
    held = monitor._sampler.held_bytes()
    monitor.close()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    # the work's subset of each large layer and the histograms' indices, not a copy of the model
    assert 0 < held < 0.5 * params


@pytest.mark.skipif(not torch.cuda.is_available(), reason="counts CUDA kernel launches")
def test_a_sampled_steps_kernel_launches_do_not_grow_with_the_number_of_tensors() -> None:
    from torch.profiler import ProfilerActivity, profile

    def launches(n_layers: int) -> int:
        width = 2048 // n_layers
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(width, width) for _ in range(n_layers)]).cuda()
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)
        monitor = Monitor(model, opt, every=1)
        for _ in range(3):  # past the first sample, which takes every histogram
            model(torch.randn(8, width, device="cuda")).square().mean().backward()
            opt.step()
            opt.zero_grad()
            monitor.step(None)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            monitor._sampler._measure_state()
        monitor.close()
        return sum(e.count for e in prof.key_averages() if e.key in ("cudaLaunchKernel", "cuLaunchKernel"))

    assert launches(32) <= 2 * launches(4)


def test_bucketed_moments_equal_the_float64_truth_for_every_dtype_and_size() -> None:
    torch.manual_seed(0)
    sizes = [BLOCK, BLOCK + 1, 3 * BLOCK - 7, 70_000, 1, 65_536]
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.float64, torch.bfloat16, torch.float32]
    tensors = [(torch.randn(n) * 0.02 + 0.001).to(d) for n, d in zip(sizes, dtypes, strict=True)]
    sums, sumsqs = Buckets(sizes, dtypes, torch.device("cpu")).moments(tensors)
    for t, s, q in zip(tensors, sums, sumsqs, strict=True):
        v = t.double()
        assert s.dtype == q.dtype == torch.float64
        assert float(s) == pytest.approx(float(v.sum()), abs=1e-6 * float(v.abs().sum()))
        assert float(q) == pytest.approx(float(v.square().sum()), rel=1e-6)


def test_the_fused_sampler_reads_the_float64_truth_and_the_per_tensor_ones_histograms() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 300), nn.Linear(300, 8))
    model[2].to(torch.bfloat16)
    values = [p.detach().double().reshape(-1) for p in model.parameters()]
    fused, plain = (
        Sampler(model, list(model.named_parameters()), [], fused=f)._measure_state() for f in (True, False)
    )
    torch.testing.assert_close(fused[0], torch.stack([v.sum() for v in values]), rtol=0, atol=1e-6)
    torch.testing.assert_close(fused[1], torch.stack([v.square().sum() for v in values]), rtol=1e-6, atol=0)
    torch.testing.assert_close(fused[2], plain[2], rtol=0, atol=0)


def test_a_fused_samples_reductions_do_not_grow_with_the_number_of_tensors() -> None:
    """The CPU stand-in for the CUDA launch count: the reducing ops `_measure_state` dispatches."""
    from torch.profiler import ProfilerActivity, profile

    def reductions(n_layers: int) -> int:
        torch.manual_seed(0)
        model = nn.Sequential(*[nn.Linear(256, 256) for _ in range(n_layers)])
        sampler = Sampler(model, list(model.named_parameters()), [], fused=True)
        sampler.arm(0)  # past the first sample, which takes every histogram: sample 1's share
        sampler.collect(0, None)
        sampler.disarm()
        sampler.arm(1)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            sampler._measure_state()
        sampler.disarm()
        ops = (
            "aten::sum",
            "aten::linalg_vector_norm",
            "aten::dot",
            "aten::index_add_",
            "aten::_foreach_copy_",
        )
        return sum(e.count for e in prof.key_averages() if e.key in ops)

    assert reductions(32) == reductions(4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_site_power_sums_read_an_activation_in_place_without_a_copy(dtype) -> None:
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    activation = (torch.randn(64, 256) + 0.5).to(dtype).t()  # not contiguous, as a transposed head
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        sums = power_sums(activation)
    copies = [e.key for e in prof.key_averages() if e.key in ("aten::copy_", "aten::clone", "aten::_to_copy")]
    assert copies == []
    v = activation.double()
    torch.testing.assert_close(sums.double(), torch.stack([v.sum(), v.square().sum()]), rtol=1e-5, atol=1e-3)


def test_a_bfloat16_activation_is_widened_at_most_once_on_a_cpu() -> None:
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    activation = (torch.randn(64, 256) + 0.5).bfloat16()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        sums = power_sums(activation)
    assert sum(e.count for e in prof.key_averages() if e.key == "aten::_to_copy") <= 1
    v = activation.double()
    torch.testing.assert_close(sums.double(), torch.stack([v.sum(), v.square().sum()]), rtol=1e-5, atol=1e-3)
