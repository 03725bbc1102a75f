"""Each rank's placement on /metrics (`thermoscope_rank_info{job_id,rank,host,pod,gpu}`), in the
label names the DCGM exporter and kube-state-metrics use, so a dashboard joins a job to its GPUs."""

from __future__ import annotations

import socket
import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from thermoscope.agent import Monitor
from thermoscope.agent.placement import gpu, pod

from helpers.metrics import scrape
from helpers.training import train_steps


def on(device: str) -> SimpleNamespace:
    """A parameter's placement (what `gpu` reads of one): a GPU needs no GPU to be named."""
    return SimpleNamespace(device=torch.device(device))


def test_the_pod_is_pod_name_else_the_hostname_inside_kubernetes_else_empty() -> None:
    assert (
        pod({"POD_NAME": "trainer-0", "HOSTNAME": "x", "KUBERNETES_SERVICE_HOST": "10.0.0.1"}) == "trainer-0"
    )
    assert pod({"HOSTNAME": "trainer-1", "KUBERNETES_SERVICE_HOST": "10.0.0.1"}) == "trainer-1"
    assert pod({"HOSTNAME": "laptop"}) == ""


def test_the_gpu_is_the_physical_index_dcgm_names_through_cuda_visible_devices() -> None:
    assert gpu([on("cpu"), on("cuda:1")], {"CUDA_VISIBLE_DEVICES": "4,6"}) == "6"
    assert gpu([on("cuda")], {"CUDA_VISIBLE_DEVICES": "GPU-8f2c"}) == "GPU-8f2c"  # DCGM's UUID label
    assert gpu([on("cuda:2")], {}) == "2"
    assert gpu([on("cpu")], {"CUDA_VISIBLE_DEVICES": "3"}) == ""


def test_each_streaming_rank_exports_its_host_pod_and_gpu(collector, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POD_NAME", "trainer-0")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    monitor = Monitor(model, opt, collector=collector.grpc_target, job="placed", every=1)
    try:
        train_steps(monitor, model, opt, 4)
        deadline = time.monotonic() + 30
        while True:
            placed = {
                dict(labels)["rank"]: dict(labels)
                for (name, labels), value in scrape(collector.metrics_url).items()
                if name == "thermoscope_rank_info" and dict(labels)["job_id"] == "placed" and value == 1.0
            }
            if placed or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        monitor.close()
    assert placed == {
        "0": {"job_id": "placed", "rank": "0", "host": socket.gethostname(), "pod": "trainer-0", "gpu": ""}
    }
