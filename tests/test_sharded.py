"""Sharded parameters: FSDP2 (`fully_shard`) ranks stream their shards' statistics, and the
collector's merge of them equals what the full, gathered parameters give.

The training runs as two real processes in a gloo group on loopback (FSDP2 runs on CPU with
gloo), each with its own `Monitor`, against a real collector in the test process.
"""

from __future__ import annotations

import math
import os
import pickle
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Replicate, Shard

from thermoscope.agent import Monitor
from thermoscope.agent.histograms import shares
from thermoscope.agent.layers import shard_position
from thermoscope.agent.sampler import SHAPE_EVERY, SUBSET
from thermoscope.science import physics

from helpers.processes import free_port
from helpers.reference import layer_entropy64, work64

WORLD = 2
STEPS = SHAPE_EVERY + 1  # every layer's histogram taken at least once after the first step
BINS = 8  # few bins, so that the larger layers have a histogram entropy (4 values per bin)


def model_to_shard() -> nn.Sequential:
    """Rows split unevenly over 2 ranks: 3 rows as 2 + 1, and the last layer's single row and
    bias value all on rank 0, leaving rank 1 an empty shard of each. The norm's parameters
    start constant (no spread to size their histogram edges by)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 3), nn.ReLU(), nn.Linear(3, 1)
    )


def histogram_entropy(values: torch.Tensor, lo: float, hi: float) -> float:
    """n * h_hist of all the values, binned with the sampler's float32 arithmetic."""
    v = values.detach().reshape(-1).float()
    bins = ((v - torch.tensor(lo)) * torch.tensor(BINS / (hi - lo))).floor().clamp(-1, BINS).long() + 1
    counts = torch.bincount(bins, minlength=BINS + 2).numpy()[None]
    return v.numel() * float(physics.histogram_entropy(counts, lo, hi)[0])


