"""A data-parallel training under torchrun (or `accelerate launch`), watched with one line.

    export THERMOSCOPE_COLLECTOR=127.0.0.1:50051
    torchrun --nproc-per-node 2 --master-port 29500 docs/examples/torchrun_watch.py

Every rank names the same job and run and its own rank without being told (docs/integrations.md);
the same command run again is the same job (its port), a run of its own.
"""

import sys

import torch
import torch.distributed as dist
from torch import nn

from thermoscope.agent import watch


def main(steps: int = 200) -> None:
    dist.init_process_group("gloo")  # torchrun's environment says where and who
    torch.manual_seed(0)  # the same initial model on every rank
    model = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    monitor = watch(model, optimizer, every=10)  # job, run, rank and world size from the launcher
    data = torch.Generator().manual_seed(dist.get_rank())  # each rank its own batches
    for _ in range(steps):
        x = torch.randn(16, 8, generator=data)
        loss = nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        monitor.step(loss)
    monitor.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*map(int, sys.argv[1:]))
