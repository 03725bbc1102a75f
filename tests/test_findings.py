"""Findings: a real training loop streaming to a real `thermoscope collector` process raises each
finding on the right layer or site (and none on a healthy run), exported at /metrics, stored,
listed by `thermoscope events`."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from thermoscope.agent import Monitor
from thermoscope.collector.state.store import EventStore

from helpers.metrics import scrape, wait_for_value
from helpers.processes import CollectorProcess, start_collector_process, thermoscope

STEPS = 40
INDUCED = 15  # the step each pathology is induced at


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("findings") / "events.db"


@pytest.fixture(scope="module")
def collector(db: Path) -> Iterator[CollectorProcess]:
    process = start_collector_process(db)
    try:
        yield process
    finally:
        process.stop()


def nothing(model: nn.Sequential, step: int) -> None:
    pass


def train(
    collector: CollectorProcess,
    job: str,
    induce: Callable[[nn.Sequential, int], None] = nothing,
    after_backward: Callable[[nn.Sequential, int], None] = nothing,
    first: int = 0,
    model: nn.Sequential | None = None,
) -> nn.Sequential:
    """STEPS Adam steps (from step `first`) of a Linear-ReLU-Linear-Tanh-Linear regression (or
    `model`), every step sampled, with `induce(model, step)` called before each step's forward
    and `after_backward` before its optimizer step; the model."""
    torch.manual_seed(first)
    if model is None:
        model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    monitor = Monitor(model, opt, collector=collector.grpc_target, job=job, run="r", every=1, step=first)
    for step in range(first, first + STEPS):
        induce(model, step)
        x = torch.randn(32, 6)
        loss = nn.functional.mse_loss(model(x), x[:, :1] - x[:, 1:2])
        opt.zero_grad()
        loss.backward()
        after_backward(model, step)
        opt.step()
        monitor.step(loss)
    assert monitor.close(timeout=10)
    wait_for_value(collector.metrics_url, "thermoscope_last_step", first + STEPS - 1, job_id=job)
    return model


def stored(db: Path, job: str) -> list[dict]:
    """The job's findings once the checkpoint at its streams' end wrote them."""
    deadline = time.monotonic() + 15
    while True:
        store = EventStore(db, create=False)
        try:
            if store.load_run(job, "r")[1] is not None or time.monotonic() > deadline:
                return store.findings(job=job)
        finally:
            store.close()
        time.sleep(0.1)


def held(url: str, job: str) -> set[tuple[str, str]]:
    """(finding, layer) of the job's `thermoscope_finding` series at 1."""
    return {
        (dict(labels)["finding"], dict(labels)["layer"])
        for (name, labels), v in scrape(url).items()
        if name == "thermoscope_finding" and dict(labels)["job_id"] == job and v == 1
    }


def test_a_healthy_run_raises_no_finding(collector, db) -> None:
    train(collector, "healthy")
    assert held(collector.metrics_url, "healthy") == set()
    assert stored(db, "healthy") == []


def test_a_relu_whose_bias_is_pushed_far_negative_is_a_dead_site_at_that_site(collector, db) -> None:
    def kill(model: nn.Sequential, step: int) -> None:
        if step == INDUCED:
            with torch.no_grad():
                model[0].bias.fill_(-1e3)  # every input of the ReLU negative: it passes 0

    train(collector, "dead", kill)
    assert held(collector.metrics_url, "dead") == {("dead_site", "1")}
    m = scrape(collector.metrics_url)
    assert m[("thermoscope_findings_total", frozenset({("job_id", "dead"), ("finding", "dead_site")}))] == 1
    (found,) = stored(db, "dead")
    assert (found["finding"], found["scope"], found["layer"], found["cleared"]) == (
        "dead_site",
        "site",
        "1",
        None,
    )
    assert INDUCED <= found["step"] <= INDUCED + 3  # within its RAISE_AFTER samples
    shown = thermoscope("top", "--collector", collector.metrics_url, "--job", "dead", "--once")
    assert shown.returncode == 0 and "dead_site 1" in shown.stdout, shown.stdout + shown.stderr
    listed = json.loads(thermoscope("events", "--db", str(db), "--json", "--job", "dead").stdout)
    assert [{k: e[k] for k in ("job", "scope", "layer", "finding")} for e in listed if "finding" in e] == [
        {"job": "dead", "scope": "site", "layer": "1", "finding": "dead_site"}
    ]