def train_rank(rank: int, port: int, collector: str, job: str, out: Path) -> None:
    """One FSDP2 rank: monitored training steps; saves its layer table and, on rank 0, the
    float64 truths from the gathered parameters (`full_tensor` is a collective: both ranks call it)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        model = model_to_shard()
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        monitor = Monitor(
            model, opt, collector=collector, job=job, rank=rank, world_size=WORLD, every=1, bins=BINS
        )
        initial = [p.full_tensor().detach() for p in model.parameters()]
        gen = torch.Generator().manual_seed(rank)  # each rank its own data, as in data parallel training
        history = []  # the full parameters at each step, before its update
        for step in range(STEPS):
            loss = model(torch.randn(16, 8, generator=gen)).square().mean()
            opt.zero_grad()
            loss.backward()
            if step == STEPS - 2:  # the last sample carries the work of this update, w+
                work_before = [p.full_tensor().detach() for p in model.parameters()]
            history.append([p.full_tensor().detach() for p in model.parameters()])
            if step == STEPS - 1:
                grads = [p.grad.full_tensor() for p in model.parameters()]
            opt.step()
            monitor.step(loss)
            if step == 0:
                wait_connected(monitor)
                dist.barrier()
        result = {"layers": monitor.layers, "delivered": monitor.close(timeout=10)}
        if rank == 0:
            before = history[-1]
            result["initial"], result["history"] = initial, history
            result["entropy"] = [layer_entropy64(b) for b in before]
            result["work"] = work64(grads, before, work_before)  # the next step's gradient
        (out / f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's teardown: once in ~10 runs a native thread (gloo's or
    # gRPC's) aborted it ("terminate called without an active exception") after the results
    # were written. The results are what this test judges; the spawned process ends here.
    sys.stdout.flush()
    os._exit(0)


def wait_connected(monitor: Monitor) -> None:
    """The agent connects on its first sampled step, and the collector merges a step once every
    rank it knows has sent it: step 0 may be merged before the other rank's stream opened (its
    sharded layers NaN there). From step 1 on, both ranks are known: they wait here for that."""
    deadline = time.monotonic() + 10
    while not monitor.connected:
        assert time.monotonic() < deadline, f"rank {monitor.rank} never connected to the collector"
        time.sleep(0.01)


def run_ranks(collector: str, job: str, out: Path, timeout: float = 60.0) -> list[dict]:
    ctx = mp.spawn(train_rank, args=(free_port(), collector, job, out), nprocs=WORLD, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=0.5):
        if time.monotonic() > deadline:
            for process in ctx.processes:
                process.kill()
            pytest.fail(f"the ranks did not finish in {timeout} s")
    return [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(WORLD)]


@pytest.mark.slow
def test_fsdp_shards_merge_in_the_collector_to_the_full_parameters_entropy_and_work(
    collector, tmp_path: Path
) -> None:
    ranks = run_ranks(collector.grpc_target, "fsdp2", tmp_path)
    assert all(r["delivered"] for r in ranks)

    # each rank declares its shard of every layer: full shape, the values it holds, its place
    full = [p.numel() for p in model_to_shard().parameters()]
    tables = [r["layers"] for r in ranks]
    for layers in zip(*tables, strict=True):
        assert len({(layer.name, layer.shape, layer.hist_lo, layer.hist_hi) for layer in layers}) == 1
        assert [(layer.shard_index, layer.shard_count) for layer in layers] == [(0, 2), (1, 2)]
    assert [sum(layer.numel for layer in layers) for layers in zip(*tables, strict=True)] == full
    assert [layer.numel for layer in tables[1]] == [64, 8, 8, 8, 16, 1, 0, 0]  # empty shards of layer 5

    job = collector.jobs["fsdp2"]
    deadline = time.monotonic() + 10
    while job.reading is None or job.reading.step < STEPS - 1:
        assert time.monotonic() < deadline, "the collector never merged the last step"
        time.sleep(0.05)
    reading, truth = job.reading, ranks[0]
    assert reading.step == STEPS - 1
    assert list(reading.layer_names) == [layer.name for layer in tables[0]]
    assert reading.layer_entropy == pytest.approx(
        truth["entropy"], rel=1e-6, nan_ok=True
    )  # a 1-value bias: NaN
    assert reading.layer_work == pytest.approx(truth["work"], rel=1e-6, abs=1e-12)

    # the edges were sized from the full initial tensors, and the shards' histograms add up
    # to the full tensors' histograms at the step each layer's was last counted (one share of
    # the layers per step, by step number: `sampler.shares`)
    parts = shares([min(n, SUBSET) for n in full], SHAPE_EVERY)
    for i, (layer, p0, h_hist) in enumerate(
        zip(tables[0], truth["initial"], reading.layer_histogram_entropy, strict=True)
    ):
        counted = max(s for s in range(STEPS) if i in parts[s % SHAPE_EVERY])
        p = truth["history"][counted][i]
        v = p0.double()
        assert (layer.hist_lo, layer.hist_hi) == physics.histogram_edges(
            float(v.mean()), float(v.std(correction=0))
        )
        if p.numel() >= physics.MIN_VALUES_PER_BIN * BINS:
            assert h_hist == pytest.approx(histogram_entropy(p, layer.hist_lo, layer.hist_hi), rel=1e-12)
        else:
            assert math.isnan(h_hist)


@pytest.mark.parametrize(
    ("placements", "coordinate", "mesh_shape", "position"),
    [
        ((Shard(0),), (1,), (4,), (1, 4)),  # FSDP
        ((Replicate(), Shard(0)), (1, 2), (2, 3), (2, 3)),  # HSDP: the replicas hold one shard
        ((Shard(0), Shard(1)), (1, 2), (2, 3), (5, 6)),  # sharded twice (FSDP + tensor parallel)
        ((Replicate(),), (1,), (2,), (0, 1)),  # replicated: one whole copy
    ],
)
def test_a_shards_index_counts_only_the_mesh_dimensions_that_shard_it(
    placements, coordinate, mesh_shape, position
) -> None:
    assert shard_position(placements, coordinate, mesh_shape) == position
