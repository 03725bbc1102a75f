"""Which per-layer energy change is unbiased: the candidates against a large held-out loss.

Run it as a script (pytest does not collect it; `tests/test_work_estimator.py` proves the chosen one):

    python tests/bench/bench_work_estimators.py [--quick]

Two small models in float64, each in a learning phase (from initialization) and a stationary
phase (converged, constant learning rate): a teacher-student MLP under Adam and a linear
regression under SGD. At every step t, with g_t the minibatch gradient at theta_t and
d_t = theta_{t+1} - theta_t the optimizer's update, the candidates per layer l are

    same-batch   w_t   = <g_t, d_t>                 (what the agent measured before)
    next-batch   w+_t  = <g_{t+1}, d_t>             (the next minibatch's gradient, independent of d_t)
    trapezoid    (w_t + w+_t) / 2
    next, 1/r    w+_t on a fresh random 1/r of each layer's coordinates, scaled by r (what the
                 agent can afford: it keeps d_t only on a subset)

and the reference is the change of the held-out loss L_H (20,000 examples), attributed to layer l
by the trapezoid along the update, <(grad L_H(theta_t) + grad L_H(theta_{t+1})) / 2, d_l>
(exact to second order; the layers' parts sum to L_H(theta_{t+1}) - L_H(theta_t) up to third).
Per candidate and phase: the mean bias per step against the held-out change (its standard error
in brackets), the noise (std per step of candidate minus reference), and the cumulative sums
over the phase. A last table gives the per-layer biases of the stationary phases.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

torch.set_num_threads(1)
torch.set_default_dtype(torch.float64)

HELD_OUT = 20_000
NAMES = ("same-batch w", "next-batch w+", "trapezoid", "next w+, 1/4", "next w+, 1/16")


@dataclass
class Scenario:
    name: str
    model: nn.Module
    make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
    draw: Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    batch: int
    warmup: int  # steps between the learning phase and the stationary one

    def __post_init__(self) -> None:
        self.optimizer = self.make_optimizer(list(self.model.parameters()))  # kept across the phases


def teacher_student(gen: torch.Generator) -> Scenario:
    d, h = 32, 64
    teacher = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, 1))
    student = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, 1))

    def draw(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, d, generator=g)
        with torch.no_grad():
            y = teacher(x) + 0.1 * torch.randn(n, 1, generator=g)
        return x, y

    return Scenario(
        "teacher-student MLP, Adam 1e-3", student, lambda p: torch.optim.Adam(p, lr=1e-3), draw, 32, 3000
    )


def linear(gen: torch.Generator) -> Scenario:
    d = 64
    beta = torch.randn(d, 1, generator=gen) / math.sqrt(d)
    model = nn.Linear(d, 1)

    def draw(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, d, generator=g)
        return x, x @ beta + 0.5 * torch.randn(n, 1, generator=g)

    return Scenario(
        "linear regression, SGD 0.02", model, lambda p: torch.optim.SGD(p, lr=0.02), draw, 16, 2000
    )


def loss_and_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, list[torch.Tensor]]:
    loss = nn.functional.mse_loss(model(x), y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return loss.item(), [g.detach() for g in grads]


def subsampled(g: torch.Tensor, d: torch.Tensor, ratio: int, gen: torch.Generator) -> float:
    """<g, d> from a fresh random 1/ratio of the coordinates (with replacement), scaled up."""
    n = d.numel()
    k = max(1, n // ratio)
    if k >= n:
        return float(torch.dot(g.reshape(-1), d.reshape(-1)))
    idx = torch.randint(n, (k,), generator=gen)
    return float(torch.dot(g.reshape(-1)[idx], d.reshape(-1)[idx])) * n / k


def run_phase(s: Scenario, steps: int, gen: torch.Generator, held: tuple[torch.Tensor, torch.Tensor]):
    """(candidates [step, candidate, layer], reference [step, layer]) over `steps` steps."""
    params, opt = list(s.model.parameters()), s.optimizer
    _, gh0 = loss_and_grad(s.model, *held)
    _, g = loss_and_grad(s.model, *s.draw(s.batch, gen))
    cands = torch.zeros(steps, len(NAMES), len(params))
    ref = torch.zeros(steps, len(params))
    for t in range(steps + 1):
        before = [p.detach().clone() for p in params]
        for p, gi in zip(params, g, strict=True):
            p.grad = gi.clone()
        opt.step()
        delta = [p.detach() - b for p, b in zip(params, before, strict=True)]
        _, gh1 = loss_and_grad(s.model, *held)
        _, g_next = loss_and_grad(s.model, *s.draw(s.batch, gen))
        if t < steps:
            for layer, (gi, gn, di, a, b) in enumerate(zip(g, g_next, delta, gh0, gh1, strict=True)):
                w, wp = float((gi * di).sum()), float((gn * di).sum())
                sub4, sub16 = subsampled(gn, di, 4, gen), subsampled(gn, di, 16, gen)
                cands[t, :, layer] = torch.tensor([w, wp, (w + wp) / 2, sub4, sub16])
                ref[t, layer] = float(((a + b) / 2 * di).sum())
        g, gh0 = g_next, gh1
    return cands, ref


def warm(s: Scenario, steps: int, gen: torch.Generator) -> None:
    params = list(s.model.parameters())
    for _ in range(steps):
        _, g = loss_and_grad(s.model, *s.draw(s.batch, gen))
        for p, gi in zip(params, g, strict=True):
            p.grad = gi
        s.optimizer.step()


def table(title: str, cands: torch.Tensor, ref: torch.Tensor) -> None:
    total, truth = cands.sum(-1), ref.sum(-1)
    n = len(truth)
    print(f"\n{title}: {n} steps, held-out change {float(truth.sum()):+.4g} in all")
    print("| candidate | bias per step (s.e.) | noise per step | sum over the phase | sum / held-out |")
    print("|---|---|---|---|---|")
    for k, name in enumerate(NAMES):
        err = total[:, k] - truth
        bias, sd = float(err.mean()), float(err.std())
        ratio = float(total[:, k].sum() / truth.sum())
        print(
            f"| {name} | {bias:+.3e} ({sd / math.sqrt(n):.1e}) | {sd:.2e} | {float(total[:, k].sum()):+.4f} |"
            f" {ratio:+.3f} |"
        )


def layer_table(title: str, names: list[str], cands: torch.Tensor, ref: torch.Tensor) -> None:
    n = len(ref)
    print(f"\n{title}: per-layer bias per step (s.e.), against the held-out change attributed to the layer")
    print("| layer | held-out per step | " + " | ".join(NAMES[:3]) + " |")
    print("|---|---|" + "---|" * 3)
    for layer, name in enumerate(names):
        cells = []
        for k in range(3):
            err = cands[:, k, layer] - ref[:, layer]
            cells.append(f"{float(err.mean()):+.2e} ({float(err.std()) / math.sqrt(n):.0e})")
        print(f"| {name} | {float(ref[:, layer].mean()):+.2e} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the steps (a smoke run)")
    args = parser.parse_args()
    scale = 10 if args.quick else 1
    for build in (teacher_student, linear):
        gen = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        s = build(gen)
        held = s.draw(HELD_OUT, gen)
        names = [n for n, _ in s.model.named_parameters()]
        learn_c, learn_r = run_phase(s, 500 // scale, gen, held)
        warm(s, s.warmup // scale, gen)
        stat_c, stat_r = run_phase(s, 1500 // scale, gen, held)
        print(f"\n## {s.name}, batch {s.batch}")
        table("learning (from initialization)", learn_c, learn_r)
        table("stationary (converged, constant learning rate)", stat_c, stat_r)
        layer_table("stationary", names, stat_c, stat_r)


if __name__ == "__main__":
    main()
