"""Where the collector is, for agents that were given no address.

In order: `$THERMOSCOPE_COLLECTOR` ("host:port"), then — in a process that is part of a
Ray cluster — its node's aggregator actor (`aggregator_name(node id)`, which pre-merges the
node's ranks for a large job: collector/node/actor.py), else the detached actor named
`ACTOR_NAME` in namespace `NAMESPACE`, which `thermoscope attach` (or `thermoscope collector
--ray`) starts. Ray is never imported
here: a process that has not imported it is not in a Ray cluster.

An address may list several collectors ("host:port,host:port,..."): one Python process
ingests a few hundred thousand layer-samples per second, so large fleets run several and
shard them by job (`thermoscope.wire.contract.shard`): every rank of a job picks the same
one, which merges it whole.
"""

from __future__ import annotations

import os
import sys

from thermoscope.wire.contract import ACTOR_NAME, DEFAULT_GRPC, NAMESPACE, aggregator_name, split_address

#: Seconds between lookups while no collector is found; `$THERMOSCOPE_DISCOVERY_INTERVAL`.
DEFAULT_INTERVAL = 5.0


def interval() -> float:
    """The discovery interval, from the environment (a bad value is an error, not a default)."""
    raw = os.environ.get("THERMOSCOPE_DISCOVERY_INTERVAL")
    if raw is None:
        return DEFAULT_INTERVAL
    value = float(raw)
    if not value > 0:
        raise ValueError(f"THERMOSCOPE_DISCOVERY_INTERVAL must be a positive number of seconds, got {raw!r}")
    return value


def checked(address: str) -> str:
    """`address` ("host:port", or several comma-separated) as a `Monitor` was given it; ValueError,
    one line, for what no collector could be at: a URL, a missing colon. They once read "no
    collector answering" in a log line, for ever."""
    for target in address.split(","):
        target = target.strip()
        if "://" in target:
            raise ValueError(
                f"thermoscope: collector {target!r} is a URL: give the collector's gRPC address as "
                f"HOST:PORT (e.g. {DEFAULT_GRPC}); its /metrics URL is for Prometheus, not for agents"
            )
        try:
            split_address(target)
        except ValueError as exc:
            raise ValueError(f"thermoscope: collector: {exc} (e.g. {DEFAULT_GRPC})") from None
    return address


def find_collector() -> str | None:
    """The collector's gRPC "host:port", or None if there is none (yet)."""
    address = os.environ.get("THERMOSCOPE_COLLECTOR")
    if address:
        return address
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    node = ray.get_runtime_context().get_node_id()
    try:  # this node's aggregator first: it forwards to the collector
        aggregator = ray.get_actor(aggregator_name(node), namespace=NAMESPACE)
    except ValueError:  # none on this node: stream to the collector itself
        aggregator = None
    if aggregator is not None:
        return ray.get(aggregator.address.remote(), timeout=10)
    try:
        actor = ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)
    except ValueError:  # no such actor: nobody attached Thermoscope yet
        return None
    return ray.get(actor.address.remote(), timeout=10)
