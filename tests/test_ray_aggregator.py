"""A node's aggregator as a Ray actor on a real local Ray cluster: pinned to its node and named
for it, found by the node's agents before the collector, forwarding one frame per step to the
collector, and restarted by Ray when its process is killed (the agents look it up again).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from thermoscope.agent import discovery  # noqa: E402
from thermoscope.collector.node import actor as node_actor  # noqa: E402
from thermoscope.collector.service import Collector  # noqa: E402
from thermoscope.wire.contract import NAMESPACE, aggregator_name  # noqa: E402

from helpers.protocol import OpenStream, frame, hello  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A local Ray cluster on loopback (as tests/test_ray.py starts one); leaves no state behind."""
    home_ray = Path.home() / ".ray"
    had_home_ray = home_ray.exists()
    temp = tempfile.mkdtemp(prefix="ts-ray-")
    saved = dict(os.environ)
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ.pop("THERMOSCOPE_COLLECTOR", None)
    ray.init(
        address="local",
        num_cpus=2,
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        _temp_dir=temp,
        logging_level="WARNING",
        namespace=NAMESPACE,
    )
    try:
        yield ray.get_runtime_context().get_node_id()
    finally:
        ray.shutdown()
        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(temp, ignore_errors=True)
        if not had_home_ray:
            shutil.rmtree(home_ray, ignore_errors=True)


def stream_steps(target: str, job: str, steps: range) -> None:
    """Ranks 0 and 1 of a 2-rank job send `steps` through `target` and are acknowledged."""
    ranks = [OpenStream(target, hello(job, rank=r, world_size=2)) for r in range(2)]
    for seq, step in enumerate(steps, start=1):
        for s in ranks:
            s.send(frame(seq, step))
        for s in ranks:
            while not (reply := s.reply(timeout=30)).HasField("ack") or reply.ack.seq < seq:
                pass
    for s in ranks:
        s.close()


def _pid(actor: object) -> int:
    """The process an actor runs in (`ActorHandle.__ray_call__` calls it there)."""
    return os.getpid()


# Ray's workers cannot import this test module: its functions travel by value
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def test_agents_on_a_node_stream_through_its_aggregator_actor_which_ray_restarts(
    cluster: str, collector: Collector
):
    handle = node_actor.start(cluster, collector.grpc_target, ranks=2)
    try:
        assert ray.get_actor(aggregator_name(cluster), namespace=NAMESPACE)._actor_id == handle._actor_id
        first = discovery.find_collector()
        assert first == ray.get(handle.address.remote()) and first != collector.grpc_target
        stream_steps(first, "j", range(3))
        job = collector.jobs["j"]
        assert job.merged_step == 2 and job.frames_received == 3  # one node frame per step
        assert sorted(job.liveness().finished) == [0, 1]  # both ranks, heard and finished

        killed = ray.get(handle.__ray_call__.remote(_pid))
        ray.kill(handle, no_restart=False)  # its process dies: Ray starts it again on its node
        deadline = time.monotonic() + 120
        while True:  # ray.kill returns before the process is gone: wait for its successor's answer
            with contextlib.suppress(Exception):  # restarting
                if ray.get(handle.__ray_call__.remote(_pid), timeout=10) != killed:
                    break
            assert time.monotonic() < deadline, "the aggregator actor did not come back"
            time.sleep(0.5)
        again = discovery.find_collector()
        # the killed process cannot answer: steps that merge now went through its successor (which
        # may have been given the same free port by the OS)
        stream_steps(again, "j", range(3, 5))
        assert job.merged_step == 4
    finally:
        assert node_actor.stop_all() == 1
    assert discovery.find_collector() is None  # neither an aggregator nor a collector actor now
