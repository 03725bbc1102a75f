"""Rank liveness and attach/detach, against a real collector over real gRPC on loopback.

A rank whose stream breaks, or that falls silent while its job streams, is stale; one that
finished (half-closed) is forgotten; one that comes back is live again and counts nothing
twice. `Collector.detach` / `attach` reach every open stream of the job at once.
"""

from __future__ import annotations

import json
import queue
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

from thermoscope.agent import Monitor
from thermoscope.collector.service import Collector

from helpers.metrics import scrape
from helpers.processes import start_collector_process
from helpers.protocol import OpenStream, frame, hello, stream
from helpers.training import train_steps


def metric(c: Collector, name: str, **labels: str) -> float | None:
    return scrape(c.metrics_url).get((name, frozenset(labels.items())))


def eventually(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not after {timeout} s"
        time.sleep(0.02)


def stale_of(c: Collector, job: str) -> dict[str, float]:
    """rank -> thermoscope_rank_stale of the job's series."""
    return {
        dict(labels)["rank"]: v
        for (name, labels), v in scrape(c.metrics_url).items()
        if name == "thermoscope_rank_stale" and dict(labels)["job_id"] == job
    }


@pytest.fixture
def quick() -> Iterator[Collector]:
    """A collector that judges a rank stale after 0.3 s of silence."""
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=None, stale_after=0.3).running() as c:
        yield c


# -- Task A: liveness -------------------------------------------------------------------------------


def test_a_broken_stream_makes_its_rank_stale_and_counts_it_lost(collector) -> None:
    ranks = [OpenStream(collector.grpc_target, hello("crash", rank=r, world_size=2)) for r in range(2)]
    for agent in ranks:
        assert agent.ack(frame(1, 0)) == 1
    assert metric(collector, "thermoscope_agents_connected", job_id="crash") == 2
    assert stale_of(collector, "crash") == {"0": 0, "1": 0}

    ranks[1].cancel()  # the worker died
    eventually(lambda: stale_of(collector, "crash") == {"0": 0, "1": 1}, "rank 1 stale")
    assert metric(collector, "thermoscope_agents_connected", job_id="crash") == 1
    assert metric(collector, "thermoscope_rank_lost_total", job_id="crash") == 1
    snap = collector.snapshot()["crash"]
    assert snap["agents_connected"] == 1
    assert {r: v["stale"] for r, v in snap["ranks"].items()} == {0: False, 1: True}
    assert ranks[0].ack(frame(2, 1)) == 2  # rank 0 streams on
    ranks[0].close()


def test_a_rank_that_finishes_cleanly_is_neither_stale_nor_lost(collector) -> None:
    agent = OpenStream(collector.grpc_target, hello("done"))
    assert agent.ack(frame(1, 0)) == 1
    agent.close()  # half-close: the agent finished
    assert stream(collector.grpc_target, [hello("done", rank=1, world_size=2), frame(1, 0)])[1] is None
    eventually(lambda: metric(collector, "thermoscope_agents_connected", job_id="done") == 0, "closed")
    assert stale_of(collector, "done") == {}
    assert metric(collector, "thermoscope_rank_lost_total", job_id="done") == 0
    ranks = collector.snapshot()["done"]["ranks"]  # kept for the record, as finished
    assert {r: (v["stale"], v["finished"], v["frames"]) for r, v in ranks.items()} == {
        0: (False, True, 1),
        1: (False, True, 1),
    }


@pytest.mark.slow
def test_cancels_and_half_closes_are_told_apart_every_time(collector) -> None:
    """grpc.aio can show a cancel as an end of requests; the collector still tells them apart."""
    rounds = 50
    for i in range(rounds):
        agent = OpenStream(collector.grpc_target, hello("flaky"))
        assert agent.ack(frame(1, i)) == 1
        agent.cancel()
        eventually(lambda: stale_of(collector, "flaky") == {"0": 1}, f"round {i}: stale after a cancel")
        agent = OpenStream(collector.grpc_target, hello("flaky"))
        agent.close()
        eventually(lambda: stale_of(collector, "flaky") == {}, f"round {i}: forgotten after a half-close")
    assert metric(collector, "thermoscope_rank_lost_total", job_id="flaky") == rounds


