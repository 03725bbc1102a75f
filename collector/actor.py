"""The collector as a Ray actor: one per cluster, found by name, outliving the driver that started it.

`start` creates it as a detached actor named `discovery.ACTOR_NAME` in namespace
`discovery.NAMESPACE` (or returns the one already running), so that agents find it with no
address in user code. It asks for no CPU (a training job's workers can fill the cluster),
and prefers the node of the process that starts it, where `thermoscope attach` was run
and where its Prometheus file-service-discovery file (`sd_file`) is written: a JSON list
with the actor's `/metrics` target, rewritten wherever Ray (re)schedules it and emptied
when it stops, so Prometheus follows it (`file_sd_configs` in deploy/prometheus).

gRPC and `/metrics` listen on the address Ray knows the actor's node by (`node_address`:
loopback on a one-machine cluster started with `ray.init(_node_ip_address="127.0.0.1")`). Off
loopback the collector refuses to start without a token or TLS (`auth`): start it with
`thermoscope collector --ray` and its security flags (or `--insecure`) before `attach`.

Authentication travels in `settings` like the rest (`security=auth.Security(...)`, which
`thermoscope collector --ray` builds from its --tokens/--tls-*/--metrics-*/--insecure flags);
its files are read on the actor's node. On a node whose address is not loopback the collector
refuses to start without them (or `insecure=True`), and `start` raises its reason; `thermoscope
attach` starts a bare actor, so on such a cluster start it first with `collector --ray` and flags.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from thermoscope.agent.discovery import ACTOR_NAME, NAMESPACE

from .service import Collector
from .store import STATE_HOME

DEFAULT_SD_FILE = STATE_HOME / "thermoscope" / "file_sd.json"
#: Times Ray restarts the actor after its process or node died (its ports must be free again).
MAX_RESTARTS = 3


class CollectorActor:
    """Runs a `Collector` on a background thread for the actor's lifetime."""

    def __init__(
        self, grpc_port: int, metrics_port: int, sd_file: str, active: bool, settings: dict[str, Any]
    ) -> None:
        host = node_address()
        grpc_address, metrics_address = f"{host}:{grpc_port}", f"{host}:{metrics_port}"
        self._collector = Collector(grpc_address, metrics_address, active=active, **settings)
        self._running = contextlib.ExitStack()
        self._running.enter_context(self._collector.running())
        self._sd_file = Path(sd_file)
        self._host = host
        write_targets(self._sd_file, [f"{host}:{self._collector.metrics_port}"])

    def address(self) -> str:
        """The gRPC target agents stream to."""
        return self._collector.grpc_target

    def targets(self) -> dict[str, str]:
        return {
            "grpc": self._collector.grpc_target,
            "metrics": self._collector.metrics_url,
            "sd_file": str(self._sd_file),
            "node": self._host,
        }

    def attach(self, job: str | None = None) -> None:
        self._collector.attach(job)

    def detach(self, job: str | None = None) -> None:
        self._collector.detach(job)

    def snapshot(self) -> dict[str, Any]:
        return self._collector.snapshot()

    def stop(self) -> None:
        """Stop serving and take the target out of service discovery (the actor is killed next)."""
        write_targets(self._sd_file, [])
        self._running.close()


def node_address() -> str:
    """The address Ray knows this process's node by (loopback for a cluster started on
    127.0.0.1), not the machine's routable address that `ray.util.get_node_ip_address` finds."""
    here = ray.get_runtime_context().get_node_id()
    return next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == here)


def write_targets(path: Path, targets: list[str]) -> None:
    """Prometheus file-SD JSON, replaced atomically (Prometheus may read it at any moment)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    groups = [{"targets": targets, "labels": {"thermoscope_component": "collector"}}] if targets else []
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(groups, indent=2) + "\n")
    tmp.replace(path)


def connect(address: str | None = None) -> None:
    """Join the Ray cluster at `address` (default: $RAY_ADDRESS, else the local one) in our namespace."""
    if not ray.is_initialized():
        ray.init(address=address or "auto", namespace=NAMESPACE, logging_level="WARNING", log_to_driver=False)


def find() -> ray.actor.ActorHandle | None:
    """The running collector actor, or None."""
    try:
        return ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)
    except ValueError:
        return None


def start(
    *,
    grpc_port: int = 50051,
    metrics_port: int = 9108,
    sd_file: str | Path = DEFAULT_SD_FILE,
    active: bool = True,
    timeout: float = 60.0,
    **settings: Any,
) -> tuple[ray.actor.ActorHandle, dict[str, str]]:
    """Start the collector actor, or find the running one; return it with its targets.

    Needs a connected driver (`connect`). `active=False` starts it with every job paused
    (then `attach(job)` chooses which to watch); `settings` go to `Collector`. A collector
    that cannot start (a port in use) raises the actor's error here.
    """
    here = ray.get_runtime_context().get_node_id()
    handle = (
        ray.remote(CollectorActor)
        .options(
            name=ACTOR_NAME,
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            max_restarts=MAX_RESTARTS,
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=True),
        )
        .remote(grpc_port, metrics_port, str(Path(sd_file).expanduser()), active, settings)
    )
    try:
        return handle, ray.get(handle.targets.remote(), timeout=timeout)
    except ray.exceptions.RayActorError:
        with contextlib.suppress(Exception):
            ray.kill(handle)
        raise


def stop() -> bool:
    """Stop and remove the collector actor; False if there was none."""
    handle = find()
    if handle is None:
        return False
    with contextlib.suppress(ray.exceptions.RayActorError):
        ray.get(handle.stop.remote(), timeout=30)
    ray.kill(handle)
    return True
