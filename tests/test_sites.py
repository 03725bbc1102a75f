"""Activation sites wherever a model applies a nonlinearity: torch.nn modules, a library's own
activation classes (found by behaviour), functional calls in a forward, and compiled models."""

from __future__ import annotations

import logging
import math
import time

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from thermoscope.agent.monitor import Monitor
from thermoscope.agent.sites import acts_as_activation, find_sites
from thermoscope.collector.service import Collector

from helpers.architectures import build
from helpers.reference import efficiency64

# the activations each tiny config applies: one per block's MLP (BERT's masked-LM head adds one)
EXPECTED = {
    "gpt2": ["transformer.h.0.mlp.act", "transformer.h.1.mlp.act"],
    "bert": [
        "bert.encoder.layer.0.intermediate.intermediate_act_fn",
        "bert.encoder.layer.1.intermediate.intermediate_act_fn",
        "cls.predictions.transform.transform_act_fn",
    ],
    "llama": ["model.layers.0.mlp.act_fn", "model.layers.1.mlp.act_fn"],  # act(gate) * up
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_transformers_activation_classes_are_sites_by_default(name: str) -> None:
    arch = build(name)
    opt = torch.optim.AdamW(arch.model.parameters(), lr=1e-3)
    monitor = Monitor(arch.model, opt, every=1)
    assert [s.name for s in monitor.sites] == EXPECTED[name]
    arch.train(opt, monitor, 2)
    reading = monitor.latest()
    monitor.close()
    assert [s.name for s in monitor.sites] == EXPECTED[name]  # no functional call outside them
    assert reading is not None and list(reading.site_names) == EXPECTED[name]
    assert all(0 < eta < 1 for eta in reading.site_efficiency)  # every site saw values
    assert set(reading.site_engine) == {"B"}  # GELU and SiLU are temperature-dependent engines


class Scaled(nn.Module):
    def forward(self, x):
        return 3 * x - 1


class Swish(nn.Module):  # a user's own activation class
    def forward(self, x):
        return x * torch.sigmoid(x)


class RowTanh(nn.Module):  # nonlinear, but each output depends on the whole row
    def forward(self, x):
        return torch.tanh(x / x.std(-1, keepdim=True))


@pytest.mark.parametrize(
    ("module", "is_site"),
    [
        (Swish(), True),
        (nn.Hardtanh(), True),
        (nn.SELU(), True),
        (nn.Dropout(0.5).train(), False),
        (nn.Dropout(0.5).eval(), False),
        (nn.Softmax(-1), False),
        (nn.LayerNorm(8, elementwise_affine=False), False),
        (nn.Identity(), False),
        (nn.Flatten(), False),
        (Scaled(), False),
        (RowTanh(), False),
        (nn.MSELoss(), False),
        (nn.BatchNorm1d(4), False),
    ],
)
def test_an_activation_is_recognized_by_its_behaviour(module: nn.Module, is_site: bool) -> None:
    state = torch.random.get_rng_state()
    assert acts_as_activation(module) is is_site
    assert torch.equal(torch.random.get_rng_state(), state)  # the user's random stream is untouched


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 64)

    def forward(self, x):
        return F.gelu(self.fc(x))


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block, self.out, self.head = Block(), nn.Linear(64, 64), nn.Linear(64, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.out(self.block(x))))


def test_functional_calls_are_sites_named_by_their_module_and_match_a_float64_reference() -> None:
    torch.manual_seed(0)
    model = Functional()
    monitor = Monitor(model, every=1)
    x = torch.randn(256, 8)
    model(x)
    sample = monitor._sampler.collect(0, None).to_sample()
    monitor._sampler.disarm()
    monitor.close()
    assert [s.name for s in monitor.sites] == ["block:gelu", ":tanh"]
    assert [s.kind for s in monitor.sites] == ["gelu()", "tanh()"]
    with torch.no_grad():
        z1 = model.block.fc(x).double()
        z2 = model.out(F.gelu(model.block.fc(x))).double()
    for k, (z, phi) in enumerate([(z1, F.gelu), (z2, torch.tanh)]):
        sites = sample.sites
        assert sites.count[k] == z.numel()
        eta = 1 - sites.out_m2[k] / sites.in_m2[k]
        assert eta == pytest.approx(efficiency64(z, phi(z)), abs=1e-5)


