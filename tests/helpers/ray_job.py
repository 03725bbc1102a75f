"""A Ray Train job as a user would submit it: 2 CPU workers, DDP over gloo, random regression data.

    RAY_ADDRESS=<gcs> python tests/helpers/ray_job.py --out DIR --mode watch|zero-code [--steps N]
        [--until FILE] [--kill-rank R --kill-at STEP] [--every N]

`--mode watch` has one Thermoscope line in the loop (`watch`; the job is short, so it
waits until the agent found the collector); `zero-code` has none: the job's runtime_env
names `thermoscope.agent.raytrain.setup` as worker_process_setup_hook.
Each rank appends what the tests check to DIR/rank<r>.jsonl: one line per attempt
{"attempt", "pid"} when it starts, then {"step", "loss"} per step. `--until FILE` trains
until FILE exists (at most 300 s); `--kill-rank/--kill-at` SIGKILLs that rank at that step
on the first attempt, and Ray Train restarts the worker group (FailureConfig).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import tempfile
import time
from pathlib import Path

import ray
import ray.train
import torch
from ray.train import FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer, prepare_model
from torch import nn

SETUP_HOOK = "thermoscope.agent.raytrain.setup"


def stop_everywhere(until: Path, deadline: float) -> bool:
    """Whether any rank saw `until` (or the deadline): DDP ranks must stop at the same step."""
    stop = torch.tensor([float(until.exists() or time.monotonic() > deadline)])
    torch.distributed.all_reduce(stop, op=torch.distributed.ReduceOp.MAX)
    return bool(stop.item())


def train_loop(config: dict) -> None:
    rank = ray.train.get_context().get_world_rank()
    out = Path(config["out"])
    log = out / f"rank{rank}.jsonl"
    attempt = 1 + (log.read_text().count('"attempt"') if log.exists() else 0)

    def note(**record: object) -> None:
        with log.open("a") as f:
            f.write(json.dumps(record) + "\n")

    note(attempt=attempt, pid=os.getpid())
    torch.manual_seed(0)
    model = prepare_model(nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1)))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = None
    if config["mode"] == "watch":
        from thermoscope.agent import watch

        monitor = watch(model, opt, every=config["every"])
        deadline = time.monotonic() + 60
        # a short job: let it reach the collector before training, so that a rank killed early
        # has streamed its steps (a monitor samples from its first step, but without a spool
        # what a killed process had not sent dies with it)
        while not monitor.connected and time.monotonic() < deadline:
            time.sleep(0.05)
    gen = torch.Generator().manual_seed(1000 + rank)
    teacher = torch.randn(16, 1, generator=torch.Generator().manual_seed(7))
    until = Path(config["until"]) if config["until"] else None
    deadline = time.monotonic() + 300
    step = 0
    while (step < config["steps"]) if until is None else not stop_everywhere(until, deadline):
        if attempt == 1 and rank == config["kill_rank"] and step == config["kill_at"]:
            os.kill(os.getpid(), signal.SIGKILL)
        x = torch.randn(32, 16, generator=gen)
        loss = (model(x) - x @ teacher).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if monitor is not None:
            monitor.step(loss)
        note(step=step, loss=loss.item())
        step += 1
        if until is not None:
            time.sleep(0.02)
    if monitor is not None:
        monitor.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--mode", choices=["watch", "zero-code"], required=True)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--every", type=int, default=2)
    p.add_argument("--until")
    p.add_argument("--kill-rank", type=int, default=-1)
    p.add_argument("--kill-at", type=int, default=-1)
    args = p.parse_args()
    env = {k: v for k, v in os.environ.items() if k.startswith("THERMOSCOPE_")}
    runtime_env: dict = {"env_vars": env}
    if args.mode == "zero-code":
        runtime_env["worker_process_setup_hook"] = SETUP_HOOK
    ray.init(runtime_env=runtime_env, logging_level="WARNING")
    out = Path(args.out)
    (out / "job_id").write_text(ray.get_runtime_context().get_job_id())
    trainer = TorchTrainer(
        train_loop,
        train_loop_config=vars(args),
        scaling_config=ScalingConfig(num_workers=2),
        run_config=RunConfig(
            storage_path=tempfile.mkdtemp(prefix="ray-train-", dir=out),
            failure_config=FailureConfig(max_failures=1),
        ),
    )
    trainer.fit()
    ray.shutdown()


if __name__ == "__main__":
    main()
