"""Scale-out: agents given several collectors shard by job, so each job is merged whole by one."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from thermoscope.agent import Monitor
from thermoscope.collector.service import Collector
from thermoscope.wire.contract import shard

from helpers.training import train_steps


def test_a_job_maps_to_the_same_collector_in_every_process_and_jobs_spread() -> None:
    targets = "a:1, b:2,c:3"
    picks = [shard(targets, f"job-{i}") for i in range(300)]
    assert picks == [shard(targets, f"job-{i}") for i in range(300)]  # CRC-32: no per-process salt
    assert shard(targets, "job-0") == "b:2"  # pinned: a change would move running jobs
    assert {t: picks.count(t) for t in ("a:1", "b:2", "c:3")} == pytest.approx(
        {"a:1": 100, "b:2": 100, "c:3": 100}, abs=30
    )
    assert shard("only:1", "anything") == "only:1"
    with pytest.raises(ValueError, match="no collector address"):
        shard(" , ", "job")


def test_every_rank_of_a_job_streams_to_its_shard(tmp_path: Path) -> None:
    """Two real collectors; two ranks of each of two jobs given both addresses: each collector
    merges exactly the jobs `shard` gives it, with both ranks."""
    with (
        Collector("127.0.0.1:0", "127.0.0.1:0", db=tmp_path / "0.db").running() as first,
        Collector("127.0.0.1:0", "127.0.0.1:0", db=tmp_path / "1.db").running() as second,
    ):
        targets = f"{first.grpc_target},{second.grpc_target}"
        jobs = ["job-4", "job-0"]  # one on each collector
        assert [shard(targets, j) for j in jobs] == [first.grpc_target, second.grpc_target]
        monitors = []
        for job in jobs:
            for rank in (0, 1):
                torch.manual_seed(0)  # data-parallel replicas: the same initial parameters
                model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
                opt = torch.optim.SGD(model.parameters(), lr=0.05)
                monitor = Monitor(model, opt, collector=targets, job=job, rank=rank, world_size=2, every=1)
                monitors.append((monitor, model, opt))
        for monitor, model, opt in monitors:
            train_steps(monitor, model, opt, 5)
        for monitor, _, _ in monitors:
            assert monitor.close(timeout=20)
        views = [c.snapshot() for c in (first, second)]
    for job, view in zip(jobs, views, strict=True):
        assert list(view) == [job]
        assert view[job]["last_step"] == 4 and sorted(view[job]["ranks"]) == [0, 1]