def test_an_open_but_silent_stream_goes_stale_and_is_live_again_when_it_sends(quick) -> None:
    agent = OpenStream(quick.grpc_target, hello("quiet"))
    assert agent.ack(frame(1, 0)) == 1
    assert stale_of(quick, "quiet") == {"0": 0}
    time.sleep(0.5)
    assert stale_of(quick, "quiet") == {"0": 1}
    assert metric(quick, "thermoscope_agents_connected", job_id="quiet") == 0
    assert metric(quick, "thermoscope_rank_lost_total", job_id="quiet") == 1  # counted once,
    assert metric(quick, "thermoscope_rank_lost_total", job_id="quiet") == 1  # however often scraped
    assert agent.ack(frame(2, 1)) == 2
    assert stale_of(quick, "quiet") == {"0": 0}
    assert metric(quick, "thermoscope_agents_connected", job_id="quiet") == 1
    time.sleep(0.5)  # silent again, and no one looks until it sends: still counted
    assert agent.ack(frame(3, 2)) == 3
    assert metric(quick, "thermoscope_rank_lost_total", job_id="quiet") == 2
    assert stale_of(quick, "quiet") == {"0": 0}
    agent.close()


def test_a_rank_that_reconnects_is_live_again_and_its_replayed_steps_count_once(collector) -> None:
    """Ray restarts rank 1 from the checkpoint of step 2: steps 2..4 come again, applied once."""
    r0, r1 = (OpenStream(collector.grpc_target, hello("ray", rank=r, world_size=2)) for r in range(2))
    for step in range(3):
        assert r0.ack(frame(step + 1, step, energy=1.0)) == step + 1
        assert r1.ack(frame(step + 1, step, energy=3.0)) == step + 1
    assert collector.snapshot()["ray"]["energy"] == pytest.approx(2.0)  # mean over the ranks
    r1.cancel()
    eventually(lambda: stale_of(collector, "ray") == {"0": 0, "1": 1}, "rank 1 stale")
    for step in (3, 4):  # rank 0 goes on alone
        assert r0.ack(frame(step + 1, step, energy=1.0)) == step + 1
    before = collector.snapshot()["ray"]
    assert (before["last_step"], before["energy"], before["frames_late"]) == (4, 1.0, 0)

    r1 = OpenStream(collector.grpc_target, hello("ray", rank=1, world_size=2))  # same run, new process
    for seq, step in enumerate((2, 3, 4), start=1):  # replayed: acknowledged, counted late, not applied
        assert r1.ack(frame(seq, step, energy=100.0)) == seq
    after = collector.snapshot()["ray"]
    assert after["frames_late"] == 3
    assert after["last_step"] == 4
    assert after["energy"] == 1.0  # what the first streams sent for step 4
    assert after["layer_entropy"] == before["layer_entropy"]
    assert stale_of(collector, "ray") == {"0": 0, "1": 0}
    assert metric(collector, "thermoscope_agents_connected", job_id="ray") == 2
    assert metric(collector, "thermoscope_rank_lost_total", job_id="ray") == 1

    assert r0.ack(frame(6, 5, energy=1.0)) == 6  # the first new step merges both ranks again
    assert r1.ack(frame(4, 5, energy=3.0)) == 4
    snap = collector.snapshot()["ray"]
    assert (snap["last_step"], snap["energy"]) == (5, pytest.approx(2.0))
    assert snap["frames_received"] == 6 + 2 + 3 + 2
    assert snap["ranks"][1] == {
        "stale": False,
        "finished": False,
        "last_step": 5,
        "frames": 4,
        "run_id": "r1",
        "host": "test",
        "local_rank": 0,
        "node": "",
        "world_size": 2,
    }
    m = scrape(collector.metrics_url)
    assert m[("thermoscope_frames_received_total", frozenset({("job_id", "ray")}))] == 13
    assert m[("thermoscope_last_step", frozenset({("job_id", "ray")}))] == 5
    r0.close()
    r1.close()


