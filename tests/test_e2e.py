"""The whole path: a real agent in a training loop -> gRPC -> `thermoscope collector` -> /metrics."""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request

import numpy as np
import pytest
import torch
from torch import nn

from thermoscope.agent import Monitor
from thermoscope.collector.service import Collector
from thermoscope.science import physics
from thermoscope.science.stats import LayerStats, Sample
from thermoscope.wire.codec import encode

from helpers.metrics import scrape, value, wait_for_value
from helpers.processes import free_port
from helpers.protocol import BINS, OpenStream, frame, hello, histogram, layer_table, site_stats, stream
from helpers.reference import efficiency64, entropy64, layer_entropy64, work64
from helpers.training import train_steps


@pytest.mark.slow
def test_metrics_match_a_direct_computation_from_the_models_parameters(collector_process) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 200), nn.ReLU(), nn.Linear(200, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    monitor = Monitor(model, opt, collector=collector_process.grpc_target, job="e2e", every=2)
    steps, last = 20, 18
    saved = {}  # the sample at step 18 carries the work of the sampled update at step 16, w+
    for step in range(steps):
        x = torch.randn(32, 8)
        loss = nn.functional.mse_loss(model(x), x.sum(1, keepdim=True))
        opt.zero_grad()
        loss.backward()
        if step == last - 2:
            saved["before"] = [p.detach().clone() for p in model.parameters()]
        if step == last - 1:
            grads = [p.grad.clone() for p in model.parameters()]  # the next step's gradient
        if step == last:
            before = [p.detach().clone() for p in model.parameters()]
            with torch.no_grad():
                z = model[0](x)
                relu_eta = efficiency64(z, torch.relu(z))
            truth_loss = loss.item()
        opt.step()
        if step == last - 2:
            saved["after"] = [p.detach().clone() for p in model.parameters()]
        monitor.step(loss)
    assert monitor.close(timeout=10)
    assert monitor.dropped == 0

    m = wait_for_value(collector_process.metrics_url, "thermoscope_last_step", last, job_id="e2e")
    names = [layer.name for layer in monitor.layers]
    assert names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    entropies = [entropy64(b) for b in before]  # the job's sum counts the 1-value bias at its floor
    works = work64(grads, saved["after"], saved["before"])
    for name, b, w in zip(names, before, works, strict=True):
        # the 1-value bias has no spread, so no entropy reading (NaN), nor an inverse temperature
        assert value(m, "thermoscope_layer_entropy_nats", job_id="e2e", layer=name) == pytest.approx(
            layer_entropy64(b), rel=1e-6, nan_ok=True
        )
        assert value(m, "thermoscope_layer_work", job_id="e2e", layer=name) == pytest.approx(
            w, rel=1e-4, abs=1e-12
        )
        beta = value(m, "thermoscope_layer_inverse_temperature", job_id="e2e", layer=name)
        t = value(m, "thermoscope_layer_temperature", job_id="e2e", layer=name)
        assert np.isfinite(beta) == (name != "2.bias") and (np.isnan(t) or t == pytest.approx(1 / beta))
    assert value(m, "thermoscope_energy", job_id="e2e") == pytest.approx(truth_loss, rel=1e-6)
    assert value(m, "thermoscope_entropy_nats", job_id="e2e") == pytest.approx(sum(entropies), rel=1e-6)
    assert value(m, "thermoscope_site_efficiency_ratio", job_id="e2e", site="1") == pytest.approx(
        relu_eta, rel=1e-6
    )
    # one site: every quantile of the sites' efficiencies is its own, and it is both extremes
    for q in ("0", "0.25", "0.5", "0.75", "1"):
        assert value(m, "thermoscope_site_efficiency_quantile_ratio", job_id="e2e", q=q) == pytest.approx(
            relu_eta, rel=1e-6
        )
    for extreme in ("min", "max"):
        assert value(
            m, "thermoscope_site_efficiency_extreme_ratio", job_id="e2e", extreme=extreme, site="1"
        ) == pytest.approx(relu_eta, rel=1e-6)
    assert value(m, "thermoscope_frames_received_total", job_id="e2e") == steps // 2
    engine = {"job_id": "e2e", "site": "1", "engine": "A", "function": "ReLU()"}
    assert value(m, "thermoscope_engine_info", **engine) == 1  # ReLU
    assert value(m, "thermoscope_network_engine_info", job_id="e2e", engine="A") == 1
    wait_for_value(collector_process.metrics_url, "thermoscope_agents_connected", 0, job_id="e2e")
    # no series carries a label Prometheus owns, and only liveness has a rank (none per layer)
    labels = {label for (_, ls) in m for label, _ in ls}
    assert not labels & {"job", "instance"}
    assert {name for (name, ls) in m if "rank" in dict(ls)} <= {"thermoscope_rank_stale"}


def test_replicas_count_once_and_energy_is_the_mean_over_ranks(collector) -> None:
    """Two data-parallel ranks: layers from the lowest rank, loss averaged, site batches pooled."""
    msgs = []
    for rank, (energy, mean) in enumerate(((1.0, 0.1), (3.0, 0.7))):
        hist = histogram(2, per_bin=10)
        hist[:, 1] += 100 * rank  # rank 1's copy differs: it must not be counted
        s = Sample(
            5,
            time.time(),
            energy,
            LayerStats(
                np.array([100, 100]), np.full(2, mean), np.full(2, 2.0), np.zeros(2), np.ones(2), hist
            ),
            site_stats(np.array([64]), *(np.ones(1) * (rank + 1) for _ in range(4))),
        )
        msgs.append((hello("dp", rank=rank, world_size=2), encode(s, 1)))
    ranks = [OpenStream(collector.grpc_target, first) for first, _ in msgs]  # both connected
    for agent, (_, msg) in zip(ranks, msgs, strict=True):
        assert agent.ack(msg) == 1
    metrics = wait_for_value(collector.metrics_url, "thermoscope_last_step", 5, job_id="dp")
    assert value(metrics, "thermoscope_energy", job_id="dp") == pytest.approx(2.0)
    expected = physics.layer_entropy(np.array([100]), np.array([0.1]), np.array([2.0]))[0]
    assert value(metrics, "thermoscope_layer_entropy_nats", job_id="dp", layer="layer0") == pytest.approx(
        expected
    )
    assert value(metrics, "thermoscope_layer_work", job_id="dp", layer="layer0") == pytest.approx(1.0)
    # rank 0's flat histogram over [-1, 1) in 8 bins: h = ln 8 + ln(2/8) = ln 2 per value
    assert value(metrics, "thermoscope_layer_binned_entropy_nats", job_id="dp", layer="layer0") == (
        pytest.approx(100 * np.log(2.0))
    )
    # sites pool both batches: 128 values with means 1 and 2
    assert value(metrics, "thermoscope_site_efficiency_ratio", job_id="dp", site="site0") == pytest.approx(
        1 - (2 + 2 * 64 * 0.25) / (2 + 2 * 64 * 0.25)
    )
    for agent in ranks:
        agent.close()


def counts_on_edges(v: np.ndarray) -> np.ndarray:
    """[below -1, BINS bins over [-1, 1), at or above 1]: the layout of a frame's histogram."""
    inside = np.histogram(v[(v >= -1) & (v < 1)], bins=BINS, range=(-1.0, 1.0))[0]
    return np.array([(v < -1).sum(), *inside, (v >= 1).sum()])


def test_shards_of_one_tensor_merge_to_the_whole_tensors_entropy(collector) -> None:
    """Three ranks each hold a third of two tensors (FSDP-style); the collector sees the whole."""
    rng = np.random.default_rng(0)
    whole = rng.normal(0.2, 1.5, (2, 3000))
    g = rng.normal(0, 1e-3, (2, 3000))
    ranks = [
        OpenStream(
            collector.grpc_target,
            hello("fsdp", rank=rank, world_size=3, layers=layer_table(2, shard=(rank, 3), numel=1000)),
        )
        for rank in range(3)
    ]
    for agent, part in zip(ranks, np.split(np.arange(3000), 3), strict=True):
        x, gx = whole[:, part], g[:, part]
        mean = x.mean(1)
        hist = np.stack([counts_on_edges(v) for v in x])
        s = Sample(
            7,
            time.time(),
            0.5,
            LayerStats(
                np.full(2, 1000),
                mean,
                ((x - mean[:, None]) ** 2).sum(1),
                (gx * x).sum(1),
                (gx * (x - 0.01)).sum(1),
                hist,
            ),
            site_stats(np.array([10]), *(np.ones(1) for _ in range(4))),
        )
        assert agent.ack(encode(s, 1)) == 1
    metrics = wait_for_value(collector.metrics_url, "thermoscope_last_step", 7, job_id="fsdp")
    for i in range(2):
        v = whole[i]
        expected = v.size * physics.gaussian_entropy(v.var())
        got = value(metrics, "thermoscope_layer_entropy_nats", job_id="fsdp", layer=f"layer{i}")
        assert got == pytest.approx(expected, rel=1e-12)
        work = value(metrics, "thermoscope_layer_work", job_id="fsdp", layer=f"layer{i}")
        assert work == pytest.approx(-0.01 * g[i].sum(), rel=1e-9)
        inside = counts_on_edges(v)[1:-1]
        p = inside / inside.sum()
        h_hist = -(p[p > 0] * np.log(p[p > 0])).sum() + np.log(2.0 / BINS)
        got = value(metrics, "thermoscope_layer_binned_entropy_nats", job_id="fsdp", layer=f"layer{i}")
        assert got == pytest.approx(v.size * h_hist, rel=1e-12)
        negentropy = value(metrics, "thermoscope_layer_negentropy_nats", job_id="fsdp", layer=f"layer{i}")
        assert negentropy == pytest.approx(physics.gaussian_entropy(v.var()) - h_hist, rel=1e-9)
        outside = ((v < -1) | (v >= 1)).mean()
        got = value(metrics, "thermoscope_layer_outside_edges_ratio", job_id="fsdp", layer=f"layer{i}")
        assert got == pytest.approx(outside, rel=1e-12)
    for agent in ranks:
        agent.close()


def test_a_step_waits_for_every_connected_rank(collector) -> None:
    """Rank 0 has sent step 1, rank 1 only step 0: the job shows step 0 until rank 1 sends step 1."""
    rank1 = OpenStream(collector.grpc_target, hello("sync", rank=1, world_size=2))
    rank0 = OpenStream(collector.grpc_target, hello("sync", rank=0, world_size=2))
    assert rank1.ack(frame(1, 0)) == 1
    assert rank0.ack(frame(1, 0)) == 1
    assert rank0.ack(frame(2, 1)) == 2
    wait_for_value(collector.metrics_url, "thermoscope_last_step", 0, job_id="sync")
    time.sleep(0.2)
    assert value(scrape(collector.metrics_url), "thermoscope_last_step", job_id="sync") == 0
    assert rank1.ack(frame(2, 1)) == 2
    wait_for_value(collector.metrics_url, "thermoscope_last_step", 1, job_id="sync")
    rank0.close()
    rank1.close()


def test_a_step_waits_for_the_ranks_of_the_world_that_have_not_connected_yet(collector) -> None:
    """Agents that discover their collector connect up to an interval apart: rank 0's first steps
    wait for rank 1 (a bounded wait), so the job's energy is the mean of both ranks' losses."""
    rank0 = OpenStream(collector.grpc_target, hello("joining", rank=0, world_size=2))
    for seq, step in enumerate((0, 1, 2), start=1):
        assert rank0.ack(frame(seq, step, energy=1.0)) == seq
    time.sleep(0.2)
    assert collector.jobs["joining"].reading is None  # rank 1 has not connected: nothing merged
    rank1 = OpenStream(collector.grpc_target, hello("joining", rank=1, world_size=2))
    for seq, step in enumerate((0, 1, 2), start=1):
        assert rank1.ack(frame(seq, step, energy=3.0)) == seq
    wait_for_value(collector.metrics_url, "thermoscope_last_step", 2, job_id="joining")
    assert value(scrape(collector.metrics_url), "thermoscope_energy", job_id="joining") == 2.0
    assert collector.jobs["joining"].frames_late == 0
    rank0.close()
    rank1.close()


@pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool comes with Debian's prometheus (.ci/run)"
)
def test_metrics_pass_promtool_check_metrics(collector) -> None:
    assert stream(collector.grpc_target, [hello("lint"), frame(1, 0), frame(2, 1)])[1] is None
    wait_for_value(collector.metrics_url, "thermoscope_last_step", 1, job_id="lint")
    with urllib.request.urlopen(collector.metrics_url, timeout=5) as resp:
        text = resp.read()
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()
    assert result.stdout.decode().strip() == "" and result.stderr.decode().strip() == ""


