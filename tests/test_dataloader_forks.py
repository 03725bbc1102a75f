"""DataLoader workers forked while a monitor streams never die, wherever grpc was imported first.

The training process holds no gRPC at all: its monitor streams through a relay process
(agent/relay.py), so a `fork` finds only plain threads and a socket. Before, 6 of 240 workers
forked off a streaming monitor died (SIGSEGV, or "exited unexpectedly") and the DataLoader raised
into the training loop; grpc's fork support could not be turned off where grpc was imported
before the agent, as Ray workers and many trainers do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from thermoscope.collector.service import Collector

EPOCHS, LOADERS, WORKERS = 100, 50, 2  # 200 forks of a loader per epoch, then 100 of persistent ones

# The user's script: grpc imported first, real DataLoader workers (fork start method), SGD with
# momentum, a monitor streaming every other step; it counts what the DataLoader raised.
TRAINING = """
import json, sys
import grpc  # imported before the agent, as Ray workers and many trainers do
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from thermoscope.agent import Monitor

target, job, epochs, loaders, workers = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:])
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
data = TensorDataset(torch.randn(128, 16), torch.randn(128, 1))
monitor = Monitor(model, opt, collector=target, job=job, every=2)
steps, errors = 0, []

def loader(persistent):
    return DataLoader(data, batch_size=32, num_workers=workers, persistent_workers=persistent,
                      multiprocessing_context="fork")

def epoch(batches):
    global steps
    try:
        for x, y in batches:
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step(); monitor.step(loss)
            steps += 1
    except RuntimeError as exc:  # "DataLoader worker ... exited unexpectedly"
        errors.append(str(exc)[:200])

fresh = loader(False)
for _ in range(epochs):  # a non-persistent loader forks its workers at every epoch
    epoch(fresh)
for _ in range(loaders):  # persistent workers: forked once per loader, which runs two epochs
    kept = loader(True)
    epoch(kept); epoch(kept)
    del kept
closed = monitor.close(timeout=30)
print(json.dumps({"errors": errors, "steps": steps, "closed": closed, "delivered": monitor.delivered,
                  "dropped": monitor.dropped, "grpc_channels": "grpc._channel" in sys.modules}))
"""


@pytest.mark.slow
def test_hundreds_of_dataloader_workers_forked_off_a_streaming_monitor_all_live(collector: Collector) -> None:
    """300 worker forks, persistent and not, with grpc imported before the agent: no worker dies,
    the loop never sees an error, and every sampled step reaches the collector once."""
    job = "forking-loader"
    done = subprocess.run(
        [sys.executable, "-c", TRAINING, collector.grpc_target, job, str(EPOCHS), str(LOADERS), str(WORKERS)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    run = json.loads(done.stdout.splitlines()[-1])
    assert run["errors"] == [], done.stderr[-3000:]
    steps = (EPOCHS + 2 * LOADERS) * 4  # 128 samples in batches of 32
    assert run["steps"] == steps
    assert (run["closed"], run["delivered"], run["dropped"]) == (True, steps // 2, 0)
    assert not run["grpc_channels"]  # the training process never made a gRPC channel
    assert collector.snapshot()[job]["frames_received"] == steps // 2


SCRIPT = """
import sys
from thermoscope.agent import Monitor
from helpers.training import small_model, train_steps

model, opt = small_model()
monitor = Monitor(model, opt, collector=sys.argv[1], job="no-grpc", every=1)
train_steps(monitor, model, opt, 10)
closed = monitor.close(timeout=20)
print(closed, monitor.delivered, sorted(m for m in sys.modules if m == "grpc" or m.startswith("grpc.")))
"""


def test_a_streaming_training_process_never_imports_grpc(collector: Collector) -> None:
    """The relay process owns gRPC: the training process streams with none of it loaded."""
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, collector.grpc_target],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parent)},  # for `helpers`
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["True", "10", "[]"]
