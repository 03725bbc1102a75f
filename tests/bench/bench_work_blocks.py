"""How far a sample's work estimate on blocks of neighbouring values strays, against one on single values.

Run it as a script (pytest does not collect it):

    python tests/bench/bench_work_blocks.py                 # mlp, gpt2, llama, resnet on CPU

For each workload of `bench_sample_pass.py` (random weights, Adam 1e-4, 20 steps in), one update
d_t = theta_{t+1} - theta_t is taken, and for every layer larger than the subset (2^16 values) the
work w+ = <g_{t+1}, d_t> is estimated many times (`--draws`) on k = 2^16 coordinates drawn as the
agent draws them (`agent/coords.py`: a fixed, seeded set of blocks shifted by a random number of
blocks, scaled by n/k), with blocks of 1 (single values, as before blocks), 16, 32 and 64 values.
`spread %` is the estimates' standard deviation over the exact w+ of the layer, the median over the
layers; `minibatch %` is the spread of the exact w+ itself over `--batches` next minibatches (the
noise every reading of w+ carries anyway), for scale. `gather us` is the median time to gather the
coordinates of one layer from memory (the layer evicted from the cache first, as after a training
step).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/bench, for the workloads

from bench_sample_pass import WORKLOADS

SUBSET = 1 << 16
BLOCKS = (1, 16, 32, 64)


def _rows(n: int, block: int, shift: int, base: torch.Tensor) -> torch.Tensor:
    """The value indices of the fixed blocks `base` shifted by `shift` blocks (the tail left out)."""
    blocks = n // block
    starts = torch.remainder(base + shift, blocks) * block
    return (starts[:, None] + torch.arange(block)).reshape(-1)


def _estimate(prod: torch.Tensor, block: int, shift: int, base: torch.Tensor) -> float:
    n = prod.numel()
    blocks, kept = n // block, SUBSET // block
    taken = prod.index_select(0, _rows(n, block, shift, base)).sum().item()
    return taken * blocks / kept + prod[blocks * block :].sum().item()


def _gather_us(flat: torch.Tensor, block: int, base: torch.Tensor, evict: torch.Tensor) -> float:
    blocks = flat.numel() // block
    view = flat[: blocks * block].view(blocks, block)
    times = []
    for _ in range(20):
        evict.add_(1.0)
        start = time.perf_counter()
        view.index_select(0, base)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def measure(name: str, draws: int, batches: int) -> dict[str, float]:
    work = WORKLOADS[name](torch.device("cpu"))
    params = list(work.model.parameters())
    opt = torch.optim.Adam(params, lr=1e-4)
    for step in range(20):
        work.loss(step).backward()
        opt.step()
        opt.zero_grad()
    before = [p.detach().clone() for p in params]
    work.loss(20).backward()
    opt.step()
    opt.zero_grad()
    large = [i for i, p in enumerate(params) if p.numel() > SUBSET]
    deltas = {i: (params[i].detach() - before[i]).reshape(-1).double() for i in large}
    exact: dict[int, list[float]] = {i: [] for i in large}
    grads = {}
    for b in range(batches):
        work.loss(21 + b).backward()
        for i in large:
            g = params[i].grad.reshape(-1).double()
            exact[i].append(torch.dot(g, deltas[i]).item())
            grads.setdefault(i, g)
        opt.zero_grad()
    gen = torch.Generator().manual_seed(0)
    evict = torch.zeros(16 << 20)
    row: dict[str, float] = {"layers": len(large)}
    for block in BLOCKS:
        spreads, costs = [], []
        for i in large:
            prod = grads[i] * deltas[i]
            n = prod.numel()
            base = torch.randperm(n // block, generator=gen)[: SUBSET // block].sort().values
            shifts = torch.randint(0, n // block, (draws,), generator=gen).tolist()
            estimates = [_estimate(prod, block, s, base) for s in shifts]
            spreads.append(statistics.pstdev(estimates) / abs(exact[i][0]))
            costs.append(_gather_us(params[i].detach().reshape(-1), block, base, evict))
        row[f"spread % ({block})"] = 100 * statistics.median(spreads)
        row[f"gather us ({block})"] = statistics.median(costs)
    row["minibatch %"] = 100 * statistics.median(
        statistics.pstdev(exact[i]) / abs(statistics.fmean(exact[i])) for i in large
    )
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--draws", type=int, default=300)
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"- {args.draws} draws per layer, {args.batches} next minibatches, {args.threads} threads\n")
    rows = []
    for name in args.workloads:
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        rows.append((name, measure(name, args.draws, args.batches)))
    columns = list(rows[0][1])
    print("| workload | " + " | ".join(columns) + " |")
    print("| --- |" + " ---: |" * len(columns))
    for name, row in rows:
        print(f"| {name} | " + " | ".join(f"{v:.1f}" for v in row.values()) + " |")


if __name__ == "__main__":
    main()