def test_an_agent_started_before_its_collector_connects_when_it_appears() -> None:
    port = free_port()
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    monitor = Monitor(model, opt, collector=f"127.0.0.1:{port}", job="late", every=1, max_queue=8)
    train_steps(monitor, model, opt, 20)
    time.sleep(0.5)
    assert monitor.dropped > 0 and monitor.delivered == 0
    with Collector(f"127.0.0.1:{port}", "127.0.0.1:0", db=None).running() as collector:
        deadline = time.monotonic() + 30
        while monitor.delivered == 0:  # keeps training; the sender retries with backoff meanwhile
            assert time.monotonic() < deadline, "the agent never reconnected"
            train_steps(monitor, model, opt, 1)
            time.sleep(0.05)
        # not every sampled step arrived (the queue of 8 overflowed meanwhile): close() says so
        assert monitor.close(timeout=10) is False
        assert collector.jobs["late"].frames_received == monitor.delivered
        assert monitor.delivered + monitor.dropped == monitor.sampled


def test_the_collector_sets_the_agents_sampling_interval() -> None:
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with Collector("127.0.0.1:0", "127.0.0.1:0", every=3, db=None).running() as collector:
        monitor = Monitor(model, opt, collector=collector.grpc_target, job="cfg", every=10)
        train_steps(monitor, model, opt, 1)  # step 0 is sampled: the stream opens
        deadline = time.monotonic() + 15
        while monitor.every != 3:
            assert time.monotonic() < deadline, "the configuration never arrived"
            time.sleep(0.05)
        train_steps(monitor, model, opt, 11)  # steps 1..11: 3, 6, 9 sampled
        assert monitor.close(timeout=10)
        assert collector.jobs["cfg"].frames_received == 4


def test_every_sampled_step_is_delivered_or_counted_across_a_collector_restart() -> None:
    port = free_port()
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    monitor = Monitor(model, opt, collector=f"127.0.0.1:{port}", job="restart", every=1)
    received = 0
    for _ in range(2):  # the collector goes away mid-run and a new one takes its port
        with Collector(f"127.0.0.1:{port}", "127.0.0.1:0", db=None).running() as collector:
            deadline = time.monotonic() + 30
            start = monitor.delivered
            while monitor.delivered < start + 20:
                assert time.monotonic() < deadline, "no frames reached the collector"
                train_steps(monitor, model, opt, 5)
                time.sleep(0.01)
            monitor.flush(timeout=10)
        received += collector.jobs["restart"].frames_received
        train_steps(monitor, model, opt, 10)  # no collector: queued, sent to the next one or dropped
    assert monitor.close(timeout=0.5) is False
    sampled = monitor._step
    assert monitor.delivered == received
    assert monitor.delivered + monitor.dropped == sampled
    assert monitor.dropped >= 10  # the last steps, sampled after the second collector left
