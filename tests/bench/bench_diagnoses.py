"""A zoo of induced pathologies and healthy controls: how soon, how surely and where each rule sees
them, Thermoscope's beside the rules users write today (issue 25, section 3).

Run it as a script (pytest does not collect it):

    python tests/bench/bench_diagnoses.py            # RUNS["full"] seeds per case
    python tests/bench/bench_diagnoses.py --quick    # RUNS["quick"] seeds per case, shorter runs

Every run is a real, seeded CPU training of a small model built from code or a config (no
download), with a real in-process `Monitor(every=1)`: each step's `Sample` is what the agent
sends. Models: an MLP (Linear-ReLU-Linear-ReLU-Linear-Tanh-Linear on a teacher's regression), a
CNN (Conv-ReLU-Conv-Tanh-Linear on a teacher's labels), a tiny GPT-2 (tests/helpers/architectures,
from its config) and a deep plain sigmoid stack. A pathology is induced at step `INJECT` on a known
layer (`Case.target`, a module prefix; "" for a job-wide cause):

* `dead`: the bias before a ReLU pushed far negative; `saturated`: the weights before a tanh scaled
  up; `frozen`: a weight's `requires_grad` turned off (the optimizer skips it); `nan`: one weight
  set to NaN; `lr10` / `lr100`: every group's learning rate raised 10x / 100x; `vanishing`: the
  sigmoid stack, vanishing from step 0.
* healthy controls: each model trained plainly, the MLP's teacher changed mid-run (a data shift),
  warmup then cosine decay, a GPT-2 whose embeddings are frozen from the start.

The rules, each a per-sample score against a threshold:

* `loss spike` (llm-foundry's KillLossSpike): the loss against its running mean over `WINDOW`
  samples (job scope); a non-finite loss scores infinity.
* `grad-norm spike`: per layer, the gradient's norm (the user's `p.grad.norm()`) against its own
  running mean (EWMA); the layer is the one that scores highest.
* `update ratio bounds` (SageMaker Debugger's weight_update_ratio): per layer ||d theta|| / ||theta||
  (the user's, from tensors copied around `optimizer.step()`) outside one band for every layer.
* `update_sq ratio` (Thermoscope's signal, from what the agent sends): per layer
  r = sqrt(update_sq / sum theta^2) (`LayerStats.update_sq`, the sample's m2 and mean), in decades
  away from its own EWMA baseline, so that layers whose healthy rates differ by orders of magnitude
  are each judged against themselves; r = 0 after it moved (frozen) and non-finite score infinity.
* `findings` (when `thermoscope.science.findings` exists): its `Findings` fed every sample, a case
  counted as found when it raises the case's finding.

Each rule's threshold is tuned on half the healthy runs (the calibration seeds) to raise nothing
there (the largest score seen, so a false-alarm rate of at most 1/N of their samples) and its false
alarms are counted on the other half (held out) and on every induced run before its injection.
`findings` has its own thresholds (docs/findings.md) and is not tuned here.

Columns per case and rule: `recall` (runs alarmed within `HORIZON` samples of the injection),
`loc` (of those, the alarm's layer is the target's: its module prefix; "-" for a job-wide cause or
a job-scope rule), `delay` (median samples from the injection to the alarm). Then per rule the
false alarms per 1,000 healthy samples. Rates carry 95 % intervals: Wilson for recall and
localization, exact Poisson (Garwood) for false alarms. The number of runs per case is fixed
here, before looking (`RUNS`).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers

from thermoscope.agent import Monitor

from helpers.architectures import build

#: Seeds per case, fixed before looking: half of the healthy ones calibrate, half are held out.
RUNS = {"full": 6, "quick": 2}
STEPS = {"full": 300, "quick": 160}
INJECT = {"full": 150, "quick": 80}
#: Samples after the injection an alarm may come in to count.
HORIZON = 40
#: KillLossSpike's running window; the EWMA weight and warm-up of the per-layer baselines.
WINDOW = 20
EWMA = 0.1
WARMUP = 10


@dataclass
class Trainer:
    model: nn.Module
    opt: torch.optim.Optimizer
    loss: Callable[[int], torch.Tensor]
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
    shift: Callable[[], None] | None = None  # the data shift of a healthy run


def _teacher(seed: int, width: int) -> nn.Module:
    torch.manual_seed(10_000 + seed)
    return nn.Sequential(nn.Linear(width, 64), nn.Tanh(), nn.Linear(64, 1)).requires_grad_(False)


def mlp(seed: int) -> Trainer:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
        nn.Linear(128, 128), nn.Tanh(), nn.Linear(128, 1),
    )  # fmt: skip
    teacher = [_teacher(seed, 32)]
    gen = torch.Generator().manual_seed(seed)

    def loss(step: int) -> torch.Tensor:
        x = torch.randn(64, 32, generator=gen)
        return nn.functional.mse_loss(model(x), teacher[0](x))

    def shift() -> None:
        teacher[0] = _teacher(seed + 1, 32)

    return Trainer(model, torch.optim.Adam(model.parameters(), lr=1e-3), loss, shift=shift)


def cnn(seed: int) -> Trainer:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.Tanh(), nn.Flatten(), nn.Linear(16 * 8 * 8, 10)
    )
    teacher = torch.randn(144, 10, generator=torch.Generator().manual_seed(20_000 + seed))
    gen = torch.Generator().manual_seed(seed)

    def loss(step: int) -> torch.Tensor:
        x = torch.randn(32, 1, 12, 12, generator=gen)
        return nn.functional.cross_entropy(model(x), (x.flatten(1) @ teacher).argmax(1))

    return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), loss)


def gpt2(seed: int) -> Trainer:
    arch = build("gpt2", seed=seed)
    return Trainer(arch.model, torch.optim.AdamW(arch.model.parameters(), lr=1e-3), arch.loss)


def sigmoid_stack(seed: int) -> Trainer:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(12):
        layers += [nn.Linear(32, 32), nn.Sigmoid()]
    model = nn.Sequential(*layers, nn.Linear(32, 1))
    teacher = _teacher(seed, 32)
    gen = torch.Generator().manual_seed(seed)

    def loss(step: int) -> torch.Tensor:
        x = torch.randn(64, 32, generator=gen)
        return nn.functional.mse_loss(model(x), teacher(x))

    return Trainer(model, torch.optim.SGD(model.parameters(), lr=0.05), loss)


MODELS: dict[str, Callable[[int], Trainer]] = {"mlp": mlp, "cnn": cnn, "gpt2": gpt2, "sigmoid": sigmoid_stack}


def _param(t: Trainer, name: str) -> nn.Parameter:
    return dict(t.model.named_parameters())[name]


def _scale_lr(factor: float) -> Callable[[Trainer, str], None]:
    def induce(t: Trainer, target: str) -> None:
        for group in t.opt.param_groups:
            group["lr"] *= factor

    return induce


@torch.no_grad()
def _dead(t: Trainer, target: str) -> None:
    _param(t, f"{target}.bias").sub_(30.0)


@torch.no_grad()
def _saturate(t: Trainer, target: str) -> None:
    _param(t, f"{target}.weight").mul_(30.0)


def _freeze(t: Trainer, target: str) -> None:
    _param(t, target).requires_grad_(False)


@torch.no_grad()
def _nan(t: Trainer, target: str) -> None:
    _param(t, target).view(-1)[0] = math.nan


def _warmup_cosine(t: Trainer, steps: int) -> None:
    warm = steps // 10
    t.scheduler = torch.optim.lr_scheduler.LambdaLR(
        t.opt, lambda s: (s + 1) / warm if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / steps))
    )


@dataclass(frozen=True)
class Case:
    name: str
    model: str
    finding: str  # the finding it should raise ("" for a healthy control)
    target: str = ""  # the module or parameter it is about ("": job-wide)
    induce: Callable[[Trainer, str], None] | None = None
    at_start: bool = False  # the pathology from step 0 (its delay counted from there)
    setup: str = ""  # a healthy control's variation: "shift", "schedule", "frozen_embedding"


CASES = (
    Case("mlp dead ReLU", "mlp", "dead_site", "2", _dead),
    Case("mlp saturated tanh", "mlp", "saturated_site", "4", _saturate),
    Case("mlp frozen layer", "mlp", "frozen_layer", "2.weight", _freeze),
    Case("mlp NaN weight", "mlp", "nonfinite", "4.weight", _nan),
    Case("mlp lr x10", "mlp", "exploding_update", "", _scale_lr(10)),
    Case("mlp lr x100", "mlp", "exploding_update", "", _scale_lr(100)),
    Case("cnn dead ReLU", "cnn", "dead_site", "0", _dead),
    Case("cnn frozen layer", "cnn", "frozen_layer", "2.weight", _freeze),
    Case("cnn lr x100", "cnn", "exploding_update", "", _scale_lr(100)),
    Case("gpt2 frozen layer", "gpt2", "frozen_layer", "transformer.h.0.mlp.c_fc.weight", _freeze),
    Case("gpt2 lr x100", "gpt2", "exploding_update", "", _scale_lr(100)),
    Case("gpt2 NaN weight", "gpt2", "nonfinite", "transformer.h.1.attn.c_attn.weight", _nan),
    Case("sigmoid stack vanishing", "sigmoid", "vanishing_gradient", "", None, at_start=True),
    Case("mlp healthy", "mlp", ""),
    Case("mlp data shift", "mlp", "", setup="shift"),
    Case("mlp warmup + cosine", "mlp", "", setup="schedule"),
    Case("cnn healthy", "cnn", ""),
    Case("gpt2 healthy", "gpt2", ""),
    Case("gpt2 frozen embedding", "gpt2", "", setup="frozen_embedding"),
)


@dataclass
class Trace:
    """One run, sample by sample: the loss, and per layer the user's gradient norm and update ratio
    and the agent's update_sq ratio; the findings raised (step, name, scope, layer)."""

    names: list[str]
    trainable: np.ndarray  # per layer: requires_grad at the start
    loss: list[float] = field(default_factory=list)
    grad_norm: list[np.ndarray] = field(default_factory=list)
    user_ratio: list[np.ndarray] = field(default_factory=list)
    agent_ratio: list[np.ndarray] = field(default_factory=list)
    weights_finite: list[np.ndarray] = field(default_factory=list)  # the sample's moments finite
    raised: list[tuple[int, str, str, str]] = field(default_factory=list)


