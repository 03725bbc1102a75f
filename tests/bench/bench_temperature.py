"""How often a temperature is defined, and whether its interval covers: the numbers of issue 24.

Run it as a script (pytest does not collect it; `tests/test_temperature.py` proves the claims):

    python tests/bench/bench_temperature.py [--steps N] [--every K] [--lr LR] [--quick]

1. A tiny Qwen2 (hidden 32, 2 layers, `helpers.architectures.markov_qwen2`) learns a 64-token
   Markov chain under AdamW at a constant learning rate, monitored in-process every K steps. Its
   samples go through the `Thermometer` of the code that runs this script (so the same script
   measures the code a branch started from: run it with that code's package first on the path).
   Learning: the readings before the loss (a 50-step moving average) comes within 0.05 nats of
   its final level (the last 500 steps' mean); plateau: the last 40 % of the run. The layers
   that carry the work: the fewest whose net work |sum of w_l| over the learning part adds up to
   80 % of the sum over all layers. Per part: the share of readings with a defined T for all
   layers, for the carrying ones (as they are, and weighted by their share of the net work:
   THEORY section 4's measure), and for the job.
2. Coverage: windows of increments with a known ratio (AR(1) noise with Student-t(4) innovations,
   correlated between entropy and work) through `physics.window_changes` and, where the code has
   it, `physics.fieller` at `physics.hac_critical`: the share of defined windows whose 95 %
   interval holds the truth. (Code without Fieller intervals: the delta method's T +- t se.)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers

from thermoscope.agent.monitor import Monitor
from thermoscope.science import physics
from thermoscope.science.derive import WINDOW

from helpers.architectures import entropy_rate, markov_qwen2

torch.set_num_threads(1)


def markov_run(steps: int, every: int, lr: float) -> dict[str, np.ndarray]:
    """Train the tiny Qwen2 on the chain; every reading's layer and job T, and what defines the
    parts (the step, the loss, each sample's layer work)."""
    arch = markov_qwen2()
    opt = torch.optim.AdamW(arch.model.parameters(), lr=lr)
    monitor = Monitor(arch.model, opt, every=every)
    readings, losses = [], []
    for step in range(steps):
        loss = arch.loss(step)
        loss.backward()
        opt.step()
        opt.zero_grad()
        monitor.step(loss)
        losses.append(loss.item())
        if monitor.sink.pending:  # a sampled step: its reading (the monitor's own thermometer)
            readings.append(monitor.latest())
    monitor.close()
    return {
        "step": np.array([r.step for r in readings]),
        "layer_t": np.array([r.layer_temperature for r in readings]),
        "job_t": np.array([r.temperature for r in readings]),
        "work": np.array([r.layer_work for r in readings]),
        "loss": np.array(losses),
    }


def parts(run: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(learning readings, plateau readings, carrying layers, their shares of the learning part's
    net work): see the module docstring."""
    loss = np.convolve(run["loss"], np.ones(50) / 50, mode="valid")
    final = run["loss"][-500:].mean()
    learned = int(np.argmax(loss < final + 0.05))
    learning = run["step"] < learned
    plateau = run["step"] >= 0.6 * len(run["loss"])
    net = np.abs(run["work"][learning].sum(axis=0))
    order = np.argsort(-net)
    share = np.cumsum(net[order]) / net.sum()
    carrying = order[: int(np.searchsorted(share, 0.8)) + 1]
    return learning, plateau, carrying, net[carrying] / net.sum()


def coverage(n: int, phi: float, windows: int = 20_000, seed: int = 0) -> tuple[float, float]:
    """(share defined, coverage of the defined windows' intervals) over `windows` windows of `n`
    increments: entropy rate 1 +- 1, work rate -2 +- 3 (T = -2), AR(`phi`), t(4) innovations."""
    rng = np.random.default_rng(seed)
    burn = 50
    z = rng.standard_t(4, (n + burn, 2, windows)) / np.sqrt(2.0)
    z[:, 1] = 0.3 * z[:, 0] + np.sqrt(1 - 0.09) * z[:, 1]
    noise = np.zeros_like(z)
    for t in range(1, n + burn):
        noise[t] = phi * noise[t - 1] + np.sqrt(1 - phi * phi) * z[t]
    ds, de = 1.0 + noise[burn:, 0], -2.0 + 3.0 * noise[burn:, 1]
    zero = np.zeros((1, windows))
    s, e = np.concatenate([zero, ds.cumsum(0)]), np.concatenate([zero, de.cumsum(0)])
    dS, dE, var_s, var_e, cov = physics.window_changes(s, e, np.arange(n + 1) * 5)
    if hasattr(physics, "fieller"):
        crit = physics.hac_critical(n, n - 1)
        low, high = physics.fieller(dE, dS, var_e, var_s, cov, crit)
    else:  # the code before: t-tests and the delta method
        crit = physics.t_quantile(n - 1)
        t, err = dE / dS, physics.temperature_stderr(dS, dE, var_s, var_e, cov)
        low, high = t - crit * err, t + crit * err
    defined = (np.abs(dS) > crit * np.sqrt(var_s)) & (np.abs(dE) > crit * np.sqrt(var_e))
    inside = (low <= -2.0) & (high >= -2.0)
    return float(defined.mean()), float(inside[defined].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--quick", action="store_true", help="1,500 steps, 4,000 windows")
    args = parser.parse_args()
    steps = 1500 if args.quick else args.steps
    started = time.perf_counter()
    run = markov_run(steps, args.every, args.lr)
    learning, plateau, carrying, shares = parts(run)
    print(
        f"tiny Qwen2, Markov chain (entropy rate {entropy_rate():.3f}), AdamW lr {args.lr}, {steps} steps, "
        f"every {args.every}, window {WINDOW}: learning {learning.sum()} readings, plateau {plateau.sum()}, "
        f"carrying layers {len(carrying)} of {run['layer_t'].shape[1]}, their shares of the net work "
        f"{np.round(shares, 3).tolist()} ({time.perf_counter() - started:.0f} s)"
    )
    print(
        "\n| part | all layers defined | carrying layers defined | the same, weighted by their work "
        "| job defined |\n|---|---|---|---|---|"
    )
    defined = np.isfinite(run["layer_t"])
    for name, rows in (("learning", learning), ("plateau", plateau)):
        carried = defined[rows][:, carrying].mean(axis=0)
        weighted = carried @ shares / shares.sum()
        print(
            f"| {name} | {defined[rows].mean():.1%} | {carried.mean():.1%} | {weighted:.1%} "
            f"| {np.isfinite(run['job_t'][rows]).mean():.1%} |"
        )
    print("\n| increments | AR(1) phi | defined | coverage of the 95 % interval |\n|---|---|---|---|")
    for n in (9, 49):
        for phi in (-0.3, 0.0, 0.3, 0.6):
            share, covered = coverage(n, phi, windows=4000 if args.quick else 20_000)
            print(f"| {n} | {phi} | {share:.1%} | {covered:.1%} |")


if __name__ == "__main__":
    main()
