"""The names and numbers both sides of the wire agree on, beside the .proto they belong to.

The agent, the collector and the command line import these instead of writing them again: the
release both sides are, the gRPC service and its one method, the default listen addresses, the
Ray actor agents look up, how a job picks its collector among several, and what counts as loopback.
"""

from __future__ import annotations

import ipaddress
import zlib
from importlib.metadata import version

#: This release: pyproject.toml's version, as installed. Agents say it in their hello, the
#: collector at `/metrics` (`thermoscope_collector_info`).
VERSION = version("thermoscope")

#: The gRPC service of proto/thermoscope/v1/telemetry.proto and its one method's full path.
SERVICE = "thermoscope.v1.Telemetry"
STREAM_METHOD = f"/{SERVICE}/Stream"

#: Default ports: agents stream to the gRPC one, Prometheus scrapes /metrics on the other.
GRPC_PORT = 50051
METRICS_PORT = 9108
DEFAULT_GRPC = f"127.0.0.1:{GRPC_PORT}"
DEFAULT_METRICS = f"127.0.0.1:{METRICS_PORT}"

#: The collector actor's name and namespace on Ray (named actors are looked up per namespace).
ACTOR_NAME = "thermoscope-collector"
NAMESPACE = "thermoscope"


def aggregator_name(node_id: str) -> str:
    """The Ray actor name of the node aggregator on node `node_id` (one per node, same namespace)."""
    return f"thermoscope-aggregator-{node_id}"


def split_address(address: str) -> tuple[str, int]:
    """("host", port) of "host:port" (an IPv6 host may be bracketed; port 0..65535, 0: any free
    one); ValueError otherwise, before anything tries to bind or dial it."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"address must be HOST:PORT, got {address!r}")
    if int(port) > 65535:
        raise ValueError(f"port {int(port)} is not in 0..65535, in {address!r}")
    return host.strip("[]"), int(port)


def shard(address: str, job_id: str) -> str:
    """The collector of `job_id` among a comma-separated list: the same for every rank of the
    job, in every process (a CRC-32 of the job id, not Python's salted `hash`)."""
    targets = [t.strip() for t in address.split(",") if t.strip()]
    if not targets:
        raise ValueError(f"no collector address in {address!r}")
    return targets[zlib.crc32(job_id.encode()) % len(targets)]


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or `localhost`; everything else (0.0.0.0, ::, names) counts as exposed."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