def engine() -> type | None:
    """The collector's findings engine, where this tree has it (after issue 25's engine merged)."""
    try:
        from thermoscope.science import findings
    except ImportError:
        return None
    return getattr(findings, "Findings", None)


def run(case: Case, seed: int, steps: int, inject: int, engine_type: type | None) -> Trace:
    t = MODELS[case.model](seed)
    if case.setup == "schedule":
        _warmup_cosine(t, steps)
    if case.setup == "frozen_embedding":
        for name, p in t.model.named_parameters():
            if "wte" in name or "wpe" in name:
                p.requires_grad_(False)
    monitor = Monitor(t.model, t.opt, every=1)
    names = [layer.name for layer in monitor.layers]
    params = dict(t.model.named_parameters())
    watched = [params[n] for n in names]
    trace = Trace(names, np.array([p.requires_grad for p in watched]))
    findings = None if engine_type is None else engine_type()
    for step in range(steps):
        if step == inject and case.induce is not None and not case.at_start:
            case.induce(t, case.target)
        if step == inject and case.setup == "shift" and t.shift is not None:
            t.shift()
        loss = t.loss(step)
        t.opt.zero_grad()
        loss.backward()
        trace.grad_norm.append(
            np.array([0.0 if p.grad is None else float(p.grad.double().norm()) for p in watched])
        )
        before = [p.detach().double().clone() for p in watched]
        t.opt.step()
        if t.scheduler is not None:
            t.scheduler.step()
        moved = [(p.detach().double() - b).norm() / b.norm() for p, b in zip(watched, before, strict=True)]
        trace.user_ratio.append(np.array([float(r) for r in moved]))
        monitor.step(loss)
        trace.loss.append(float(loss))
        sample = monitor.sink.pending.pop().to_sample()  # type: ignore[attr-defined]
        weight_sq = sample.layers.m2 + sample.layers.count * sample.layers.mean**2
        trace.weights_finite.append(np.isfinite(weight_sq))
        with np.errstate(divide="ignore", invalid="ignore"):
            trace.agent_ratio.append(np.sqrt(sample.layers.update_sq / weight_sq))
        if findings is not None:
            sites = monitor.sites
            changed = findings.update(
                sample, names, [s.name for s in sites], [s.function or s.kind for s in sites]
            )
            trace.raised += [(step, f.finding, f.scope, f.layer) for f in changed if f.cleared is None]
    monitor.close()
    return trace


