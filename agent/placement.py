"""Where this rank runs, in the names the cluster's own exporters use, so a dashboard can join a
job's series to its GPUs' (NVIDIA's DCGM exporter: `Hostname`, `gpu`; kube-state-metrics: `pod`).

The GPU is read from the model's parameters, not `torch.cuda.current_device()`, which would start a
CUDA context in a process that trains on the CPU. DCGM names a GPU by its physical index, which
`cuda:0` is not under $CUDA_VISIBLE_DEVICES: the index is mapped through it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import torch


def pod(environ: Mapping[str, str] = os.environ) -> str:
    """The Kubernetes pod this process runs in: $POD_NAME (the downward API's usual name), else
    $HOSTNAME inside a pod (Kubernetes sets it to the pod's name); "" outside Kubernetes."""
    if name := environ.get("POD_NAME"):
        return name
    if environ.get("KUBERNETES_SERVICE_HOST"):
        return environ.get("HOSTNAME", "")
    return ""


def gpu(parameters: Iterable[torch.Tensor], environ: Mapping[str, str] = os.environ) -> str:
    """The GPU the first CUDA parameter is on, as DCGM names it: its physical index (through
    $CUDA_VISIBLE_DEVICES; an entry that is a UUID is given as it is, DCGM's `UUID` label); "" when
    no parameter is on a GPU."""
    device = next((p.device for p in parameters if p.device.type == "cuda"), None)
    if device is None:
        return ""
    index = device.index if device.index is not None else 0
    visible = [v.strip() for v in environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[index] if index < len(visible) else str(index)