@pytest.mark.slow
def test_the_collector_command_takes_stale_after(tmp_path) -> None:
    process = start_collector_process(tmp_path / "events.db", None, "--stale-after", "0.3")
    try:
        agent = OpenStream(process.grpc_target, hello("cli"))
        assert agent.ack(frame(1, 0)) == 1
        time.sleep(0.5)
        m = scrape(process.metrics_url)
        assert m[("thermoscope_rank_stale", frozenset({("job_id", "cli"), ("rank", "0")}))] == 1
        agent.close()
    finally:
        process.stop()


# -- Task B: attach / detach -------------------------------------------------------------------------


def next_config(agent: OpenStream, timeout: float) -> tuple[bool, float]:
    """The next reply, which must be a Config: its `paused` and how long it took to come."""
    start = time.monotonic()
    reply = agent.reply(timeout=timeout)
    assert reply.HasField("config"), reply
    return reply.config.paused, time.monotonic() - start


def test_detach_and_attach_reach_the_jobs_open_streams_at_once(collector) -> None:
    a, b = OpenStream(collector.grpc_target, hello("a")), OpenStream(collector.grpc_target, hello("b"))
    assert not a.config.paused and not b.config.paused
    assert metric(collector, "thermoscope_job_paused", job_id="a") == 0

    start = time.monotonic()
    collector.detach("a")
    paused, _ = next_config(a, timeout=1.0)
    assert paused and time.monotonic() - start < 0.1
    with pytest.raises(queue.Empty):
        b.reply(timeout=0.2)  # the other job heard nothing
    assert b.ack(frame(1, 0)) == 1
    assert metric(collector, "thermoscope_job_paused", job_id="a") == 1
    assert metric(collector, "thermoscope_job_paused", job_id="b") == 0

    start = time.monotonic()
    collector.attach("a")
    paused, _ = next_config(a, timeout=1.0)
    assert not paused and time.monotonic() - start < 0.1
    assert metric(collector, "thermoscope_job_paused", job_id="a") == 0

    collector.detach()  # every job
    assert next_config(a, 1.0)[0] and next_config(b, 1.0)[0]
    collector.attach("b")
    assert not next_config(b, 1.0)[0]
    with pytest.raises(queue.Empty):
        a.reply(timeout=0.2)
    collector.attach()  # every job, per-job choices dropped
    assert not next_config(a, 1.0)[0]
    with pytest.raises(queue.Empty):
        b.reply(timeout=0.2)  # b was already streaming
    assert a.ack(frame(1, 0)) == 1
    a.close()
    b.close()


def test_a_new_stream_gets_its_jobs_state_at_hello() -> None:
    c = Collector("127.0.0.1:0", "127.0.0.1:0", db=None, active=False)  # watch one job only
    c.attach("watched")  # before it runs: applied at once
    with c.running():
        watched = OpenStream(c.grpc_target, hello("watched"))
        other = OpenStream(c.grpc_target, hello("other"))
        assert not watched.config.paused and other.config.paused
        c.detach("watched")
        late = OpenStream(c.grpc_target, hello("watched", rank=1, world_size=2))
        assert late.config.paused
        snap = c.snapshot()
        assert (snap["watched"]["active"], snap["other"]["active"]) == (False, False)
        for agent in (watched, other, late):
            agent.close()


def test_a_paused_rank_is_not_stale_for_its_silence(quick) -> None:
    agent = OpenStream(quick.grpc_target, hello("idle"))
    assert agent.ack(frame(1, 0)) == 1
    quick.detach("idle")
    assert next_config(agent, 1.0)[0]
    time.sleep(0.5)  # silent longer than stale_after, but asked to be
    assert stale_of(quick, "idle") == {"0": 0}
    assert metric(quick, "thermoscope_agents_connected", job_id="idle") == 1
    quick.attach("idle")
    assert not next_config(agent, 1.0)[0]
    assert stale_of(quick, "idle") == {"0": 0}  # the silence clock starts at the resume
    time.sleep(0.5)
    assert stale_of(quick, "idle") == {"0": 1}
    assert metric(quick, "thermoscope_rank_lost_total", job_id="idle") == 1
    agent.close()


