"""Nothing lost, nothing twice: `kill -9` of a real collector process, again and again, mid-run.

Run it as a script (pytest does not collect it; `tests/test_no_loss.py` proves one kill):

    python tests/bench/bench_no_loss.py --rounds 3 --kills 4 --ranks 2

Each round trains `--ranks` data-parallel replicas (one `Monitor` each, every=1, a spool each,
in this process) at about `--rate` steps per second, while a collector process (default
`--checkpoint-interval`, 2 s) is SIGKILLed `--kills` times at random moments (0.5 to 3 s
apart) and restarted on the same ports and database after a random outage (0 to 2 s). Then
the monitors flush, and the last collector's database and `/metrics` are compared with what
was sampled: every step merged exactly once (history rows = steps, no gap, no repeat), every
frame received once (`thermoscope_frames_received_total` = ranks x steps, restored across
restarts from the checkpoints), none dropped. `duplicates` are replayed frames the
collector already held (acknowledged, not applied); `spool max` is the largest spool an agent
held.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/, for helpers
from thermoscope.agent import Monitor
from thermoscope.collector.state.store import EventStore

from helpers.metrics import scrape, value
from helpers.processes import free_port, start_collector_process, stop_process

JOB = "bench-no-loss"


def one_round(args, rng: random.Random, tmp: Path) -> dict[str, float]:
    db, grpc_port, metrics_port = tmp / "events.db", free_port(), free_port()
    collector = start_collector_process(db, grpc_port, "--history-interval", "0", metrics_port=metrics_port)
    target = collector.grpc_target
    replicas = []
    for rank in range(args.ranks):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 1))
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        monitor = Monitor(
            model, opt, collector=target, job=JOB, rank=rank, world_size=args.ranks, every=1,
            spool=tmp / "spool", run="bench",
        )  # fmt: skip
        replicas.append((monitor, model, opt))
    monitors = [m for m, _, _ in replicas]
    stop, steps, spool = threading.Event(), [0], [0]
    trainer = threading.Thread(target=_train_replicas, args=(replicas, stop, args.rate, steps, spool))
    began = time.monotonic()
    trainer.start()
    try:
        for kill in range(args.kills):
            time.sleep(rng.uniform(0.5, 3.0))
            os.kill(collector.proc.pid, signal.SIGKILL)
            collector.proc.wait(timeout=10)
            time.sleep(rng.uniform(0.0, 2.0))
            collector = start_collector_process(
                db, grpc_port, "--history-interval", "0", metrics_port=metrics_port
            )
            print(f"  kill {kill + 1}/{args.kills} at step {steps[0]}: restarted", flush=True)
        time.sleep(1.0)
        stop.set()
        trainer.join()
        flushed = all(m.flush(timeout=60) for m in monitors)
        metrics = scrape(collector.metrics_url)
        received = value(metrics, "thermoscope_frames_received_total", job_id=JOB)
        duplicate = value(metrics, "thermoscope_frames_duplicate_total", job_id=JOB)
    finally:
        for m in monitors:
            m.close()
        collector.stop()
        stop_process(collector.proc)
    history = EventStore(db, create=False).history(JOB).step.tolist()
    return {
        "steps": steps[0],
        "frames": steps[0] * args.ranks,
        "received": received,
        "duplicate": duplicate,
        "rows": len(history),
        "missing": len(set(range(steps[0])) - set(history)),
        "repeated": len(history) - len(set(history)),
        "dropped": sum(m.dropped for m in monitors),
        "flushed": flushed,
        "spool_kib": spool[0] / 1024,
        "seconds": time.monotonic() - began,
    }


def _train_replicas(replicas, stop: threading.Event, rate: float, steps: list[int], spool: list[int]) -> None:
    x, y = torch.randn(64, 32), torch.randn(64, 1)
    nxt = time.monotonic()
    while not stop.is_set():
        for monitor, model, opt in replicas:
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            monitor.step(loss)
        steps[0] += 1
        for monitor, _, _ in replicas:
            held = monitor.sink._spool
            spool[0] = max(spool[0], held.bytes if held is not None else 0)
        nxt += 1 / rate
        time.sleep(max(0.0, nxt - time.monotonic()))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--kills", type=int, default=4, help="kill -9 of the collector per round")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--rate", type=float, default=50.0, help="training steps per second")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    rows = []
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", flush=True)
        with tempfile.TemporaryDirectory(prefix="thermoscope-no-loss-") as tmp:
            rows.append(one_round(args, rng, Path(tmp)))
    print()
    print(
        "| round | kills | steps | frames sampled | received | duplicates | history rows | missing "
        "| repeated | dropped | flushed | spool max KiB | s |"
    )
    print("|" + " ---: |" * 13)
    for r, f in enumerate(rows, 1):
        print(
            f"| {r} | {args.kills} | {f['steps']} | {f['frames']} | {f['received']:.0f} "
            f"| {f['duplicate']:.0f} | {f['rows']} | {f['missing']} | {f['repeated']} | {f['dropped']} "
            f"| {f['flushed']} "
            f"| {f['spool_kib']:.0f} | {f['seconds']:.0f} |"
        )
    ok = all(
        f["missing"] == f["repeated"] == f["dropped"] == 0 and f["received"] == f["frames"] and f["flushed"]
        for f in rows
    )
    print("every step merged once, every frame received once, none dropped" if ok else "LOSS OR DOUBLE COUNT")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
