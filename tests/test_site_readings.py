"""Site readings a physicist would sign (docs/science.md section 5): each site's efficiency where
its input sits far from zero or barely spreads, the distribution of the sites' efficiencies in
place of a network efficiency that saturates, and each engine type beside the function and the
input scale it was read at."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from thermoscope.agent.monitor import Monitor

from helpers import architectures
from helpers.reference import efficiency64


class Offset(nn.Module):
    """z = 3 + 0.01 x, then tanh: a saturated tanh whose input's mean is 300 times its spread,
    as a module site (nn.Tanh) and as a functional one (torch.tanh)."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.Tanh()
        self.head = nn.Linear(2, 1)

    def forward(self, x):
        z = 3 + 0.01 * x
        return self.head(torch.cat([self.act(z), torch.tanh(z)], dim=1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_tanh_whose_input_sits_far_from_zero_reads_its_float64_efficiency(dtype: torch.dtype) -> None:
    """One-pass float32 sums read 0.602 or 1.0 here; shifted sums keep the variance (0.9999)."""
    model = Offset().to(dtype)
    monitor = Monitor(model, every=1)
    x = torch.randn(100_000, 1, generator=torch.Generator().manual_seed(1)).to(dtype)
    model(x)
    sites = monitor._sampler.collect(0, None).to_sample().sites
    monitor._sampler.disarm()
    monitor.close()
    assert [s.name for s in monitor.sites] == ["act", ":tanh"]
    z = 3 + 0.01 * x
    truth = efficiency64(z, torch.tanh(z))  # of the values the model computed, in its dtype
    for k in range(2):
        eta = 1 - sites.out_m2[k] / sites.in_m2[k]
        assert eta == pytest.approx(truth, abs=1e-6), (k, eta, truth)
        assert sites.in_mean[k] == pytest.approx(float(z.double().mean()), rel=1e-6)


def test_a_site_called_several_times_a_step_merges_its_calls_exactly() -> None:
    """Calls with far-apart means merge by Chan's formula: the variance of the pooled values."""
    model = Offset()
    monitor = Monitor(model, every=1)
    gen = torch.Generator().manual_seed(2)
    xs = [torch.randn(5_000, 1, generator=gen) * s + m for s, m in ((1, 0), (3, 500), (0.1, -200))]
    for x in xs:
        model(x)
    sites = monitor._sampler.collect(0, None).to_sample().sites
    monitor._sampler.disarm()
    monitor.close()
    z = torch.cat([3 + 0.01 * x for x in xs]).double()
    assert sites.count[0] == z.numel()
    assert sites.in_mean[0] == pytest.approx(float(z.mean()), rel=1e-7)
    assert sites.in_m2[0] / sites.count[0] == pytest.approx(float(z.var(unbiased=False)), rel=1e-5)


# the Lipschitz constant of each function: Var(phi(z)) <= L^2 Var(z), so eta >= 1 - L^2
LIPSCHITZ = {"Sigmoid": 0.25, "SiLU": 1.0998, "ReLU6": 1.0, "GELU": 1.1290}


@pytest.mark.parametrize("name", architectures.SITE_NAMES)
def test_every_site_of_a_real_cnn_reads_within_its_functions_physical_bounds(name: str) -> None:
    """EfficientNet's squeeze-excite sigmoids sit at inputs of 1e-21 spreading by less: read
    -8.9e14 (one-pass sums, and the weights' variance floor applied to the input) for >= 15/16."""
    torch.set_num_threads(1)
    arch = architectures.build(name)
    opt = torch.optim.AdamW(arch.model.parameters(), lr=1e-3)
    monitor = Monitor(arch.model, opt, every=1)
    arch.train(opt, monitor, 3)
    reading = monitor.latest()
    monitor.close()
    kinds = {site.name: site.kind for site in monitor.sites}
    checked = 0
    for site, eta in zip(reading.site_names, reading.site_efficiency, strict=True):
        lipschitz = LIPSCHITZ[kinds[site]]
        if math.isnan(eta):  # only where the input did not spread at float32's precision
            continue
        assert 1 - lipschitz**2 - 1e-6 <= eta <= 1, (site, eta)
        checked += 1
    assert checked >= len(reading.site_names) // 2


class Amplifier(nn.Module):
    """GELU at inputs around 1.5, where its slope is above 1: the site amplifies the spread."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.GELU()
        self.head = nn.Linear(1, 1)

    def forward(self, x):
        return self.head(self.act(1.5 + 0.3 * x))


def test_a_gelu_that_amplifies_its_input_reads_a_negative_efficiency_unclipped() -> None:
    model = Amplifier()
    monitor = Monitor(model, every=1)
    x = torch.randn(50_000, 1, generator=torch.Generator().manual_seed(3))
    model(x)
    sites = monitor._sampler.collect(0, None).to_sample().sites
    monitor._sampler.disarm()
    monitor.close()
    z = (1.5 + 0.3 * x).double()
    truth = efficiency64(z, F.gelu(z))
    assert truth < -0.05
    assert 1 - sites.out_m2[0] / sites.in_m2[0] == pytest.approx(truth, abs=1e-5)
    assert np.all(np.isfinite([sites.in_m2[0], sites.out_m2[0]]))


class Residual(nn.Module):
    """24 residual blocks x + W2 relu(W1 x): 24 ReLU sites, and one GELU site that amplifies."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16)) for _ in range(24)
        )
        self.amplifier = Amplifier()

    def forward(self, x):
        for block in self.blocks:
            x = x + block(x)
        return self.amplifier(x[:, :1] / x[:, :1].std())


def test_the_job_reads_the_distribution_of_its_site_efficiencies_which_does_not_saturate() -> None:
    """1 - prod(1 - eta) over 24 ReLUs at 0.66 read 1 - 1e-11; the median reads 0.66, and the
    lowest site is the amplifying GELU, with its negative efficiency."""
    torch.manual_seed(0)
    model = Residual()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    monitor = Monitor(model, opt, every=1)
    for _ in range(2):
        loss = model(torch.randn(256, 16)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        monitor.step(loss)
    reading = monitor.latest()
    monitor.close()
    eta = np.asarray(reading.site_efficiency)
    assert len(eta) == 25 and np.isfinite(eta).all()
    assert reading.efficiency == pytest.approx(float(np.median(eta))) and 0.5 < reading.efficiency < 0.75
    low, q1, median, q3, high = reading.efficiency_quantiles
    assert low == eta.min() < 0 and high == eta.max() and low <= q1 <= median <= q3 <= high
    assert median == reading.efficiency
    assert reading.efficiency_extremes == ("amplifier.act", reading.site_names[int(np.argmax(eta))])


def probed_inputs(model: nn.Module, kind: type[nn.Module]) -> dict[int, torch.Tensor]:
    """Hooks that keep the first input each `kind` module sees: what the first sampled step
    probes (every site is probed on the first sample); returns the dict they fill."""
    seen: dict[int, torch.Tensor] = {}
    for module in model.modules():
        if isinstance(module, kind):
            module.register_forward_pre_hook(lambda m, args: seen.setdefault(id(m), args[0].detach().clone()))
    return seen


def test_relu6_reads_a_where_its_probed_inputs_stay_below_6_and_b_where_they_pass_it() -> None:
    """THEORY section 5: the type belongs to the function at its operating point; ReLU6 below 6 is
    a ReLU. With a probe scale of 2, MobileNetV2's ReLU6s at inputs of 3 to 6 read B."""
    from thermoscope.agent.sites import PROBE_VALUES

    torch.set_num_threads(1)
    arch = architectures.build("mobilenetv2")
    with torch.no_grad():  # one stem's inputs spread 4x wider: past 6, where ReLU6 saturates
        arch.model.mobilenet_v2.conv_stem.first_conv.normalization.weight.fill_(4.0)
    inputs = probed_inputs(arch.model, nn.ReLU6)
    opt = torch.optim.SGD(arch.model.parameters(), lr=1e-2, momentum=0.9)
    monitor = Monitor(arch.model, opt, every=1)
    arch.train(opt, monitor, 2)
    reading = monitor.latest()
    monitor.close()
    modules = dict(arch.model.named_modules())
    expected = []
    for name in reading.site_names:
        z = inputs[id(modules[name])].reshape(-1)
        probed = z[:: max(1, z.numel() // PROBE_VALUES)][:PROBE_VALUES]
        expected.append("B" if bool((probed > 6).any()) else "A")
    assert list(reading.site_engine) == expected
    assert expected.count("B") >= 1 and expected.count("A") >= 20
    assert set(reading.site_function) == {"ReLU6()"}
    stem = list(reading.site_names).index("mobilenet_v2.conv_stem.first_conv.activation")
    assert reading.site_input_scale[stem] > 3 * np.median(reading.site_input_scale)


def test_a_sigmoid_at_tiny_inputs_is_type_a_and_each_type_comes_with_its_function_and_input_scale() -> None:
    """This tiny EfficientNet's signal fades through its blocks (inputs of RMS 0.02 at its stem,
    1e-21 by its fourth block): its sigmoids and SiLUs are linear there, so type A, which the
    input scale beside the type explains; its stem's SiLU reads B."""
    torch.set_num_threads(1)
    arch = architectures.build("efficientnet")
    opt = torch.optim.AdamW(arch.model.parameters(), lr=1e-3)
    monitor = Monitor(arch.model, opt, every=1)
    arch.train(opt, monitor, 2)
    reading = monitor.latest()
    monitor.close()
    rows = list(zip(reading.site_function, reading.site_input_scale, reading.site_engine, strict=True))
    assert {function for function, _, _ in rows} == {"Sigmoid()", "SiLU()"}
    for function, scale, engine in rows:
        if scale < 1e-6:  # linear at its operating point (or, "", below even float64's resolution there)
            assert engine in ("A", ""), (function, scale)
        elif scale > 1e-2:
            assert engine == "B", (function, scale)
    assert any(f == "Sigmoid()" and s < 1e-6 and e == "A" for f, s, e in rows)
    assert any(f == "SiLU()" and s > 1e-2 for f, s, _ in rows)


class Parametrized(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.act = nn.LeakyReLU(0.2, inplace=True)
        self.head = nn.Linear(8, 1)

    def forward(self, x):
        return self.head(F.gelu(self.act(x), approximate="tanh"))


def test_each_site_says_the_function_it_applies_with_its_parameters() -> None:
    """A LeakyReLU's slope, a GELU's approximation: what the engine type is read against."""
    model = Parametrized()
    monitor = Monitor(model, every=1)
    model(torch.randn(4, 8))
    monitor._sampler.collect(0, None)
    monitor._sampler.disarm()
    monitor.close()
    assert [(s.name, s.kind, s.function) for s in monitor.sites] == [
        ("act", "LeakyReLU", "LeakyReLU(negative_slope=0.2)"),
        (":gelu", "gelu()", "gelu(approximate='tanh')"),
    ]


class Tiny(nn.Module):
    """A sigmoid at inputs of RMS 1e-6 (linear there) and a SiLU at inputs of RMS 1 (not)."""

    def __init__(self) -> None:
        super().__init__()
        self.sigmoid, self.silu = nn.Sigmoid(), nn.SiLU()
        self.head = nn.Linear(2, 1)

    def forward(self, x):
        return self.head(torch.cat([self.sigmoid(1e-6 * x), self.silu(x)], dim=1))


def test_the_probe_reads_the_function_not_its_float32_rounding() -> None:
    """In float32 the sigmoid's outputs at 1e-6 are 3e-8 apart around 0.5: its probe moved by 0.01
    (type B) where the function is linear (type A)."""
    model = Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    monitor = Monitor(model, opt, every=1)
    for _ in range(2):
        loss = model(torch.randn(4096, 1, generator=torch.Generator().manual_seed(4))).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        monitor.step(loss)
    reading = monitor.latest()
    monitor.close()
    assert list(reading.site_engine) == ["A", "B"]
    assert reading.site_input_scale == pytest.approx([1e-6, 1.0], rel=0.05)
