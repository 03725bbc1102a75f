"""The phase detector (`science/detect.py`): each state reached in its scenario, and its rules.

The scenarios are real monitored trainings with known ground truth (`helpers/scenarios.py`); the rules
(cooldown, escalation, odd energies) are checked on synthetic series built to isolate them.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from thermoscope.science.detect import PHASES, TRANSITIONS, Change, PhaseDetector, Settings

from helpers import scenarios

ALARMS = ("refresh", "unstable")


def replay(trace: scenarios.Trace, settings: Settings | None = None) -> tuple[PhaseDetector, list[Change]]:
    """Feed a trace to a fresh detector as the collector does; check every change is well formed."""
    detector = PhaseDetector(trace.entropy.shape[1], settings)
    changes: list[Change] = []
    for step, energy, entropy in zip(trace.steps, trace.energy, trace.entropy, strict=True):
        changes += detector.update(int(step), float(energy), entropy)
    for c in changes:
        assert (c.before, c.after) in TRANSITIONS, c
        assert 0.5 <= c.confidence <= 1.0, c
    return detector, changes


def job_path(changes: list[Change], trace: scenarios.Trace) -> list[tuple[int, str]]:
    """(sample index, new phase) of the job's changes."""
    index = {int(step): i for i, step in enumerate(trace.steps)}
    return [(index[c.step], c.after) for c in changes if c.series == -1]


@pytest.mark.slow
def test_convergence_goes_through_transition_to_type_ii() -> None:
    trace = scenarios.generate("convergence", 0, samples=200)
    detector, changes = replay(trace)
    assert [after for _, after in job_path(changes, trace)] == ["transition", "type_ii"]
    assert detector.job_phase == "type_ii"
    for j, name in enumerate(trace.layer_names):  # every weight matrix learned, then settled
        if name.endswith("weight"):
            assert next(c.after for c in changes if c.series == j) == "transition", name
            assert detector.layer_phases()[j] == "type_ii", name


@pytest.mark.slow
def test_a_data_shift_is_a_refresh_within_two_samples() -> None:
    trace = scenarios.generate("shift", 100)  # the whole distribution changes at sample 200
    detector, changes = replay(trace)
    event = trace.event_index
    assert event is not None
    path = job_path(changes, trace)
    assert not [p for p in path if p[0] < event and p[1] in ALARMS]
    first = next(p for p in path if p[0] >= event)
    assert first[1] == "refresh" and first[0] - event <= 2, path
    assert detector.job_phase == "type_ii"  # it re-learned and settled again
    assert any(c.after == "refresh" for c in changes if c.series >= 0)  # layers moved again too


@pytest.mark.slow
@pytest.mark.parametrize("seed", [200, 201], ids=["converged", "learning"])
def test_a_learning_rate_spike_that_diverges_is_unstable(seed: int) -> None:
    trace = scenarios.generate("divergence", seed)
    detector, changes = replay(trace)
    event = trace.event_index
    assert event is not None
    path = job_path(changes, trace)
    assert not [p for p in path if p[0] < event and p[1] in ALARMS]
    unstable = [i for i, after in path if after == "unstable" and i >= event]
    assert unstable and unstable[0] - event <= 2, path
    assert detector.job_phase == "unstable"


@pytest.mark.slow
def test_a_frozen_layer_stays_type_i_while_the_others_learn() -> None:
    trace = scenarios.generate("frozen", 300)  # the first Linear is frozen
    assert trace.frozen == (0, 1)
    detector, changes = replay(trace)
    assert [after for _, after in job_path(changes, trace)] == ["transition", "type_ii"]
    phases = detector.layer_phases()
    for j in trace.frozen:
        assert phases[j] == "type_i"
        assert not [c for c in changes if c.series == j]
    learners = [j for j, n in enumerate(trace.layer_names) if n.endswith("weight") and j not in trace.frozen]
    for j in learners:
        assert next(c.after for c in changes if c.series == j) == "transition"
        assert phases[j] == "type_ii", phases


@pytest.mark.slow
def test_a_long_stationary_run_raises_no_alarm() -> None:
    trace = scenarios.generate("stationary", 400, samples=600)
    detector, changes = replay(trace)
    assert not [c for c in changes if c.after in ALARMS]
    assert detector.job_phase == "type_ii"