# -- the rules: per-sample scores (steps x layers, or steps for a job-scope rule) ---------------------


def loss_spike(trace: Trace) -> np.ndarray:
    loss = np.array(trace.loss)
    score = np.zeros(len(loss))
    for i in range(len(loss)):
        if not math.isfinite(loss[i]):
            score[i] = math.inf
        elif i >= WINDOW:
            score[i] = loss[i] / max(np.mean(loss[i - WINDOW : i]), 1e-12)
    return score


def _against_own_ewma(x: np.ndarray, log: bool) -> np.ndarray:
    """Per layer, each sample's distance from the layer's EWMA of the samples before it (decades
    where `log`, else a ratio): 0 during the warm-up and for a layer that never moved, infinity for
    a non-finite value or (`log`) a zero after the layer moved."""
    score = np.zeros_like(x)
    base = np.full(x.shape[1], np.nan)  # NaN until the layer's first usable value
    for i, row in enumerate(x):
        with np.errstate(divide="ignore", invalid="ignore"):
            v = np.log10(row) if log else row
            d = np.abs(v - base) if log else v / base
        if i >= WARMUP:
            s = np.where(np.isfinite(base), d, 0.0)
            s = np.where(np.isfinite(row), s, np.inf)
            score[i] = np.nan_to_num(s, nan=0.0, posinf=np.inf)
        usable = np.isfinite(v)
        base = np.where(usable, np.where(np.isnan(base), v, (1 - EWMA) * base + EWMA * v), base)
    return score