def test_a_finding_that_holds_carries_on_across_a_collector_restart_neither_lost_nor_raised_twice(
    tmp_path: Path,
) -> None:
    def kill(model: nn.Sequential, step: int) -> None:
        if step == INDUCED:
            with torch.no_grad():
                model[0].bias.fill_(-1e3)

    db = tmp_path / "events.db"
    first = start_collector_process(db)
    try:
        model = train(first, "restart", kill)
        assert held(first.metrics_url, "restart") == {("dead_site", "1")}
    finally:
        first.stop()
    second = start_collector_process(db)
    try:
        train(second, "restart", first=STEPS, model=model)  # the same run goes on: the ReLU stays dead
        assert held(second.metrics_url, "restart") == {("dead_site", "1")}
        m = scrape(second.metrics_url)
        assert (
            m[("thermoscope_findings_total", frozenset({("job_id", "restart"), ("finding", "dead_site")}))]
            == 1
        )
    finally:
        second.stop()
    store = EventStore(db, create=False)
    try:
        rows = store.findings(job="restart")
        assert [(f["finding"], f["layer"], f["cleared"]) for f in rows] == [("dead_site", "1", None)]
    finally:
        store.close()


def test_a_tanh_driven_into_its_flat_region_is_a_saturated_site_at_that_site(collector, db) -> None:
    def saturate(model: nn.Sequential, step: int) -> None:
        if step == INDUCED:
            with torch.no_grad():
                model[2].weight.mul_(100.0)  # the tanh's inputs 100x: it outputs +-1

    train(collector, "saturated", saturate)
    assert ("saturated_site", "3") in held(collector.metrics_url, "saturated")
    found = [f for f in stored(db, "saturated") if f["finding"] == "saturated_site"]
    assert [(f["layer"], f["scope"]) for f in found] == [("3", "site")]
    assert INDUCED <= found[0]["step"] <= INDUCED + 3


def test_a_layer_frozen_mid_run_is_a_frozen_layer_on_its_parameters_only(collector, db) -> None:
    def freeze(model: nn.Sequential, step: int) -> None:
        if step == INDUCED:
            model[2].weight.requires_grad_(False)
            model[2].bias.requires_grad_(False)

    train(collector, "frozen", freeze)
    assert held(collector.metrics_url, "frozen") == {("frozen_layer", "2.weight"), ("frozen_layer", "2.bias")}
    found = stored(db, "frozen")
    assert sorted(f["layer"] for f in found) == ["2.bias", "2.weight"]
    assert all(f["scope"] == "layer" and INDUCED <= f["step"] <= INDUCED + 4 for f in found)
    only = json.loads(thermoscope("events", "--db", str(db), "--json", "--finding", "frozen_layer").stdout)
    assert {e["layer"] for e in only if e["job"] == "frozen"} == {"2.weight", "2.bias"}
    assert all(e["finding"] == "frozen_layer" for e in only)


def test_a_nan_in_one_layer_is_a_nonfinite_finding_naming_that_layer_rank_and_step(collector, db) -> None:
    def poison(model: nn.Sequential, step: int) -> None:
        if step == INDUCED:  # after the backward: the NaN is in this layer's values alone
            with torch.no_grad():
                model[4].bias.fill_(float("nan"))

    def mend(model: nn.Sequential, step: int) -> None:
        if step == INDUCED + 1:  # before the next forward: training goes on
            with torch.no_grad():
                model[4].bias.fill_(0.0)

    train(collector, "nan", mend, poison)
    found = [f for f in stored(db, "nan") if f["finding"] == "nonfinite"]
    assert found, "no nonfinite finding"
    first = min(found, key=lambda f: f["step"])
    assert (first["layer"], first["rank"], first["step"]) == ("4.bias", 0, INDUCED)


def test_an_unknown_finding_name_is_refused_with_the_names_it_knows(db) -> None:
    result = thermoscope("events", "--db", str(db), "--finding", "dead_relu")
    assert result.returncode == 2
    assert "not a finding: 'dead_relu'" in result.stderr and "dead_site" in result.stderr


def test_in_process_a_monitor_finds_a_dead_relu_itself() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    monitor = Monitor(model, opt, collector=None, every=1)
    for step in range(20):
        if step == 10:
            with torch.no_grad():
                model[0].bias.fill_(-1e3)
        loss = model(torch.randn(16, 6)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        monitor.step(loss)
        if step == 9:
            assert monitor.latest() is not None and monitor.findings() == []  # healthy so far
    assert [(f.finding, f.scope, f.layer) for f in monitor.findings()] == [("dead_site", "site", "1")]
    assert monitor.close()
