"""Input no reader trusts blindly: a frame's wall time outside any plausible Unix time, a database an
older collector filled with one, and listen addresses given as a bare port.

Real collectors on 127.0.0.1, real SQLite files, the real `thermoscope` command.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from thermoscope.collector.service import Collector
from thermoscope.collector.state.store import EventStore
from thermoscope.wire import codec

from helpers.metrics import scrape, value
from helpers.processes import free_port, stop_process, thermoscope, wait_serving
from helpers.protocol import frame, hello, stream

#: What an older collector stored for an agent whose clock said 1e300 s (year ~3e292).
ABSURD = 1e300


# -- at ingest ----------------------------------------------------------------------------------------


def test_decode_keeps_a_plausible_wall_time_and_replaces_any_other_with_the_time_of_decoding() -> None:
    now = time.time()
    plausible = [codec.EARLIEST_WALL_TIME, 1.7e9, now, now + codec.WALL_TIME_AHEAD - 60]
    implausible = [
        codec.EARLIEST_WALL_TIME - 1,  # 1999-12-31T23:59:59Z
        0.0,  # a clock reset to the epoch
        -1.0,
        now * 1000,  # milliseconds sent as seconds
        now + codec.WALL_TIME_AHEAD + 60,
        ABSURD,
        float("nan"),
        float("inf"),
    ]
    for wall_time in plausible + implausible:
        msg = frame(1, 0)
        msg.frame.wall_time = wall_time
        counts: dict[str, int] = {}
        before = time.time()
        sample = codec.decode(msg.frame, 2, 1, 8, counts)
        if wall_time in plausible:
            assert sample.wall_time == wall_time and counts == {}, wall_time
        else:
            assert before <= sample.wall_time <= time.time(), wall_time
            assert counts == {"wall_time": 1}, wall_time


def test_a_frame_with_an_absurd_wall_time_is_kept_stamped_on_arrival_and_counted(tmp_path: Path) -> None:
    db = tmp_path / "events.db"
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=db, history_interval=0).running() as c:
        messages = [hello("clock")]
        for seq, wall_time in enumerate((ABSURD, -1.0, 1.7e12, None), 1):
            msg = frame(seq, seq)
            if wall_time is not None:
                msg.frame.wall_time = wall_time
            messages.append(msg)
        before = time.time()
        replies, error = stream(c.grpc_target, messages)
        after = time.time()
        assert error is None, error
        assert max(r.ack.seq for r in replies if r.WhichOneof("body") == "ack") == 4  # all kept (cumulative)
        metrics = scrape(c.metrics_url)
        assert value(metrics, "thermoscope_nonfinite_values_total", job_id="clock", what="wall_time") == 3
        c.checkpoint()
        store = EventStore(db, create=False)
        try:
            history = store.history("clock")
        finally:
            store.close()
    assert history.step[0] == 1  # the frame stamped 1e300 is in the history, stamped on arrival
    assert ((before <= history.time) & (history.time <= after)).all(), history.time


# -- readers of a database an older collector wrote ---------------------------------------------------


def _old_database(path: Path) -> None:
    """A database as an older collector left it: one job stamped 1e300 s, one stamped a minute ago,
    each with three history rows and one event (written with sqlite3, as that collector did)."""
    EventStore(path).close()  # the schema
    db = sqlite3.connect(path)
    recent = time.time() - 60
    for job, stamp in (("broken-clock", ABSURD), ("recent", recent)):
        db.execute("INSERT INTO layer_names (job, names) VALUES (?, ?)", (job, json.dumps(["fc.weight"])))
        for step in range(3):
            db.execute(
                "INSERT INTO history (job, step, time, energy, entropy, temperature, energy_from_work,"
                " layer_temperature) VALUES (?, ?, ?, ?, ?, ?, 0, ?)",
                (job, step, stamp + step, 1.0 - 0.1 * step, 2.0 + 0.1 * step, 0.5,
                 np.array([0.1 * (step + 1)], dtype="<f8").tobytes()),
            )  # fmt: skip
        db.execute(
            "INSERT INTO events (job, scope, layer, step, time, from_phase, to_phase, statistic,"
            " confidence) VALUES (?, 'job', '', 2, ?, 'type_i', 'transition', 'energy_slope_t', 0.9)",
            (job, stamp + 2),
        )
    db.commit()
    db.close()


def test_events_lists_a_time_no_calendar_holds_instead_of_crashing(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    _old_database(db)
    table = thermoscope("events", "--db", str(db), timeout=60)
    assert table.returncode == 0, table.stderr
    assert "Traceback" not in table.stderr
    assert "2 phase transitions" in table.stdout
    assert "broken-clock" in table.stdout and "1e+300" in table.stdout
    assert "recent" in table.stdout and time.strftime("%Y-", time.gmtime()) in table.stdout

    listed = thermoscope("events", "--db", str(db), "--json", timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert {e["job"]: e["time"] for e in json.loads(listed.stdout)}["broken-clock"] == ABSURD + 2


def test_plot_draws_the_newest_job_not_the_one_stamped_in_the_far_future(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    _old_database(db)
    figure = tmp_path / "newest.svg"  # matplotlib's SVG keeps each text as a comment beside its glyphs
    result = thermoscope("plot", "--db", str(db), "--out", str(figure), timeout=120)
    assert result.returncode == 0, result.stderr
    svg = figure.read_text()
    assert "job recent" in svg and "job broken-clock" not in svg

    named = tmp_path / "broken.svg"  # asked for by name, the job with the absurd stamps still draws
    result = thermoscope("plot", "--db", str(db), "--job", "broken-clock", "--out", str(named), timeout=120)
    assert result.returncode == 0, result.stderr
    assert "job broken-clock" in named.read_text()


# -- listen addresses ---------------------------------------------------------------------------------


def test_a_bare_port_listens_on_loopback(tmp_path: Path) -> None:
    grpc_port, metrics_port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "thermoscope.cli", "collector"),
            *("--grpc", str(grpc_port), "--metrics", str(metrics_port), "--db", str(tmp_path / "e.db")),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_serving(f"127.0.0.1:{grpc_port}", proc=proc)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
            assert "thermoscope_collector_info" in resp.read().decode()
    finally:
        stop_process(proc)
        stderr = proc.stderr.read()
        proc.stderr.close()
    assert "Traceback" not in stderr, stderr


@pytest.mark.parametrize("flag", ["--grpc", "--metrics"])
@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("localhost:http", "address must be HOST:PORT"),
        (":9108", "address must be HOST:PORT"),
        ("127.0.0.1:70000", "port 70000 is not in 0..65535"),
    ],
)
def test_a_listen_address_that_is_not_one_gets_a_one_line_error(
    tmp_path: Path, flag: str, address: str, why: str
) -> None:
    result = thermoscope("collector", flag, address, "--db", str(tmp_path / "events.db"), timeout=60)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"argument {flag}: " in result.stderr and why in result.stderr and repr(address) in result.stderr
    assert "a bare PORT means 127.0.0.1:PORT" in result.stderr


@pytest.mark.parametrize("flag", ["--grpc", "--metrics"])
def test_a_port_already_taken_is_a_one_line_error(tmp_path: Path, flag: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        other = "--metrics" if flag == "--grpc" else "--grpc"
        args = ["collector", flag, address, other, "127.0.0.1:0", "--db", str(tmp_path / "events.db")]
        result = thermoscope(*args, timeout=60)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    what = "gRPC" if flag == "--grpc" else "/metrics"
    (line,) = result.stderr.splitlines()  # no usage banner: the flags were right, the port is taken
    assert f"cannot listen for {what} on {address}" in line, result.stderr