def grad_norm_spike(trace: Trace) -> np.ndarray:
    return _against_own_ewma(np.array(trace.grad_norm), log=False)


def agent_ratio(trace: Trace) -> np.ndarray:
    """The update ratio against its own baseline; where the update is non-finite but the layer's
    weights are not (yet: a NaN spreads to every layer within the step it appears), a score
    below a layer whose weights are, so that the alarm names the layer it started in."""
    score = _against_own_ewma(np.array(trace.agent_ratio), log=True)
    return np.where(np.isinf(score) & np.array(trace.weights_finite), 1e6, score)


def user_ratio(trace: Trace) -> np.ndarray:
    """log10 of the update ratio: the band is two thresholds on it, one score per side. The
    parameters frozen from the start are not watched (NaN), as a user watches the trainable ones."""
    with np.errstate(divide="ignore"):
        return np.where(trace.trainable, np.log10(np.array(trace.user_ratio)), np.nan)


RULES: dict[str, Callable[[Trace], np.ndarray]] = {
    "loss spike": loss_spike,
    "grad-norm spike": grad_norm_spike,
    "update ratio bounds": user_ratio,
    "update_sq ratio": agent_ratio,
}


@dataclass
class Threshold:
    hi: float
    lo: float = -math.inf  # the band's lower side (update ratio bounds only)

    def alarms(self, score: np.ndarray) -> np.ndarray:
        """Per sample: did any layer leave the band (NaN: not watched, never)?"""
        hit = (score > self.hi) | (score < self.lo)
        return hit if hit.ndim == 1 else hit.any(axis=1)

    def layer(self, score: np.ndarray, i: int) -> int:
        """The layer of sample i furthest outside the band."""
        with np.errstate(invalid="ignore"):
            excess = np.maximum(score[i] - self.hi, self.lo - score[i])
        return int(np.argmax(np.where(np.isnan(excess), -np.inf, excess)))


def calibrate(rule: str, scores: list[np.ndarray]) -> Threshold:
    """No alarm on the calibration runs (after the warm-up): the largest score seen (the band: the
    largest and the smallest finite log ratio)."""
    seen = np.concatenate([s[WARMUP:].ravel() for s in scores])
    seen = seen[np.isfinite(seen)]
    if rule == "update ratio bounds":
        return Threshold(float(seen.max()), float(seen.min()))
    return Threshold(float(seen.max()))


