"""Scenarios with known ground truth for the phase detector (docs/science.md section 6).

Each scenario is a real, seeded torch training run of a small MLP student learning a random
tanh teacher (`collector.demo.teacher_student`), plain SGD, watched by a real in-process agent
(`Monitor(model, optimizer, every=EVERY)`, `collector=None`); every sampled reading is kept as
the collector will feed it to `PhaseDetector.update`: the job's energy (`reading.energy`, the
minibatch loss) and each layer's entropy per value (`reading.layer_entropy / numel`).

Plain SGD, not Adam, because the ground truth must be unambiguous: under SGD a learning-rate
spike past the stability edge makes the loss grow without bound (a divergence), whereas Adam
renormalizes its steps and re-learns, which looks like a refresh, not a divergence.

Kinds and their ground truth:

* `convergence`: a fresh student learns (type_i -> transition -> type_ii). No event step.
* `shift`: the student converges, then from `event_step` on the minibatches come from another
  teacher on other inputs: all of them, or a half, a quarter or a tenth (the rest still the
  old data), by seed; the loss jumps between about x2.5 and x30. Expected `refresh`.
* `shift_learning`: the same shift, but at sample `LEARNING_SHIFT`, while the student is still
  learning (the job in `transition`): data that change before a model has converged are a shift
  too. Expected `refresh` (a jump followed by renewed descent, whatever phase it came in). These
  runs learn at the slower `LEARNING_LR`, so that the learning phase lasts (at `LR` it is over by
  sample 20-45, and a shift at sample 15 lands on a curve too steep for its jump to stand out).
* `divergence`: at sample 200 (converged: type_ii) or 15 (still learning: transition), by
  seed, the learning rate is multiplied by 4, 6 or 10, past SGD's stability edge: the loss
  grows by orders of magnitude within a few samples until it overflows, where the run stops
  (as a real job would; `generate` checks that it did). Expected `unstable`; `event_step` is
  the first step whose loss the new rate can change (the spike is applied to the optimizer
  step of the sampled step `event_step - 1`). Smaller spikes (x2 to x3 here) are absorbed:
  the loss jumps once and SGD recovers (a "catapult"), which is no divergence, so they are
  not used.
* `frozen`: one Linear layer (weight and bias, by seed the first or the middle one) has
  `requires_grad` off while the others learn: its layers must stay type_i while the learning
  weights go transition -> type_ii.
* `stationary`: a student is trained to convergence unmonitored, then a fresh `Monitor` watches
  it keep training at a small constant learning rate for a long time: nothing happens, so any
  refresh or unstable event is a false alarm.

A run stops at its first non-finite loss, before that step's update (a job whose loss is
non-finite is over). A divergence run's trace then ends with the sample the collector would get
next: that loss as the energy (+inf when it overflowed: the collector's detector reads +inf as a
divergence), at the next sampled step, with the last entropies. Without it the detector would see
a divergence that overflows within a sample of its jump as one jump, which a data shift also is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from thermoscope.agent import Monitor
from thermoscope.cli.demo import student, teacher_student

KINDS = ("convergence", "shift", "shift_learning", "divergence", "frozen", "stationary")
EVERY = 5  # optimizer steps per sample
LR = 0.1  # SGD rate of the learning runs (converges in ~20 samples, stable)
STATIONARY_LR = 0.02  # the small constant rate of the stationary runs
BATCH = 64
DIM = 32
CONVERGE_SAMPLES = 200  # samples before a shift or a divergence
SPIKES = (4.0, 6.0, 10.0)  # learning-rate multipliers of the divergence runs, by seed % 3
ONSETS = (CONVERGE_SAMPLES, 15)  # sample of the divergence: converged, or still learning, by seed // 3
SHIFT_MIX = (1.0, 0.5, 0.25, 0.1)  # share of the minibatches drawn from the new data, by seed % 4
LEARNING_SHIFT = 40  # sample of a `shift_learning` run's shift: the job is in transition there
LEARNING_LR = 0.01  # the slower SGD rate of `shift_learning` runs: a learning phase that lasts


@dataclass(frozen=True)
class Trace:
    """One monitored run: what the detector is fed, and what it should find."""

    kind: str
    seed: int
    steps: np.ndarray  # (samples,) the sampled optimizer steps
    energy: np.ndarray  # (samples,) the job's energy, reading.energy
    entropy: np.ndarray  # (samples, layers) entropy per value, nats
    layer_names: tuple[str, ...]
    event_step: int | None = None  # first step the event can show in, None without one
    expected: str | None = None  # the job phase the event must produce
    frozen: tuple[int, ...] = ()  # indices of layers that never train
    info: dict[str, float] = field(default_factory=dict)

    @property
    def samples(self) -> int:
        return len(self.steps)

    @property
    def event_index(self) -> int | None:
        """Index of the first sample that can show the event (None: no event, or run ended)."""
        if self.event_step is None:
            return None
        after = np.flatnonzero(self.steps >= self.event_step)
        return int(after[0]) if len(after) else None


def default_samples(kind: str) -> int:
    """Samples per run: enough to converge, and, after an event, to see the new regime."""
    return {
        "convergence": 300,
        "shift": CONVERGE_SAMPLES + 150,
        "shift_learning": LEARNING_SHIFT + 150,
        "divergence": CONVERGE_SAMPLES + 100,  # it stops a few samples after the onset
        "frozen": 300,
        "stationary": 1000,
    }[kind]


def generate(kind: str, seed: int, samples: int | None = None) -> Trace:
    """Train and monitor one run of `kind` (deterministic in `seed`).

    On one torch thread: the model is too small to gain from more, and a second thread spins
    (tens of times slower) when another process, e.g. a parallel test run, holds the cores.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown scenario kind {kind!r}; one of {KINDS}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _generate(kind, seed, samples)
    finally:
        torch.set_num_threads(threads)