# -- the rules, on synthetic series ------------------------------------------------------------


def flat(n: int, seed: int = 0, level: float = 0.03) -> np.ndarray:
    """A converged job's minibatch losses: lognormal noise (20 %) around a flat level."""
    return level * np.exp(np.random.default_rng(seed).normal(0.0, 0.2, n))


def run_job(energy: np.ndarray, settings: Settings | None = None) -> list[tuple[int, str, str]]:
    """(sample, new phase, statistic) of the job's changes on an energy series (no layers)."""
    detector = PhaseDetector(0, settings)
    out = []
    for i, e in enumerate(energy):
        out += [(i, c.after, c.statistic) for c in detector.update(i, float(e), np.zeros(0))]
    return out


def test_a_flat_series_settles_in_type_ii() -> None:
    path = run_job(flat(200))
    assert [after for _, after, _ in path] == ["type_ii"]


def test_the_cooldown_holds_a_jump_back_until_it_ends() -> None:
    settings = Settings()
    settled = run_job(flat(200))[0][0]  # the sample where it went type_ii
    energy = flat(200)
    energy[settled + 2 :] *= 10  # a shift two samples into the cooldown
    held = [p for p in run_job(energy, settings) if p[1] == "refresh"]
    assert held and held[0][0] == settled + settings.cooldown + 1
    free = [p for p in run_job(energy, Settings(cooldown=0)) if p[1] == "refresh"]
    assert free and free[0][0] == settled + 2


def test_no_two_changes_closer_than_the_cooldown_unless_escalating() -> None:
    energy = np.concatenate([flat(100), flat(30, 1) * 10, flat(100, 2) * np.exp(-0.05 * np.arange(100))])
    path = run_job(energy)
    assert [after for _, after, _ in path][:2] == ["type_ii", "refresh"]
    for (i, _, _), (j, after, _) in itertools.pairwise(path):
        assert j - i > Settings().cooldown or after == "unstable", path


def test_a_refresh_that_keeps_climbing_escalates_to_unstable_during_the_cooldown() -> None:
    energy = flat(100)
    energy[80] *= 20  # the jump
    energy[81:] = energy[80] * 1e3 ** np.arange(1, 20)  # and on, by orders of magnitude
    path = run_job(energy[:90])
    assert [(i, after) for i, after, _ in path][-2:] == [(80, "refresh"), (81, "unstable")]
    assert path[-1][2] == "energy_still_rising"


@pytest.mark.parametrize("rate", [0.02, 0.1])
def test_a_divergence_without_a_jump_is_unstable(rate: float) -> None:
    """A loss creeping up from type_ii by `rate` in ln E per sample (2 % or 10 %)."""
    energy = flat(300)
    energy[150:] *= np.exp(rate * np.arange(150))
    path = run_job(energy)
    assert not [p for p in path if p[0] < 150 and p[1] in ALARMS]
    unstable = [i for i, after, _ in path if after == "unstable"]
    assert unstable and unstable[0] - 150 <= (80 if rate < 0.05 else 30), path  # see docs/benchmarks.md


def test_odd_energies() -> None:
    detector = PhaseDetector(2)
    h = np.array([-3.0, -4.0])
    assert detector.update(0, math.nan, h) == []  # no loss reported: nothing to say
    assert detector.job_phase == "type_i" and detector.layer_phases() == ["type_i", "type_i"]
    overflow = detector.update(1, math.inf, h)
    assert [(c.series, c.after) for c in overflow] == [(-1, "unstable")]
    # a loss that can be negative is followed in linear units, and still settles
    path = run_job(flat(150) - 0.05)
    assert [after for _, after, _ in path] == ["type_ii"]


def test_layers_are_followed_independently_and_nan_entropies_are_skipped() -> None:
    rng = np.random.default_rng(0)
    n = 120
    learning = -3.0 + 0.02 * (1 - np.exp(-np.arange(n) / 10)) + np.cumsum(rng.normal(0, 1e-5, n))
    frozen = np.full(n, -4.0)
    missing = np.full(n, np.nan)
    detector = PhaseDetector(3)
    for i in range(n):
        detector.update(i, float(flat(1, i)[0]), np.array([learning[i], frozen[i], missing[i]]))
    assert detector.layer_phases() == ["type_ii", "type_i", "type_i"]
    assert len(PHASES) == 5
