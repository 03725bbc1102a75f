"""The collector as a Ray actor: one per cluster, found by name, outliving the driver that started it.

`start` creates it as a detached actor named `contract.ACTOR_NAME` in namespace
`contract.NAMESPACE` (or returns the one already running), so that agents find it with no
address in user code. It asks for no CPU (a training job's workers can fill the cluster),
and prefers the node of the process that starts it, where `thermoscope attach` was run
and where its Prometheus file-service-discovery file (`sd_file`) is written: a JSON list
with the actor's `/metrics` target, rewritten wherever Ray (re)schedules it and emptied
when it stops, so Prometheus follows it (`file_sd_configs` in deploy/prometheus).

gRPC and `/metrics` listen on the address Ray knows the actor's node by (`node_address`:
loopback on a one-machine cluster whose node registered as 127.0.0.1). Off loopback the
collector refuses to start without a token or TLS (`security.check_exposure`), so on a real
multi-node cluster `start` needs `security=Security(...)` (the CLI: `--tokens`, `--tls-*`,
`--metrics-*`, or `--insecure`).

The security files are read where `start` runs, not on the actor's node: `PackedSecurity.pack`
reads and checks them on the driver (a bad file fails there, before anything starts) and their
contents travel with the actor's creation arguments, because the actor may be placed, or
restarted by Ray, on a node that has none of the driver's files. In the actor they are written
to a private temporary directory only for the time the collector takes to load them. Whoever
can join the Ray cluster can run any code in it, the actor included, so shipping the contents
gives its users nothing they could not take already; no log line shows them (`repr` leaves
them out).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from thermoscope.wire.contract import ACTOR_NAME, NAMESPACE

from .credentials import read_file
from .exposition.passwords import BasicAuthUsers
from .ingest.grpc_auth import TokenTable, check_certificate_and_key, check_client_ca
from .security import Security, check_exposure
from .service import Collector
from .settings import DEFAULTS

#: Times Ray restarts the actor after its process or node died (its ports must be free again).
MAX_RESTARTS = 3


#: What each file of `security.Security` is, for the errors that name it.
_FILES = {
    "tokens": "tokens file",
    "tls_cert": "TLS certificate",
    "tls_key": "TLS key",
    "tls_client_ca": "client CA",
    "metrics_tls_cert": "/metrics TLS certificate",
    "metrics_tls_key": "/metrics TLS key",
    "metrics_basic_auth": "basic-auth file",
}


@dataclasses.dataclass(frozen=True)
class PackedSecurity:
    """A `security.Security` carrying its files' contents instead of their paths: what travels to the actor.

    `contents` maps a `Security` field (`tokens`, `tls_cert`, ...) to the bytes of its file; it is
    left out of `repr`, so that no log line or error message ever shows a token or a key.
    """

    contents: dict[str, bytes] = dataclasses.field(default_factory=dict, repr=False)
    insecure: bool = False

    @classmethod
    def pack(cls, security: Security) -> PackedSecurity:
        """Read every file of `security` here and check it as the collector will use it.

        AuthConfigError names the file and what is wrong with it: an unreadable file, a tokens or
        basic-auth file the collector would refuse, a certificate that does not load with its key
        (PEM, the key unencrypted, as gRPC needs them) or a CA file with no certificate.
        """
        contents = {}
        for name, what in _FILES.items():
            path = getattr(security, name)
            if path is None:
                continue
            contents[name] = read_file(path, what)
        _check(security)
        return cls(contents, security.insecure)

    def check_exposure(self, host: str) -> None:
        """Refuse (InsecureError) as the collector will on a node whose address is `host`."""
        check_exposure(
            host,
            host,
            tokens="tokens" in self.contents,
            grpc_tls="tls_cert" in self.contents,
            metrics_tls="metrics_tls_cert" in self.contents,
            metrics_auth="metrics_basic_auth" in self.contents,
            insecure=self.insecure,
        )

    @contextlib.contextmanager
    def unpacked(self) -> Iterator[Security]:
        """A `Security` of the contents written to a private temporary directory (0700, files 0600),
        removed when the block ends: the collector reads every file while it starts, inside it."""
        with tempfile.TemporaryDirectory(prefix="thermoscope-security-") as tmp:
            paths = {}
            for name, data in self.contents.items():
                paths[name] = Path(tmp, name)
                with os.fdopen(os.open(paths[name], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                    f.write(data)
            yield Security(**paths, insecure=self.insecure)


def _check(security: Security) -> None:
    """Parse each file of `security` as the collector will (AuthConfigError, naming the file)."""
    if security.tokens is not None:
        TokenTable.load(security.tokens)
    if security.metrics_basic_auth is not None:
        BasicAuthUsers.load(security.metrics_basic_auth)
    for cert, key in (
        (security.tls_cert, security.tls_key),
        (security.metrics_tls_cert, security.metrics_tls_key),
    ):
        if cert is not None:
            check_certificate_and_key(cert, key)
    if security.tls_client_ca is not None:
        check_client_ca(security.tls_client_ca)


class CollectorActor:
    """Runs a `Collector` on a background thread for the actor's lifetime."""

    def __init__(
        self,
        grpc_port: int,
        metrics_port: int,
        sd_file: str,
        active: bool,
        security: PackedSecurity,
        settings: dict[str, Any],
    ) -> None:
        host = node_address()
        grpc_address, metrics_address = f"{host}:{grpc_port}", f"{host}:{metrics_port}"
        self._running = contextlib.ExitStack()
        with security.unpacked() as files:  # on disk only until the collector has read them
            self._collector = Collector(
                grpc_address, metrics_address, active=active, security=files, **settings
            )
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

    def attach(self, job: str | None = None, token: str | None = None) -> None:
        self._collector.attach(job, token=token)

    def detach(self, job: str | None = None, token: str | None = None) -> None:
        self._collector.detach(job, token=token)

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
    grpc_port: int = DEFAULTS.grpc_port,
    metrics_port: int = DEFAULTS.metrics_port,
    sd_file: str | Path = DEFAULTS.sd_file,
    active: bool = True,
    timeout: float = DEFAULTS.actor_timeout,
    security: Security | PackedSecurity | None = None,
    **settings: Any,
) -> tuple[ray.actor.ActorHandle, dict[str, str]]:
    """Start the collector actor, or find the running one (as it was started); return it with its targets.

    Needs a connected driver (`connect`). `active=False` starts it with every job paused
    (then `attach(job)` chooses which to watch); `security`: who may stream and scrape (its
    files are read here, see the module docstring); `settings` go to `Collector`. Before
    anything starts, a bad security file raises AuthConfigError and an unprotected non-loopback
    node InsecureError (checked for this node, where the actor prefers to run). A collector that
    cannot start (a port in use; elsewhere, unprotected) raises the actor's error here.
    """
    running = find()
    if running is not None:
        return running, ray.get(running.targets.remote(), timeout=timeout)
    if not isinstance(security, PackedSecurity):
        security = PackedSecurity.pack(security or Security())
    security.check_exposure(node_address())
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
        .remote(grpc_port, metrics_port, str(Path(sd_file).expanduser()), active, security, settings)
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
