"""The example RayJob's training: plain Ray Train and PyTorch, no Thermoscope code at all.

    python train.py [--workers 2] [--steps 3000] [--shift-at 1500] [--storage-path URI]

A small MLP (tanh and ReLU activation sites) learns a random teacher network, data-parallel
over `--workers` CPU workers; at `--shift-at` the teacher changes (a data shift, which the
collector reports as a `refresh`). The job's runtime env (rayjob.yaml) names
`thermoscope.agent.raytrain.setup` as `worker_process_setup_hook`, so every worker instruments
itself and streams to the collector in THERMOSCOPE_COLLECTOR.
"""

from __future__ import annotations

import argparse

import ray.train
import torch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer, prepare_model
from torch import nn

INPUTS = 32


def train_loop(config: dict) -> None:
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(0)
    model = prepare_model(
        nn.Sequential(nn.Linear(INPUTS, 128), nn.Tanh(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 1))
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = torch.Generator().manual_seed(1000 + rank)  # each rank its own batches
    teachers = [torch.randn(INPUTS, 1, generator=torch.Generator().manual_seed(seed)) for seed in (7, 8)]
    for step in range(config["steps"]):
        teacher = teachers[1 if 0 < config["shift_at"] <= step else 0]
        x = torch.randn(64, INPUTS, generator=data)
        loss = (model(x) - torch.tanh(x @ teacher)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if rank == 0 and step % 500 == 0:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=2, help="Ray Train workers (default 2)")
    p.add_argument("--steps", type=int, default=3000, help="training steps (default 3000)")
    p.add_argument("--shift-at", type=int, default=1500, help="step of the data shift (0: never)")
    p.add_argument("--name", default="thermoscope-example", help="the Train run's name")
    p.add_argument("--storage-path", help="where Ray Train keeps the run (default: Ray's, ~/ray_results)")
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"steps": args.steps, "shift_at": args.shift_at},
        scaling_config=ScalingConfig(num_workers=args.workers),
        run_config=RunConfig(name=args.name, storage_path=args.storage_path),
    )
    trainer.fit()


if __name__ == "__main__":
    main()
