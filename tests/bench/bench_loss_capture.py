"""What capturing the loss costs (agent/energy.py): per backward call, and per training step.

Run it as a script (pytest does not collect it):

    python tests/bench/bench_loss_capture.py                # 7 rounds
    python tests/bench/bench_loss_capture.py --calls 20000  # more calls per round

Rows:

* `wrapper alone`: the wrapper around a function that does nothing, against that function, not
  armed: the wrapper's own cost per call, which a backward's timing noise would hide;
* `backward, torch's own`: `loss.backward()` through torch's unwrapped `torch.autograd.backward`,
  on the smallest graph (one scalar from one 8-value parameter): the baseline, where the wrapper's
  share is largest;
* `backward, capture installed, not armed`: the same through the wrapper while no capture is
  armed: what every unsampled step pays (the wrapper returns at once);
* `backward, capture armed`: the same while a capture is armed (a sampled step): the loss is
  detached, cast to float64 and added up on its device;
* `training step ...`: one step of a small MLP (Linear(64, 256), ReLU, Linear(256, 1), batch 64,
  SGD), the same three ways: the cost in a real step.

The arms run in interleaved rounds; the table gives each arm's best round (the least disturbed by
other processes on a shared machine), in microseconds, and the difference to torch's own.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import nn

from thermoscope.agent.energy import LossCapture, _noting_backward


def timed(fn: Callable[[], None], calls: int) -> float:
    """Microseconds per call of fn, over `calls` calls."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=5000)
    args = p.parse_args()
    torch.set_num_threads(1)
    capture = LossCapture()  # installs the wrapper
    wrapped = torch.autograd.backward
    original = wrapped.__wrapped__

    w = nn.Parameter(torch.randn(8))
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = torch.randn(64, 64), torch.randn(64, 1)

    def tiny() -> None:
        (w * w).sum().backward()

    def step() -> None:
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    def nothing(*args: object, **kwargs: object) -> None:
        pass

    noting = _noting_backward(nothing)
    t = torch.zeros(())
    alone = {"bare function": [], "wrapped, not armed": []}
    for _ in range(args.rounds):
        alone["bare function"].append(timed(lambda: nothing(t), args.calls * 20))
        alone["wrapped, not armed"].append(timed(lambda: noting(t), args.calls * 20))

    arms = {
        "torch's own": (original, False),
        "installed, not armed": (wrapped, False),
        "armed": (wrapped, True),
    }
    results: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        for name in list(arms)[r % 3 :] + list(arms)[: r % 3]:
            backward, armed = arms[name]
            torch.autograd.backward = backward
            for what, fn, calls in (("backward", tiny, args.calls), ("training step", step, args.calls // 5)):
                if armed:
                    capture.arm()
                results.setdefault((what, name), []).append(timed(fn, calls))
                capture.take()
    torch.autograd.backward = wrapped

    print(f"torch {torch.__version__}, 1 thread, {args.rounds} rounds, best round")
    print(f"| {'what':<14} | {'arm':<22} | {'us per call':>11} | {'vs torch':>9} |")
    print(f"|{'-' * 16}|{'-' * 24}|{'-' * 13}|{'-' * 11}|")
    base = min(alone["bare function"])
    for name, times in alone.items():
        us = min(times)
        print(f"| {'wrapper alone':<14} | {name:<22} | {us:>11.3f} | {us - base:>+9.3f} |")
    for what in ("backward", "training step"):
        base = min(results[(what, "torch's own")])
        for name in arms:
            us = min(results[(what, name)])
            print(f"| {what:<14} | {name:<22} | {us:>11.2f} | {us - base:>+9.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
