"""Each application of a nonlinearity is its own site, found however the forward writes it: a loop
calling one function, a `torch.where` leaky ReLU, a hand-written swish `h * sigmoid(h)`, a GLU,
and a checkpointed block whose recompute fires its hooks again (counted once)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from thermoscope.agent.monitor import Monitor
from thermoscope.science.stats import Sample

from helpers.reference import efficiency64

WIDTH, ROWS = 16, 4096


def sampled(model: nn.Module, x: torch.Tensor, backward: bool = False) -> tuple[Monitor, Sample]:
    """One sampled step of `model` on `x` (with its backward pass if `backward`): the monitor and
    the step's sample."""
    monitor = Monitor(model, every=1)
    out = model(x)
    if backward:
        out.square().mean().backward()
    sample = monitor._sampler.collect(0, None).to_sample()
    monitor._sampler.disarm()
    monitor.close()
    return monitor, sample


def efficiencies(sample: Sample) -> np.ndarray:
    return 1 - sample.sites.out_m2 / sample.sites.in_m2


class Blocks(nn.Module):
    """Three blocks in one forward, one `F.silu` each: three applications of one function."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.ModuleList(nn.Linear(WIDTH, WIDTH) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for fc in self.fc:
            x = F.silu(fc(x))
        return x


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = Blocks()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def test_a_loop_calling_silu_three_times_makes_three_sites_named_by_call_order() -> None:
    torch.manual_seed(0)
    model, x = Net(), torch.randn(ROWS, WIDTH)
    monitor, sample = sampled(model, x)
    names = ["blocks:silu", "blocks:silu#2", "blocks:silu#3"]
    assert [s.name for s in monitor.sites] == names
    assert list(sample.sites.count) == [ROWS * WIDTH] * 3  # each counts its own values, once
    with torch.no_grad():  # each site reads its own application's input, in float64
        z, truths = x, []
        for fc in model.blocks.fc:
            z = fc(z)
            truths.append(efficiency64(z, F.silu(z)))
            z = F.silu(z)
    assert efficiencies(sample) == pytest.approx(truths, abs=1e-5)
    again, _ = sampled(Net(), x)  # another model of the same code: the same names
    assert [s.name for s in again.sites] == names


class ScaledAfter(nn.Module):
    """An activation's output scaled in place right after it is applied."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = F.gelu(self.fc(x))
        a.mul_(2)
        return a


def test_an_output_changed_in_place_after_its_application_counts_as_the_function_made_it() -> None:
    torch.manual_seed(0)
    model, x = ScaledAfter(), torch.randn(ROWS, WIDTH)
    _, sample = sampled(model, x)
    with torch.no_grad():
        z = model.fc(x)
    assert efficiencies(sample)[0] == pytest.approx(efficiency64(z, F.gelu(z)), abs=1e-5)


class WhereLeaky(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return torch.where(h > 0, h, 0.01 * h)


def test_a_torch_where_leaky_relu_is_a_scale_invariant_site() -> None:
    torch.manual_seed(0)
    model, x = WhereLeaky(), torch.randn(ROWS, WIDTH)
    monitor, sample = sampled(model, x)
    assert [(s.name, s.kind) for s in monitor.sites] == [(":where", "where()")]
    with torch.no_grad():
        z = model.fc(x)
    assert efficiencies(sample)[0] == pytest.approx(efficiency64(z, F.leaky_relu(z, 0.01)), abs=1e-5)
    assert 0 <= sample.sites.probe_spread[0] < 1e-9  # positively homogeneous: a Type A engine


class HandSwish(nn.Module):
    """A swish written out, on a Gaussian signal of variance `scale**2`."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * self.scale
        return h * torch.sigmoid(h)


def gaussian_efficiency(phi, tau: float) -> float:
    """1 - Var(phi(z)) / Var(z) for z ~ N(0, tau), by Gauss-Hermite quadrature (no sampling)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(200)
    z, w = nodes * np.sqrt(tau), weights / weights.sum()
    a = phi(z)
    return 1 - (w @ a**2 - (w @ a) ** 2) / tau


def test_h_times_sigmoid_h_is_read_as_the_swish_it_applies() -> None:
    torch.manual_seed(0)
    monitor, sample = sampled(HandSwish(0.1), torch.randn(ROWS * WIDTH, 1))
    assert [(s.name, s.kind) for s in monitor.sites] == [(":x*sigmoid", "x*sigmoid()")]
    swish = gaussian_efficiency(lambda z: z / (1 + np.exp(-z)), 0.01)
    sigmoid = gaussian_efficiency(lambda z: 1 / (1 + np.exp(-z)), 0.01)
    # what each reads near the origin: a swish z/2 + z^2/4 there, a sigmoid 1/2 + z/4
    assert swish == pytest.approx(0.75, abs=0.01) and sigmoid == pytest.approx(15 / 16, abs=0.01)
    assert efficiencies(sample)[0] == pytest.approx(swish, abs=0.01)
    assert sample.sites.probe_spread[0] > 1e-4  # the swish's own probe: a temperature-dependent engine


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.glu = nn.Linear(WIDTH, 2 * WIDTH), nn.GLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.glu(self.fc(x))


def test_a_glu_is_the_site_of_the_sigmoid_on_its_gate_half() -> None:
    torch.manual_seed(0)
    model, x = Gated(), torch.randn(ROWS, WIDTH)
    monitor, sample = sampled(model, x)
    assert [(s.name, s.kind) for s in monitor.sites] == [("glu:glu", "glu()")]
    with torch.no_grad():
        gate = model.fc(x).chunk(2, -1)[1]
    assert sample.sites.count[0] == gate.numel()
    assert efficiencies(sample)[0] == pytest.approx(efficiency64(gate, torch.sigmoid(gate)), abs=1e-5)


class Checkpointed(nn.Module):
    """A block whose forward is recomputed in backward: a GELU module and an F.silu call."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.GELU(), nn.Linear(WIDTH, WIDTH))
        self.reentrant = reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(checkpoint(self.block, x, use_reentrant=self.reentrant))


@pytest.mark.parametrize("reentrant", [True, False])
def test_a_checkpointed_recompute_counts_each_application_once(reentrant: bool) -> None:
    torch.manual_seed(0)
    model, x = Checkpointed(reentrant), torch.randn(ROWS, WIDTH, requires_grad=True)
    monitor, sample = sampled(model, x, backward=True)
    assert [s.name for s in monitor.sites] == ["block.1", ":silu"]
    assert list(sample.sites.count) == [ROWS * WIDTH, ROWS * WIDTH]  # the values seen, once
    with torch.no_grad():
        z = model.block[0](x)
    assert efficiencies(sample)[0] == pytest.approx(efficiency64(z, F.gelu(z)), abs=1e-5)
