"""Training against a collector that stalls or is down: step time against no monitor.

Run it as a script (pytest does not collect it):

    python tests/bench/bench_blocked.py            # 5 rounds x 200 steps, every=1, max_queue 64
    python tests/bench/bench_blocked.py --every 10 # the agent's default sampling interval

The model is `bench_overhead.py`'s (4 x Linear(1024, 1024) + ReLU, Adam, MSE, batch 64). Arms:

* `no monitor`: the baseline;
* `every=N, collector`: a `Monitor` streaming to a real collector process that reads: what
  sampling every step costs when all is well, the row to compare the next two with;
* `every=N, stalled`: a `Monitor` streaming to a gRPC server that accepts the stream and never
  reads it (HTTP/2 flow control stalls the sender once the window is full);
* `every=N, down`: a `Monitor` whose collector address has nothing listening.

Every=1 (the default here) is the worst case: every step is sampled and submitted. The arms
run in interleaved rounds (the order rotating). `mean x` is the throughput cost against no
monitor; it includes the sampling itself, so the figure to read is the difference between
the `stalled` / `down` rows and the `collector` row: what a stalled or absent collector adds.
`dropped` / `queue max` show the agent's memory held within its bound.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))  # for bench_overhead
sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/, for helpers
from bench_overhead import Shape, make_model, make_pool

from thermoscope.agent.monitor import Monitor

from helpers.processes import free_port, start_collector_process
from helpers.protocol import stalled_collector


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--every", type=int, default=1, help="the monitors' sampling interval (default 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--batch", type=int, default=64)
    args = p.parse_args()
    torch.set_num_threads(2)
    shape, device = Shape(args.width, args.depth, args.batch), torch.device(args.device)
    pool = make_pool(shape, 1, device)
    servers = contextlib.ExitStack()  # the stalling server lives until the table is printed
    stalled_target = servers.enter_context(stalled_collector())
    tmp = Path(servers.enter_context(tempfile.TemporaryDirectory(prefix="thermoscope-blocked-")))
    reading = start_collector_process(tmp / "events.db")
    servers.callback(reading.stop)
    targets = {
        "no monitor": None,
        f"every={args.every}, collector": reading.grpc_target,
        f"every={args.every}, stalled": stalled_target,
        f"every={args.every}, down": f"127.0.0.1:{free_port()}",
    }
    arms = {}
    for name, target in targets.items():
        model = make_model(shape, 0, device)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        mon = (
            None
            if target is None
            else Monitor(model, opt, collector=target, job="b", every=args.every, max_queue=args.max_queue)
        )
        arms[name] = {"model": model, "opt": opt, "mon": mon, "times": [], "rounds": [], "qmax": 0}
    loss_fn = nn.MSELoss()

    def train(arm, steps, record):
        start = time.perf_counter()
        for i in range(steps):
            x, y = pool[i % len(pool)]
            t0 = time.perf_counter()
            loss = loss_fn(arm["model"](x), y)
            loss.backward()
            arm["opt"].step()
            arm["opt"].zero_grad()
            if arm["mon"] is not None:
                arm["mon"].step(loss)
                arm["qmax"] = max(arm["qmax"], len(arm["mon"].sink._queue))
            if device.type == "cuda":
                torch.cuda.synchronize()  # a step's time is its GPU work, not its launches
            if record:
                arm["times"].append(time.perf_counter() - t0)
        if record:
            arm["rounds"].append((time.perf_counter() - start) / steps)

    names = list(arms)
    for name in names:
        train(arms[name], 20, False)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            train(arms[name], args.steps, True)
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
    base = arms["no monitor"]
    print(f"model: {shape}, Adam, on {device}; torch {torch.__version__}; {args.rounds} x {args.steps} steps")
    print()
    print(
        "| configuration | median ms | mean ms | mean x | mean x (rounds) "
        "| submitted | delivered | dropped | queue max |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, arm in arms.items():
        mon = arm["mon"]
        if mon is not None:
            mon.close(timeout=1.0)
        s = mon.sink if mon is not None else None
        ratio = statistics.mean(arm["times"]) / statistics.mean(base["times"])
        rounds = statistics.median(a / b for a, b in zip(arm["rounds"], base["rounds"], strict=True))
        counts = (s.submitted, s.delivered, s.dropped, arm["qmax"]) if s else ("-",) * 4
        print(
            f"| {name} | {statistics.median(arm['times']) * 1e3:.2f} "
            f"| {statistics.mean(arm['times']) * 1e3:.2f} "
            f"| {ratio:.3f} | {rounds:.3f} | " + " | ".join(str(c) for c in counts) + " |"
        )
    servers.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