def test_a_looked_up_collector_is_sent_the_functional_sites_too(collector: Collector) -> None:
    """A monitor that finds its collector (as `watch` and the zero-code hook do) opens its stream
    once its first sampled step has completed the site table: the functional calls are sites there."""
    torch.manual_seed(0)
    model = Functional()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = Monitor(model, opt, collector=lambda: collector.grpc_target, job="found", every=2)
    deadline = time.monotonic() + 60
    while monitor.delivered < 3:
        assert time.monotonic() < deadline, f"nothing delivered: {monitor.last_error}"
        loss = model(torch.randn(32, 8)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        monitor.step(loss)
        time.sleep(0.005)
    assert monitor.flush(5)
    monitor.close()
    assert list(collector.jobs["found"].site_names) == ["block:gelu", ":tanh"]


def test_tanh_of_a_standard_normal_reads_its_reference_efficiency() -> None:
    class Tanh(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(1, 1)

        def forward(self, x):
            return self.fc(torch.tanh(x))

    model = Tanh()
    monitor = Monitor(model, every=1)
    z = torch.randn(100_000, 1, generator=torch.Generator().manual_seed(1))
    model(z)
    sites = monitor._sampler.collect(0, None).to_sample().sites
    monitor._sampler.disarm()
    monitor.close()
    eta = 1 - sites.out_m2[0] / sites.in_m2[0]
    assert eta == pytest.approx(efficiency64(z.double(), torch.tanh(z.double())), abs=1e-5)
    assert eta == pytest.approx(0.606, abs=0.01)  # docs/science.md section 5


class Engines(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(16, 16) for _ in range(4))

    def forward(self, x):
        return self.d(F.silu(self.c(F.gelu(self.b(self.a(x).relu())))))


def test_a_relu_call_is_a_type_a_site_and_gelu_and_silu_calls_type_b() -> None:
    torch.manual_seed(0)
    model = Engines()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = Monitor(model, opt, every=1)
    for _ in range(2):
        loss = model(torch.randn(64, 16)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        monitor.step(loss)
    reading = monitor.latest()
    monitor.close()
    assert list(reading.site_names) == [":relu", ":gelu", ":silu"]
    assert list(reading.site_engine) == ["A", "B", "B"]
    assert reading.engine == "B"


def test_unsampled_steps_run_with_no_hook_and_no_function_mode() -> None:
    seen: list[tuple[bool, bool]] = []

    class Watched(Functional):
        def forward(self, x):
            hooked = any(m._forward_hooks or m._forward_pre_hooks for m in self.modules())
            seen.append((hooked, torch.overrides._is_torch_function_mode_enabled()))
            return super().forward(x)

    torch.manual_seed(0)
    model = Watched()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    monitor = Monitor(model, opt, every=3)
    for _ in range(9):
        loss = model(torch.randn(16, 8)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        monitor.step(loss)
    monitor.close()
    assert [s.name for s in monitor.sites] == ["block:gelu", ":tanh"]
    assert seen == [(True, True) if step % 3 == 0 else (False, False) for step in range(9)]
    assert not torch.overrides._is_torch_function_mode_enabled()


def test_a_model_without_sites_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with caplog.at_level(logging.WARNING, logger="thermoscope.agent"):
        monitor = Monitor(model, opt, every=1)
        for _ in range(5):
            loss = model(torch.randn(8, 4)).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            monitor.step(loss)
        monitor.close()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "no activation site" in warnings[0]


@pytest.mark.slow  # importing dynamo takes seconds
def test_nested_compiled_modules_keep_plain_names() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 1))
    outer = nn.Sequential(torch.compile(model))
    assert [name for name, _ in find_sites(outer)] == ["0.1"]
    monitor = Monitor(torch.compile(outer), every=1)
    monitor.close()
    assert [layer.name for layer in monitor.layers] == ["0.0.weight", "0.0.bias", "0.2.weight", "0.2.bias"]


class Compiled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 1)

    def forward(self, x):
        return self.fc3(F.gelu(self.fc2(self.act(self.fc1(x)))))


@pytest.mark.slow
def test_a_compiled_model_keeps_its_sites_and_names_and_is_not_recompiled_by_the_agent() -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = Compiled()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    compiled = torch.compile(model)
    monitor = Monitor(compiled, opt, every=5)
    etas = []
    warm_up, steps = 10, 100
    for step in range(steps):
        if step == warm_up:
            compiled_frames = counters["frames"]["total"]
        loss = compiled(torch.randn(32, 8)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        monitor.step(loss)
        if step % 5 == 0:
            etas.append(monitor.latest().site_efficiency)
    monitor.close()
    recompiles = counters["frames"]["total"] - compiled_frames
    print(f"frames compiled by dynamo after warm-up over {steps - warm_up} steps: {recompiles}")
    assert recompiles == 0
    assert [s.name for s in monitor.sites] == ["act", ":gelu"]  # F.gelu in the model's own forward
    assert monitor.layers[0].name == "fc1.weight"
    assert len(etas) == steps // 5 and all(math.isfinite(e) for row in etas for e in row)
