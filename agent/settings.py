"""A monitor's settings, grouped by purpose: who the process is (`Identity`), what it samples
(`Sampling`), how its samples travel (`Delivery`); how it proves itself is `security.Security`.

`Monitor(identity=..., sampling=..., delivery=..., security=...)` takes the groups. The flat
keywords of earlier releases (`job=`, `every=`, `spool=`, `token=`, ...) still work: `group`
puts each in its group's field, and refuses a keyword it does not know, or one given both flat
and in its group (which one would win is not a thing to guess).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from torch import nn

from thermoscope.science.derive import WINDOW

from .layers import TensorParallel
from .sampler import BINS, SUBSET
from .security import Security, resolve


@dataclass(frozen=True)
class Identity:
    """Who this process is in its job. `job`: shared by all ranks (None: $THERMOSCOPE_JOB, else
    host and pid); `run`: one training run of the job, shared by all its ranks (None: the
    launcher's, `identity.launcher_run`); `local_rank`, `node`: where the rank runs
    (informational); `tensor_parallel`: this rank's place in its tensor-parallel group, where
    parameters are plain tensors holding slices of a layer (Megatron-LM, DeepSpeed):
    `(tp_rank, tp_size)` for Megatron's marked parameters, or a `layers.TensorParallel` naming the
    sliced ones and the process group (None: every plain tensor is a whole layer)."""

    job: str | None = None
    run: str | None = None
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    node: str = ""
    tensor_parallel: TensorParallel | tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.tensor_parallel, tuple):
            object.__setattr__(self, "tensor_parallel", TensorParallel(*self.tensor_parallel))


@dataclass(frozen=True)
class Sampling:
    """What is measured. `every`: one optimizer step in this many; `step`: the step training
    starts at (a run resumed from a checkpoint); `window`: samples per temperature (in-process);
    `sites`: extra modules to watch as activation sites; `bins`: histogram bins between a
    layer's fixed edges; `subset`: the most values of a layer a histogram counts."""

    every: int = 10
    step: int = 0
    window: int = WINDOW
    sites: tuple[nn.Module, ...] = ()
    bins: int = BINS
    subset: int = SUBSET

    def __post_init__(self) -> None:
        for name in ("every", "bins", "subset"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        object.__setattr__(self, "sites", tuple(self.sites))


@dataclass(frozen=True)
class Delivery:
    """How samples travel. `max_queue`: sampled steps held before the oldest is dropped;
    `spool`: a directory keeping what the collector has not made durable, across restarts of
    either side (None: no spool); `spool_bytes`: its bound."""

    max_queue: int = 1024
    spool: str | os.PathLike | None = None
    spool_bytes: int = 64 << 20

    def __post_init__(self) -> None:
        for name in ("max_queue", "spool_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


SECURITY_KEYWORDS = ("token", "tls_root_cert", "tls_client_cert", "tls_client_key")


def group(
    keywords: dict[str, Any],
    identity: Identity | None,
    sampling: Sampling | None,
    delivery: Delivery | None,
    security: Security | None,
) -> tuple[Identity, Sampling, Delivery, Security]:
    """The four groups, each given or the defaults, with the flat `keywords` in their fields;
    the security settings resolved from `token=`/`tls_*=` or the environment when not given."""
    groups: dict[type, Any] = {Identity: identity, Sampling: sampling, Delivery: delivery}
    fields: dict[type, dict[str, Any]] = {kind: {} for kind in groups}
    owners = {f.name: kind for kind in groups for f in dataclasses.fields(kind)}
    flat_security = {k: keywords.pop(k) for k in SECURITY_KEYWORDS if k in keywords}
    for name, value in keywords.items():
        kind = owners.get(name)
        if kind is None:
            raise TypeError(f"Monitor() got an unexpected keyword argument {name!r}")
        if groups[kind] is not None:
            raise TypeError(f"Monitor() got {name}= and {kind.__name__.lower()}=: give it in one place")
        fields[kind][name] = value
    if security is not None and flat_security:
        raise TypeError(f"Monitor() got {', '.join(flat_security)}= and security=: give them in one place")
    made = [groups[kind] if groups[kind] is not None else kind(**fields[kind]) for kind in groups]
    return (*made, security if security is not None else resolve(**flat_security))  # type: ignore[return-value]