def wilson(k: int, n: int) -> str:
    if n == 0:
        return "-"
    z = 1.96
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return f"{p:.2f} [{max(centre - half, 0):.2f}, {min(centre + half, 1):.2f}]"


def per_1000(k: int, samples: int) -> str:
    lo = 0.0 if k == 0 else stats.chi2.ppf(0.025, 2 * k) / 2
    hi = stats.chi2.ppf(0.975, 2 * k + 2) / 2
    return f"{1000 * k / samples:.2f} [{1000 * lo / samples:.2f}, {1000 * hi / samples:.2f}]"


def _local(case: Case, name: str) -> bool:
    prefix = case.target.rsplit(".", 1)[0] if case.target.endswith(("weight", "bias")) else case.target
    return name == prefix or name.startswith(prefix + ".")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer seeds, shorter runs")
    args = parser.parse_args()
    mode = "quick" if args.quick else "full"
    runs, steps, inject = RUNS[mode], STEPS[mode], INJECT[mode]
    engine_type = engine()
    traces: dict[str, list[Trace]] = {}
    for case in CASES:
        traces[case.name] = []
        for seed in range(runs):
            traces[case.name].append(run(case, seed, steps, inject, engine_type))
            print(f"{case.name} seed {seed}: done", file=sys.stderr, flush=True)
    healthy = [c for c in CASES if not c.finding]
    induced = [c for c in CASES if c.finding]
    calibration = {c.name: traces[c.name][: runs // 2] for c in healthy}
    held_out = {c.name: traces[c.name][runs // 2 :] for c in healthy}

    print(f"# bench_diagnoses ({mode}): {runs} runs per case, {steps} samples each, injected at {inject}\n")
    columns = [*RULES, *(["findings"] if engine_type is not None else [])]
    print("| case | " + " | ".join(f"{r}: recall / loc / delay" for r in columns) + " |")
    print("|---|" + "---|" * len(columns))
    pooled = [t for ts in calibration.values() for t in ts]
    thresholds = {rule: calibrate(rule, [fn(t) for t in pooled]) for rule, fn in RULES.items()}
    false_alarms = dict.fromkeys(columns, 0)
    healthy_samples = 0
    for ts in held_out.values():
        for t in ts:
            healthy_samples += len(t.loss) - WARMUP
            for rule, fn in RULES.items():
                false_alarms[rule] += int(thresholds[rule].alarms(fn(t))[WARMUP:].sum())
            if engine_type is not None:
                false_alarms["findings"] += len(t.raised)
    for case in induced:
        start = 0 if case.at_start else inject
        cells = []
        for rule in columns:
            found, located, delays = 0, 0, []
            for t in traces[case.name]:
                if rule == "findings":
                    hits = [r for r in t.raised if r[1] == case.finding and start <= r[0] < start + HORIZON]
                    if hits:
                        found += 1
                        delays.append(hits[0][0] - start)
                        located += bool(case.target) and _local(case, hits[0][3])
                    continue
                score = RULES[rule](t)
                alarms = thresholds[rule].alarms(score)
                early = alarms[WARMUP:start]
                false_alarms[rule] += int(early.sum())
                after = np.flatnonzero(alarms[start : start + HORIZON])
                if len(after):
                    found += 1
                    delays.append(int(after[0]))
                    if case.target and score.ndim == 2:
                        located += _local(case, t.names[thresholds[rule].layer(score, start + int(after[0]))])
            loc = wilson(located, found) if case.target and (rule != "loss spike") else "-"
            delay = f"{np.median(delays):.0f}" if delays else "-"
            cells.append(f"{wilson(found, runs)} / {loc} / {delay}")
        print(f"| {case.name} | " + " | ".join(cells) + " |")
    pre = sum((inject - WARMUP) * runs for c in induced if not c.at_start)
    print(
        f"\nFalse alarms per 1,000 healthy samples ({healthy_samples} held-out healthy samples; the rules"
        f" also over {pre} pre-injection samples of induced runs):\n"
    )
    for rule in columns:
        n = healthy_samples + (pre if rule != "findings" else 0)
        print(f"- {rule}: {per_1000(false_alarms[rule], n)}")
    if engine_type is None:
        print(
            "\n(thermoscope.science.findings is not in this tree: the findings column comes after it merges.)"
        )


if __name__ == "__main__":
    main()
