"""Tensor parallelism without DTensors: Megatron- and DeepSpeed-style ranks hold slices of a layer
as plain tensors under the same name, declared with `tensor_parallel=`, and the collector merges
the slices as shards of one layer (not as replicas, one of them kept), to what the whole tensor
gives.

The training runs as two real processes in a gloo group on loopback, each holding half of each
Linear (a column-parallel first layer, a row-parallel second one, its bias whole on both), each
with its own `Monitor`, against a real collector in the test process.
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

from thermoscope.agent import Monitor
from thermoscope.agent.histograms import shares
from thermoscope.agent.layers import TensorParallel
from thermoscope.agent.sampler import SHAPE_EVERY, SUBSET, Sampler
from thermoscope.agent.settings import Identity
from thermoscope.science import physics

from helpers.processes import free_port
from helpers.reference import entropy64, work64

WORLD = 2
STEPS = SHAPE_EVERY + 1  # every layer's histogram taken at least once after the first step
BINS = 8  # few bins, so that the layers have a histogram entropy (at least 4 values per bin)
#: the sliced parameters of the local model and the dimension each is split along
DIMS = {"0.weight": 0, "0.bias": 0, "2.weight": 1}


def whole_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


def sliced_model(rank: int) -> nn.Sequential:
    """This rank's half of `whole_model`, as Megatron holds it: the first Linear's output rows
    (column parallel), the second's input columns (row parallel), its bias whole on every rank."""
    whole = whole_model()
    local = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4))
    with torch.no_grad():
        for name, p in local.named_parameters():
            full = dict(whole.named_parameters())[name]
            p.copy_(full.chunk(WORLD, DIMS[name])[rank] if name in DIMS else full)
    return local


