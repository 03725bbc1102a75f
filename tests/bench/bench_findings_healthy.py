"""False alarms of the findings on healthy trainings, in-process, every step sampled.

Run it as a script (pytest does not collect it):

    python tests/bench/bench_findings_healthy.py [STEPS]   # default 1000 steps per training

Six healthy trainings of a 16-64-64-1 MLP (AdamW, lr 1e-3, batch 64; a data shift half-way
through except where an embedding is used): ReLU, tanh, sigmoid, GELU with dropout 0.3, ReLU
with a 100-step warmup and cosine decay, and ReLU behind an embedding frozen from the start.
Prints each one's findings raised (every finding that held at some step, from
`Monitor.findings()` after each step) and the total per 1,000 samples.
"""

from __future__ import annotations

import math
import sys
import time

import torch
from torch import nn

from thermoscope.agent import Monitor


def train(
    act: type[nn.Module], steps: int, dropout: float = 0.0, schedule: bool = False, embed: bool = False
) -> set:
    """One healthy training; the (finding, layer, step raised) of every finding that held."""
    torch.manual_seed(0)
    body = [nn.Linear(16, 64), act(), nn.Dropout(dropout), nn.Linear(64, 64), act(), nn.Linear(64, 1)]
    emb = nn.Embedding(32, 16)
    emb.weight.requires_grad_(False)  # frozen on purpose, from the start
    model = nn.Sequential(emb, nn.Flatten(1), nn.Linear(64, 16), *body) if embed else nn.Sequential(*body)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    warm_cosine = lambda t: min(1.0, (t + 1) / 100) * 0.5 * (1 + math.cos(math.pi * t / steps))  # noqa: E731
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warm_cosine) if schedule else None
    monitor = Monitor(model, opt, collector=None, every=1)
    w, seen = torch.randn(16, 1), set()
    for t in range(steps):
        if embed:
            x = torch.randint(0, 32, (64, 4))
            y = emb(x).sum((1, 2)).unsqueeze(1)
        else:
            x = torch.randn(64, 16) + (2.0 if t > steps // 2 else 0.0)  # a data shift half-way
            y = torch.tanh(x @ w)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        monitor.step(loss)
        if sched is not None:
            sched.step()
        seen |= {(f.finding, f.layer, f.step) for f in monitor.findings()}
    monitor.close()
    return seen


def main() -> None:
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    cases = {
        "relu": (nn.ReLU, {}),
        "tanh": (nn.Tanh, {}),
        "sigmoid": (nn.Sigmoid, {}),
        "gelu, dropout 0.3": (nn.GELU, {"dropout": 0.3}),
        "relu, warmup and cosine decay": (nn.ReLU, {"schedule": True}),
        "relu, embedding frozen from the start": (nn.ReLU, {"embed": True}),
    }
    total = 0
    for name, (act, options) in cases.items():
        start = time.time()
        seen = train(act, steps, **options)
        total += len(seen)
        print(
            f"{name}: {steps} samples, {len(seen)} findings {sorted(seen)} ({time.time() - start:.0f} s)",
            flush=True,
        )
    samples = steps * len(cases)
    print(f"all: {total} findings in {samples} healthy samples ({1000 * total / samples:.2f} per 1,000)")


if __name__ == "__main__":
    main()
