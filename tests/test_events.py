"""Phase events: exported as a state-set and counters, stored durably, listed by `thermoscope events`."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from thermoscope.collector.state.store import FIELDS, Event, EventStore
from thermoscope.science.detect import PHASES, TRANSITIONS
from thermoscope.wire.codec import encode

from helpers.metrics import scrape, value
from helpers.processes import start_collector_process, thermoscope
from helpers.protocol import OpenStream, hello, sample

RNG = np.random.default_rng(0)


def learning_curve(n: int = 120) -> list[float]:
    """A loss that falls and settles, with minibatch-like noise: type_i -> transition -> type_ii."""
    steps = np.arange(n)
    return list(5.0 * np.exp(-steps / 15) + 1.0 + RNG.normal(0, 0.02, n))


def stream_energies(
    target: str, job: str, energies: list[float], first_step: int = 0, first_seq: int = 1
) -> None:
    agent = OpenStream(target, hello(job))
    for k, energy in enumerate(energies):
        assert agent.ack(encode(sample(first_step + k, energy=energy), first_seq + k)) == first_seq + k
    agent.close()


def phases(metrics: dict, job: str) -> dict[tuple[str, str], list[str]]:
    """(scope, layer) -> the phases whose state-set value is 1."""
    out: dict[tuple[str, str], list[str]] = {}
    for (name, labels), v in metrics.items():
        labels = dict(labels)
        if name == "thermoscope_phase" and labels["job_id"] == job:
            out.setdefault((labels["scope"], labels["layer"]), [])
            if v == 1:
                out[(labels["scope"], labels["layer"])].append(labels["phase"])
    return out


def wait_for_step(url: str, job: str, step: int) -> dict:
    deadline = time.monotonic() + 15
    while True:
        metrics = scrape(url)
        if metrics.get(("thermoscope_last_step", frozenset({("job_id", job)}))) == step:
            return metrics
        assert time.monotonic() < deadline, f"step {step} never merged"
        time.sleep(0.05)


def test_a_learning_run_is_exported_as_a_state_set_with_counted_transitions(collector) -> None:
    energies = learning_curve()
    stream_energies(collector.grpc_target, "learn", energies)
    metrics = wait_for_step(collector.metrics_url, "learn", len(energies) - 1)
    sets = phases(metrics, "learn")
    assert set(sets) == {("job", ""), ("layer", "layer0"), ("layer", "layer1")}
    assert all(len(on) == 1 for on in sets.values()), sets  # exactly one 1 per (job, scope, layer)
    assert sets[("job", "")] == ["type_ii"]
    for before, after in TRANSITIONS:  # every counter exists from the start, most at 0
        count = value(
            metrics, "thermoscope_phase_transitions_total", job_id="learn", **{"from": before, "to": after}
        )
        assert count == (1 if (before, after) in {("type_i", "transition"), ("transition", "type_ii")} else 0)
    stored = collector.store.query(job="learn")
    assert [(e.from_, e.to) for e in stored if e.scope == "job"] == [
        ("type_i", "transition"),
        ("transition", "type_ii"),
    ]
    assert value(metrics, "thermoscope_last_transition_timestamp_seconds", job_id="learn") == stored[-1].time


@pytest.mark.slow
def test_events_survive_a_killed_collector_and_the_phase_resumes(tmp_path: Path) -> None:
    db = tmp_path / "events.db"
    first = start_collector_process(db)
    try:
        energies = learning_curve()
        stream_energies(first.grpc_target, "durable", energies)
        wait_for_step(first.metrics_url, "durable", len(energies) - 1)
        before = thermoscope("events", "--db", str(db), "--job", "durable", "--json")
    finally:
        first.proc.send_signal(signal.SIGKILL)  # no clean shutdown: what was committed must be there
        first.proc.wait(timeout=10)
    second = start_collector_process(db)
    try:
        after = thermoscope("events", "--db", str(db), "--job", "durable", "--json")
        assert after.returncode == 0 and json.loads(after.stdout) == json.loads(before.stdout) != []
        stream_energies(second.grpc_target, "durable", [1.0], first_step=len(energies), first_seq=1)
        metrics = wait_for_step(second.metrics_url, "durable", len(energies))
        assert phases(metrics, "durable")[("job", "")] == ["type_ii"]  # resumed, not back to type_i
    finally:
        second.stop()


def test_events_json_lists_objects_with_exactly_the_contract_fields(tmp_path: Path) -> None:
    db = tmp_path / "events.db"
    store = EventStore(db)
    store.add([
        Event("a", "job", "", 10, 1000.0, "type_i", "transition", "energy_slope_t", 0.9),
        Event("a", "layer", "fc.weight", 12, 1001.0, "type_i", "transition", "entropy_rate", 0.6),
        Event("b", "job", "", 50, 2000.0, "type_ii", "refresh", "cusum_energy_jump", 1.0),
    ])  # fmt: skip
    store.close()
    everything = json.loads(thermoscope("events", "--db", str(db), "--json").stdout)
    assert [tuple(e) for e in everything] == [FIELDS] * 3
    assert everything[2] == {
        "job": "b", "scope": "job", "layer": "", "step": 50, "time": 2000.0, "from": "type_ii",
        "to": "refresh", "statistic": "cusum_energy_jump", "confidence": 1.0,
    }  # fmt: skip
    only_a = json.loads(thermoscope("events", "--db", str(db), "--job", "a", "--json").stdout)
    assert [e["step"] for e in only_a] == [10, 12]
    recent = json.loads(
        thermoscope("events", "--db", str(db), "--since", "1970-01-01T00:16:41", "--json").stdout
    )
    assert [e["step"] for e in recent] == [12, 50]
    table = thermoscope("events", "--db", str(db))
    assert (
        table.returncode == 0
        and "cusum_energy_jump" in table.stdout
        and "3 phase transitions" in table.stdout
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--db", "/nonexistent/events.db"], "no event database at /nonexistent/events.db"),
        (["--since", "last tuesday"], "must be Unix seconds or an ISO 8601 date-time"),
        (["--since", "inf"], "must be a finite time"),
    ],
)
def test_bad_event_queries_get_clear_errors(args: list[str], message: str) -> None:
    result = thermoscope("events", *args, timeout=30)
    assert result.returncode == 2 and message in result.stderr


def test_a_file_that_is_not_an_event_database_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "notes.db"
    bogus.write_text("not sqlite at all, just some words that fill a page " * 40)
    result = thermoscope("events", "--db", str(bogus), timeout=30)
    assert result.returncode == 2 and "is not a Thermoscope event database" in result.stderr
    assert bogus.read_text().startswith("not sqlite")  # and it was left as it was


def test_phase_names_are_the_theory_states() -> None:
    assert PHASES == ("type_i", "transition", "type_ii", "refresh", "unstable")