def gather(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The whole tensor from every rank's slice of it (a collective)."""
    parts = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(parts, t.detach().contiguous())
    return torch.cat(parts, dim)


def train_rank(rank: int, port: int, collector: str, job: str, out: Path, declare: bool) -> None:
    """One tensor-parallel rank: monitored training steps on its slices; saves its layer table
    and, on rank 0, the float64 truths from the whole tensors (gathered from both halves).
    `declare`: whether the monitor is told the slices (False: what the agent did before it could be)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model = sliced_model(rank)
        names = [name for name, _ in model.named_parameters()]
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        declared = {"tensor_parallel": TensorParallel(rank, WORLD, dims=DIMS)} if declare else {}
        monitor = Monitor(
            model, opt, collector=collector, job=job, rank=rank, world_size=WORLD, every=1, bins=BINS,
            **declared,
        )  # fmt: skip

        def whole(tensors) -> list[torch.Tensor]:
            return [
                gather(t, DIMS[n]) if n in DIMS else t.detach().clone()
                for n, t in zip(names, list(tensors), strict=True)
            ]

        initial = whole(model.parameters())
        gen = torch.Generator().manual_seed(0)  # a tensor-parallel group sees one batch
        history = []
        for step in range(STEPS):
            x = torch.randn(16, 8, generator=gen)
            partial = model[2](model[1](model[0](x))) - model[2].bias  # this rank's share of the output
            loss = (partial * (1 + rank)).square().mean()  # a loss of each rank's own
            opt.zero_grad()
            loss.backward()
            if step == STEPS - 2:  # the last sample carries the work of this update, w+
                work_before = whole(model.parameters())
            history.append(whole(model.parameters()))
            if step == STEPS - 1:
                grads = whole(p.grad for p in model.parameters())
            opt.step()
            monitor.step(loss)
            if step == 0:
                wait_connected(monitor)
                dist.barrier()
        result = {"layers": monitor.layers, "delivered": monitor.close(timeout=10)}
        if rank == 0:
            before = history[-1]
            result["initial"], result["history"] = initial, history
            result["entropy"] = [entropy64(b) for b in before]
            result["work"] = work64(grads, before, work_before)
        (out / f"rank{rank}.pkl").write_bytes(pickle.dumps(result))
    finally:
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # as test_sharded.py's ranks: no interpreter teardown racing gloo's threads


def wait_connected(monitor: Monitor) -> None:
    """Both ranks streaming before step 1, so that the collector merges every later step of both."""
    deadline = time.monotonic() + 10
    while not monitor.connected:
        assert time.monotonic() < deadline, f"rank {monitor.rank} never connected to the collector"
        time.sleep(0.01)


def run_ranks(collector: str, job: str, out: Path, declare: bool = True, timeout: float = 60.0) -> list[dict]:
    ctx = mp.spawn(train_rank, args=(free_port(), collector, job, out, declare), nprocs=WORLD, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=0.5):
        if time.monotonic() > deadline:
            for process in ctx.processes:
                process.kill()
            pytest.fail(f"the ranks did not finish in {timeout} s")
    return [pickle.loads((out / f"rank{r}.pkl").read_bytes()) for r in range(WORLD)]


def last_reading(collector, job_id: str):
    job = collector.jobs[job_id]
    deadline = time.monotonic() + 10
    while job.reading is None or job.reading.step < STEPS - 1:
        assert time.monotonic() < deadline, "the collector never merged the last step"
        time.sleep(0.05)
    return job.reading


@pytest.mark.slow
def test_tensor_parallel_slices_merge_in_the_collector_to_the_whole_layers_entropy_work_and_histogram(
    collector, tmp_path: Path
) -> None:
    ranks = run_ranks(collector.grpc_target, "megatron", tmp_path)
    assert all(r["delivered"] for r in ranks)

    # each rank declares its slice of the sliced layers: the whole shape, its values, its place,
    # the same edges (sized from the whole tensor); the replicated bias whole on both
    tables = [r["layers"] for r in ranks]
    whole = dict(whole_model().named_parameters())
    for layers in zip(*tables, strict=True):
        name = layers[0].name
        assert len({(layer.name, layer.shape, layer.hist_lo, layer.hist_hi) for layer in layers}) == 1
        assert layers[0].shape == tuple(whole[name].shape)
        expected = [(0, 2), (1, 2)] if name in DIMS else [(0, 1), (0, 1)]
        assert [(layer.shard_index, layer.shard_count) for layer in layers] == expected
        assert sum(layer.numel for layer in layers) == whole[name].numel() * (1 if name in DIMS else 2)

    reading, truth = last_reading(collector, "megatron"), ranks[0]
    assert list(reading.layer_names) == [layer.name for layer in tables[0]]
    assert reading.layer_entropy == pytest.approx(truth["entropy"], rel=1e-6)
    assert reading.layer_work == pytest.approx(truth["work"], rel=1e-6, abs=1e-12)

    parts = shares([min(math.prod(layer.shape), SUBSET) for layer in tables[0]], SHAPE_EVERY)
    for i, (layer, p0, h_hist) in enumerate(
        zip(tables[0], truth["initial"], reading.layer_histogram_entropy, strict=True)
    ):
        v = p0.double()
        assert (layer.hist_lo, layer.hist_hi) == physics.histogram_edges(
            float(v.mean()), float(v.std(correction=0))
        )
        counted = max(s for s in range(STEPS) if i in parts[s % SHAPE_EVERY])
        p = truth["history"][counted][i].reshape(-1).float()
        if p.numel() >= physics.MIN_VALUES_PER_BIN * BINS:
            bins = (p - torch.tensor(layer.hist_lo)) * torch.tensor(BINS / (layer.hist_hi - layer.hist_lo))
            counts = torch.bincount(bins.floor().clamp(-1, BINS).long() + 1, minlength=BINS + 2).numpy()[None]
            expected = p.numel() * float(physics.histogram_entropy(counts, layer.hist_lo, layer.hist_hi)[0])
            assert h_hist == pytest.approx(expected, rel=1e-12)
        else:
            assert math.isnan(h_hist)


def test_megatron_marks_declare_a_parameter_a_slice_with_its_partition_dim() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 2))
    model[0].weight.tensor_model_parallel, model[0].weight.partition_dim = True, 0
    model[1].weight.tensor_model_parallel, model[1].weight.partition_dim = True, 1
    model[1].bias.tensor_model_parallel = False  # Megatron marks its replicated parameters so too
    tp = Identity(tensor_parallel=(1, 3)).tensor_parallel  # the one-line form: (tp_rank, tp_size)
    assert [tp.dim(name, p) for name, p in model.named_parameters()] == [0, None, 1, None]


@pytest.mark.parametrize(
    ("dims", "message"),
    [({"0.wieght": 0}, "no parameter named '0.wieght'"), ({"0.weight": 2}, "has no dimension 2")],
)
def test_a_slice_the_model_cannot_hold_is_refused_with_its_name(dims, message) -> None:
    model = nn.Sequential(nn.Linear(4, 6))
    with pytest.raises(ValueError, match=message):
        Sampler(model, list(model.named_parameters()), [], tensor_parallel=TensorParallel(0, 2, dims=dims))


def test_a_rank_outside_its_group_is_refused() -> None:
    with pytest.raises(ValueError, match="rank 2 of 2"):
        Identity(tensor_parallel=(2, 2))