def _generate(kind: str, seed: int, samples: int | None) -> Trace:
    samples = samples or default_samples(kind)
    torch.manual_seed(seed)
    x, y = teacher_student(seed, dim=DIM)
    model = student(DIM)
    frozen_module = None
    if kind == "frozen":
        frozen_module = (0, 2)[seed % 2]  # the first or the middle Linear of the Sequential
        model[frozen_module].requires_grad_(False)
    gen = torch.Generator().manual_seed(seed + 1)
    lr = LEARNING_LR if kind == "shift_learning" else LR
    if kind == "stationary":  # converge unmonitored, then watch a long steady stretch
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        for _ in range(CONVERGE_SAMPLES * EVERY):
            _sgd_step(model, optimizer, x, y, gen)
        lr = STATIONARY_LR
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    monitor = Monitor(model, optimizer, every=EVERY)
    numel = np.array([layer.numel for layer in monitor.layers], dtype=np.float64)
    names = tuple(layer.name for layer in monitor.layers)
    frozen = (
        ()
        if frozen_module is None
        else tuple(i for i, n in enumerate(names) if n.startswith(f"{frozen_module}."))
    )

    event_step = expected = None
    info: dict[str, float] = {}
    if kind in ("shift", "shift_learning"):
        event_step = (CONVERGE_SAMPLES if kind == "shift" else LEARNING_SHIFT) * EVERY
        expected = "refresh"
        info["mix"] = SHIFT_MIX[seed % len(SHIFT_MIX)]
    elif kind == "divergence":
        onset = ONSETS[seed // len(SPIKES) % len(ONSETS)]
        event_step, expected = onset * EVERY + 1, "unstable"
        info["spike"] = SPIKES[seed % len(SPIKES)]
        info["onset"] = onset

    steps, energy, entropy = [], [], []
    overflow = False
    for step in range(samples * EVERY):
        if kind in ("shift", "shift_learning") and step == event_step:
            x2, y2 = teacher_student(seed + 10_000, dim=DIM)
            keep = round(len(x) * (1 - info["mix"]))  # the share of the old data still drawn
            x, y = torch.cat([x[:keep], x2[keep:]]), torch.cat([y[:keep], y2[keep:]])
        if kind == "divergence" and step == event_step - 1:
            for group in optimizer.param_groups:
                group["lr"] = lr * info["spike"]
        with np.errstate(invalid="ignore", over="ignore"):  # inf activations as the loss overflows
            loss = _sgd_step(model, optimizer, x, y, gen, monitor)
        if not math.isfinite(loss):
            overflow = True
            if kind == "divergence" and steps:  # what the collector sees next: the loss, non-finite
                steps.append(steps[-1] + EVERY)
                energy.append(loss)
                entropy.append(entropy[-1])
            break
        if step % EVERY == 0:
            reading = monitor.latest()
            assert reading is not None and reading.step == step
            steps.append(step)
            energy.append(reading.energy)
            entropy.append(reading.layer_entropy / numel)
    monitor.close()
    if kind == "divergence" and not overflow:
        raise RuntimeError(f"divergence run {seed} did not diverge: its ground truth would be wrong")
    return Trace(
        kind=kind,
        seed=seed,
        steps=np.asarray(steps, dtype=np.int64),
        energy=np.asarray(energy, dtype=np.float64),
        entropy=np.asarray(entropy, dtype=np.float64).reshape(len(steps), len(names)),
        layer_names=names,
        event_step=event_step,
        expected=expected,
        frozen=frozen,
        info=info,
    )


def _sgd_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    gen: torch.Generator,
    monitor: Monitor | None = None,
) -> float:
    """One minibatch step and its loss; no step once the loss is no longer finite."""
    idx = torch.randint(0, x.shape[0], (BATCH,), generator=gen)
    loss = nn.functional.mse_loss(model(x[idx]), y[idx])
    if not torch.isfinite(loss):
        return float(loss.detach())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if monitor is not None:
        monitor.step(loss)
    return float(loss.detach())
