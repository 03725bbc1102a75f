"""Who this process is in its training job, from the launcher that started it (outside Ray).

Every rank of one job must name the same job and the same run, and no two launches may share a
run (the collector would take the second launch's steps for replays of the first's). torchrun and
`accelerate launch` (torchrun underneath) tell each rank its rank and the rendezvous, not a job id,
so the names are derived from what every rank of one launch sees alike:

* job: $THERMOSCOPE_JOB; else torchrun's rendezvous id ($TORCHELASTIC_RUN_ID: `--rdzv-id` with
  `--rdzv-endpoint`; without an endpoint or a port, torch 2.13 draws a fresh UUID each launch)
  unless it is torchrun's placeholder "none" (a fixed `--master-port`); else the rendezvous address
  $MASTER_ADDR:$MASTER_PORT, with this host's name for a loopback address (one machine's 127.0.0.1
  is not another's); else None (`Monitor`'s default: host and pid).
* run: $THERMOSCOPE_RUN; else the rendezvous id (unless "none"); else $SLURM_JOB_ID; else, for one
  process, a fresh id; else, once torch.distributed is initialized, a fresh id that rank 0 draws and
  broadcasts (so building the monitor is then a collective, which every rank makes); else "" (the
  job's ranks make one run, which a later launch with the same rendezvous address would rejoin).
* rank, world size: torch.distributed's, once initialized; else torchrun's $RANK and $WORLD_SIZE;
  local rank: $LOCAL_RANK.
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import Any

import torch

from thermoscope.wire.contract import is_loopback

#: torchrun's rendezvous id when none was given (its static rendezvous): the same for every launch.
UNNAMED = "none"


def launcher_identity() -> dict[str, Any]:
    """job, run, rank, world size and local rank of this process, as far as its launcher says
    (keys it says nothing about are left out, for `Monitor`'s defaults)."""
    identity: dict[str, Any] = {}
    dist = torch.distributed
    initialized = dist.is_available() and dist.is_initialized()
    if initialized:
        identity |= {"rank": dist.get_rank(), "world_size": dist.get_world_size()}
    elif "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        identity |= {"rank": int(os.environ["RANK"]), "world_size": int(os.environ["WORLD_SIZE"])}
    if "LOCAL_RANK" in os.environ:
        identity["local_rank"] = int(os.environ["LOCAL_RANK"])
    if (job := launcher_job()) is not None:
        identity["job"] = job
    identity["run"] = launcher_run(identity.get("world_size", 1), initialized)
    return identity


def launcher_job() -> str | None:
    """The job id every rank of this launch derives alike (the module docstring's rule)."""
    if job := os.environ.get("THERMOSCOPE_JOB"):
        return job
    if (rendezvous := os.environ.get("TORCHELASTIC_RUN_ID")) and rendezvous != UNNAMED:
        return rendezvous
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if host and port:
        return f"{socket.gethostname() if is_loopback(host) else host}:{port}"
    return None


def launcher_run(world_size: int, initialized: bool) -> str:
    """The run id every rank of this launch shares (the module docstring's rule)."""
    for name in ("THERMOSCOPE_RUN", "TORCHELASTIC_RUN_ID", "SLURM_JOB_ID"):
        value = os.environ.get(name)
        if value and not (name == "TORCHELASTIC_RUN_ID" and value == UNNAMED):
            return value
    if world_size == 1:
        return uuid.uuid4().hex[:12]
    if initialized:
        drawn = [uuid.uuid4().hex[:12] if torch.distributed.get_rank() == 0 else None]
        torch.distributed.broadcast_object_list(drawn, src=0)
        return drawn[0]
    return ""
