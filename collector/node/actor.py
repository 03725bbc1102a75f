"""A node's aggregator (node/aggregator.py) as a Ray actor: one per node, pinned to it
(`NodeAffinitySchedulingStrategy(node, soft=False)`), restarted by Ray whenever it dies
(`max_restarts=-1`), found by its per-node name (`contract.aggregator_name`), which agents on
that node look up before the collector's (`agent/discovery.py`).

It listens on a free loopback port of its node (its agents are there); a restarted actor gets a
new one, and the agents, whose streams broke, look it up again and replay from their spools.
It asks for no CPU, as the collector actor does (a training job's workers can fill the cluster).
Upstream it proves itself as the agents do, from its process' environment (the job's runtime
env: `THERMOSCOPE_TOKEN`, `THERMOSCOPE_TLS*`), and takes ranks presenting a token of `tokens` (a
tokens file on its node), else its own token (node/aggregator.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from thermoscope.agent.security import resolve
from thermoscope.collector.ingest.grpc_auth import TokenTable
from thermoscope.wire.contract import NAMESPACE, aggregator_name

from .aggregator import Aggregator

#: Seconds to wait for an aggregator actor to serve.
TIMEOUT = 60.0


class AggregatorActor:
    """The aggregator on its own event loop thread inside the actor's process."""

    def __init__(self, collector: str, ranks: int, tokens: str | None = None) -> None:
        table = None if tokens is None else TokenTable.load(tokens)
        self._aggregator = Aggregator(collector, ranks, security=resolve(), tokens=table)
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="thermoscope-aggregator", daemon=True).start()
        self._server = self._call(self._aggregator.start("127.0.0.1:0"))

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=TIMEOUT)

    def address(self) -> str:
        """The loopback gRPC target its node's agents stream to."""
        return f"127.0.0.1:{self._aggregator.port}"

    def stop(self) -> None:
        self._call(self._server.stop(2.0))
        self._call(self._aggregator.close())


def start(node_id: str, collector: str, ranks: int, tokens: str | None = None) -> ray.actor.ActorHandle:
    """Start the aggregator of node `node_id` (or find the running one) for `ranks` ranks there,
    forwarding to `collector` ("host:port", reachable from that node), taking the ranks that
    present a token of the tokens file `tokens` (a path on that node). Needs a connected driver."""
    handle = (
        ray.remote(AggregatorActor)
        .options(
            name=aggregator_name(node_id),
            namespace=NAMESPACE,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            max_restarts=-1,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        )
        .remote(collector, ranks, tokens)
    )
    ray.get(handle.address.remote(), timeout=TIMEOUT)  # it serves, or its error is raised here
    return handle


def start_all(collector: str, ranks: int, tokens: str | None = None) -> dict[str, ray.actor.ActorHandle]:
    """An aggregator on every alive node of the cluster, by node id."""
    return {n["NodeID"]: start(n["NodeID"], collector, ranks, tokens) for n in ray.nodes() if n["Alive"]}


def stop_all() -> int:
    """Stop and remove every node's aggregator; how many there were."""
    stopped = 0
    for node in ray.nodes():
        try:
            handle = ray.get_actor(aggregator_name(node["NodeID"]), namespace=NAMESPACE)
        except ValueError:
            continue
        with contextlib.suppress(ray.exceptions.RayActorError):
            ray.get(handle.stop.remote(), timeout=30)
        ray.kill(handle)
        stopped += 1
    return stopped