def test_snapshot_is_json_and_taken_on_the_collectors_loop(collector) -> None:
    assert collector.snapshot() == {}
    r0 = OpenStream(collector.grpc_target, hello("snap", rank=0, world_size=2))
    r1 = OpenStream(collector.grpc_target, hello("snap", rank=1, world_size=2))
    assert r0.ack(frame(1, 0, energy=0.5)) == 1
    assert r1.ack(frame(1, 0, energy=1.5)) == 1
    assert r0.ack(frame(2, 1, energy=0.5)) == 2
    snaps: list[dict] = []
    threads = [threading.Thread(target=lambda: snaps.append(collector.snapshot())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(snaps) == 4 and all(s == snaps[0] for s in snaps)
    job = json.loads(json.dumps(snaps[0]))["snap"]
    assert job["active"] is True
    assert job["agents_connected"] == 2
    assert job["last_step"] == 0  # rank 1 has not sent step 1 yet
    assert (job["frames_received"], job["frames_late"]) == (3, 0)
    assert job["energy"] == pytest.approx(1.0)
    assert set(job["layer_entropy"]) == {"layer0", "layer1"}
    assert all(isinstance(h, float) for h in job["layer_entropy"].values())
    assert job["ranks"]["0"] == {
        "stale": False,
        "finished": False,
        "last_step": 1,
        "frames": 2,
        "run_id": "r1",
        "host": "test",
        "local_rank": 0,
        "node": "",
        "world_size": 2,
    }
    assert job["ranks"]["1"]["last_step"] == 0
    r0.close()
    r1.close()


def test_a_detached_agent_stops_sending_while_training_goes_on_and_resumes_when_attached(
    collector,
) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    monitor = Monitor(model, opt, collector=collector.grpc_target, job="mon", every=1)

    def received() -> int:
        return collector.snapshot().get("mon", {}).get("frames_received", 0)

    def train_until(check: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + 15
        while not check():
            assert time.monotonic() < deadline, what
            train_steps(monitor, model, opt, 1)
            time.sleep(0.01)

    train_until(lambda: received() >= 5, "the agent never streamed")
    collector.detach("mon")
    train_until(lambda: not monitor.enabled, "the agent never heard it was paused")
    train_steps(monitor, model, opt, 2)  # a step armed before the config arrived may still be sent
    assert monitor.flush(timeout=10)
    paused_at = received()
    train_steps(monitor, model, opt, 30)
    time.sleep(0.3)
    assert received() == paused_at  # training went on, nothing was sent
    assert collector.snapshot()["mon"]["ranks"][0]["stale"] is False

    collector.attach("mon")
    train_until(lambda: received() >= paused_at + 5, "the agent never resumed")
    assert monitor.close(timeout=10)
    assert monitor.dropped == 0
    eventually(lambda: collector.snapshot()["mon"]["ranks"][0]["finished"], "the rank finished")
    assert stale_of(collector, "mon") == {}
    assert metric(collector, "thermoscope_rank_lost_total", job_id="mon") == 0


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool comes with Debian's prometheus")
def test_liveness_metrics_pass_promtool_check_metrics(collector) -> None:
    ok, lost = (OpenStream(collector.grpc_target, hello("lint", rank=r, world_size=2)) for r in range(2))
    lost.cancel()
    collector.detach("lint")
    eventually(lambda: stale_of(collector, "lint") == {"0": 0, "1": 1}, "rank 1 stale")
    with urllib.request.urlopen(collector.metrics_url, timeout=5) as resp:
        text = resp.read()
    for line in (
        b'thermoscope_rank_stale{job_id="lint",rank="1"} 1.0',
        b'thermoscope_rank_lost_total{job_id="lint"} 1.0',
        b'thermoscope_job_paused{job_id="lint"} 1.0',
        b'thermoscope_agents_connected{job_id="lint"} 1.0',
    ):
        assert line in text
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert result.stdout.decode().strip() == "" and result.stderr.decode().strip() == ""
    ok.close()
