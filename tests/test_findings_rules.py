"""The findings' rules on constructed merged samples: the update-ratio findings (whose
`update_sq` column newer agents send), job-wide causes, what is normal (warmup, decay, a layer
frozen from the start, an unknown column), and a state that carries on exactly."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from thermoscope.collector.state import schema
from thermoscope.science.findings import Finding, Findings
from thermoscope.science.stats import LayerStats, Sample, SiteStats

LAYERS = ("a.weight", "a.bias", "b.weight", "b.bias")


@dataclass(frozen=True)
class UpdatedLayers(LayerStats):
    """`LayerStats` with the additive `update_sq` column of newer agents."""

    update_sq: np.ndarray | None = None


def sample(
    step: int, update: np.ndarray | None, mean: np.ndarray | None = None, work: np.ndarray | None = None
) -> Sample:
    """Four layers of 100 values, weights of sum of squares 100, moving each step unless `mean`
    says, each with work -1e-3 unless `work` says."""
    n = len(LAYERS)
    mean = np.full(n, 0.01 * step) if mean is None else mean
    layers = UpdatedLayers(
        count=np.full(n, 100, dtype=np.int64),
        mean=mean,
        m2=np.full(n, 100.0) - 100 * mean**2,
        dot_before=np.zeros(n),
        dot_after=np.full(n, -1e-3) if work is None else work,
        histogram=None,
        update_sq=None if update is None else update**2 * 100.0,  # ratio r = update
    )
    empty = np.zeros(0)
    sites = SiteStats(np.zeros(0, dtype=np.int64), empty, empty, empty, empty, empty)
    return Sample(step=step, wall_time=1.7e9 + step, energy=1.0 / (step + 1), layers=layers, sites=sites)


def run(
    ratios: np.ndarray, findings: Findings | None = None, first: int = 0
) -> tuple[Findings, list[Finding]]:
    """Feed one sample per row of `ratios` (steps, layers); every finding raised or cleared."""
    findings = findings or Findings()
    out = []
    for k, row in enumerate(ratios):
        out += findings.update(sample(first + k, row), LAYERS, (), ())
    return findings, out


def noisy(steps: int, seed: int = 0, level: float = 1e-3) -> np.ndarray:
    """Healthy update ratios: each layer at its own level (decades apart), 0.1-decade scatter."""
    rng = np.random.default_rng(seed)
    levels = level * np.array([1.0, 30.0, 0.01, 3.0])
    return levels * 10 ** rng.normal(0, 0.1, (steps, len(LAYERS)))


def test_healthy_updates_with_warmup_and_cosine_decay_raise_nothing() -> None:
    steps = 400
    t = np.arange(steps)
    schedule = np.minimum(1.0, (t + 1) / 50) * 0.5 * (1 + np.cos(np.pi * t / steps)) + 1e-3
    _, out = run(noisy(steps) * schedule[:, None])
    assert out == []


def test_one_layers_update_jumping_100x_is_an_exploding_update_on_that_layer_at_once() -> None:
    ratios = noisy(60)
    ratios[40:, 2] *= 100
    _, out = run(ratios)
    assert [(f.finding, f.scope, f.layer, f.step) for f in out] == [
        ("exploding_update", "layer", "b.weight", 40)
    ]
    assert out[0].value > 1.5 and out[0].statistic == "update_ratio_decades"


def test_a_learning_rate_raised_10x_for_every_layer_is_one_job_scope_finding() -> None:
    ratios = noisy(60)
    ratios[40:] *= 10
    _, out = run(ratios)
    raised = [(f.finding, f.scope, f.layer, f.step) for f in out if f.cleared is None]
    assert raised == [("exploding_update", "job", "", 40)]


def test_one_layers_update_falling_10000x_is_a_vanishing_gradient_after_three_samples() -> None:
    ratios = noisy(60)
    ratios[40:, 0] *= 1e-4
    findings, out = run(ratios)
    assert [(f.finding, f.layer, f.step) for f in out] == [("vanishing_gradient", "a.weight", 42)]
    assert ("vanishing_gradient", "layer", "a.weight") in findings.active


def test_an_update_column_absent_or_nan_raises_no_update_finding() -> None:
    findings = Findings()
    out = []
    for step in range(30):
        out += findings.update(sample(step, None), LAYERS, (), ())
    ratios = np.full((30, len(LAYERS)), math.nan)
    _, nan_out = run(ratios)
    assert out == nan_out == []


def test_a_layer_frozen_from_its_first_sample_is_never_a_finding_but_one_frozen_later_is() -> None:
    findings, out = Findings(), []
    for step in range(20):
        mean, work = np.full(len(LAYERS), 0.01 * step), np.full(len(LAYERS), -1e-3)
        mean[0], work[0] = 0.5, 0.0  # frozen from the start (an embedding the user froze)
        if step >= 10:
            mean[2] = 0.01 * 10  # frozen at step 10: no update, so no work
            work[2] = 0.0
        out += findings.update(sample(step, None, mean, work), LAYERS, (), ())
    # the sample at 11 is the first unchanged, the third in a row is at 13
    assert [(f.finding, f.layer, f.step) for f in out] == [("frozen_layer", "b.weight", 13)]


def test_a_saved_state_carries_on_with_the_same_findings() -> None:
    ratios = noisy(80, seed=3)
    ratios[50:, 1] *= 1e-4
    ratios[60:, 3] *= 300
    _, out = run(ratios)
    half, first = run(ratios[:45])
    restored = Findings.from_state(schema.unpack(schema.pack({"f": half.to_state()}))["f"])
    _, rest = run(ratios[45:], restored, first=45)
    assert [(f.finding, f.layer, f.step, f.cleared) for f in first + rest] == [
        (f.finding, f.layer, f.step, f.cleared) for f in out
    ]
    assert {f.key for f in out} == {
        ("vanishing_gradient", "layer", "a.bias"),
        ("exploding_update", "layer", "b.bias"),
    }


def test_only_functions_that_saturate_are_judged_saturated() -> None:
    from thermoscope.science.findings import slope_at_zero

    slopes = {
        f: slope_at_zero(f)
        for f in ("Tanh()", "tanh()", "Sigmoid()", "Hardsigmoid()", "Hardtanh(min_val=-2.0)")
    }
    assert slopes == {
        "Tanh()": 1.0,
        "tanh()": 1.0,
        "Sigmoid()": 0.25,
        "Hardsigmoid()": 1 / 6,
        "Hardtanh(min_val=-2.0)": 1.0,
    }
    assert [
        slope_at_zero(f) for f in ("ReLU()", "GELU(approximate='none')", "Tanhshrink()", "LogSigmoid()", "")
    ] == [0.0] * 5


def site_sample(step: int, gain: float) -> Sample:
    """No layer; one tanh site whose output variance is `gain` times its input's (4096 values)."""
    empty = np.zeros(0)
    layers = UpdatedLayers(np.zeros(0, dtype=np.int64), empty, empty, empty, empty, None)
    n = np.array([4096])
    sites = SiteStats(
        n, np.zeros(1), np.array([4096.0 * 9]), np.zeros(1), np.array([4096.0 * 9 * gain]), -np.ones(1)
    )
    return Sample(step=step, wall_time=1.7e9 + step, energy=1.0, layers=layers, sites=sites)


def test_a_saturated_site_at_its_bound_holds_one_finding_and_clears_only_well_past_it() -> None:
    findings, out = Findings(), []
    gains = [0.5] * 5 + [0.05, 0.15] * 10 + [0.3] * 5  # hovering at the bound 0.1, then well past it
    for step, gain in enumerate(gains):
        out += findings.update(site_sample(step, gain), (), ("act",), ("Tanh()",))
    # raised at 9 (its third hit: the samples between, short of clearing, leave the run alone),
    # cleared at 27 (its third sample past twice the bound); `out` holds it twice: raised, cleared
    assert len(out) == 2 and {(f.finding, f.layer, f.step, f.cleared) for f in out} == {
        ("saturated_site", "act", 9, 27)
    }
