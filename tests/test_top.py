"""`thermoscope top`: a live view of a real collector's jobs, read from its /metrics as Prometheus
reads it (over TLS with basic auth too), run in a pseudo-terminal as a user runs it.

The collector runs in this process, fed by raw-protocol agents (tests/helpers/protocol.py) whose
samples make a job learn: its energy falls and layer0's entropy grows, so the job's temperature
is defined and layer0 leaves `type_i` while `top` watches. Each value `top` shows is checked
against the collector's own /metrics page.
"""

from __future__ import annotations

import codecs
import fcntl
import math
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from thermoscope.cli import top
from thermoscope.collector.exposition.passwords import hash_password
from thermoscope.collector.security import Security
from thermoscope.collector.service import Collector
from thermoscope.science.stats import LayerStats, Sample
from thermoscope.wire import codec

from helpers.metrics import scrape, value, wait_until
from helpers.processes import free_port, thermoscope
from helpers.protocol import OpenStream, hello, histogram, site_stats

ANSI = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|[()][0-9A-Za-z]|[=>78])")
NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?")
TITLE = "thermoscope top"


def learning(step: int, spread: float = 0.05, numel: int = 100) -> Sample:
    """Step `step` of a job that learns: its energy falls while layer0's variance grows by
    `spread` per step (shrinks by e^spread per step where `spread` < 0); layer1 is still."""
    rng = np.random.default_rng(step)
    variance = 1.0 + spread * step if spread >= 0 else math.exp(spread * step)
    m2 = numel * np.array([variance * (1 + 0.001 * rng.standard_normal()), 1.0])
    return Sample(
        step=step,
        wall_time=time.time(),
        energy=2.0 - 0.01 * step + 0.002 * rng.standard_normal(),
        layers=LayerStats(
            np.full(2, numel, dtype=np.int64),
            np.zeros(2),
            m2,
            0.5 * np.ones(2),
            0.4 * np.ones(2),
            histogram(2),
        ),
        sites=site_stats(np.full(1, 64, dtype=np.int64), *(np.ones(1) for _ in range(4))),
    )


def feed(agent: OpenStream, steps: range, spread: float = 0.05) -> None:
    for step in steps:
        assert agent.ack(codec.encode(learning(step, spread), step)) == step


def phase(metrics: dict, job: str, layer: str) -> str:
    scope = "layer" if layer else "job"
    (current,) = [
        labels["phase"]
        for (name, key), v in metrics.items()
        if name == "thermoscope_phase" and v == 1
        for labels in [dict(key)]
        if labels["job_id"] == job and labels["layer"] == layer and labels["scope"] == scope
    ]
    return current


class Terminal:
    """`thermoscope top ARGS` in a pseudo-terminal `columns` wide and 50 lines high: keys typed into
    it, its screen read back."""

    def __init__(self, *args: str, columns: int = 160) -> None:
        master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, columns, 0, 0))
        env = {**os.environ, "TERM": "xterm-256color", "PYTHONIOENCODING": "utf-8"}
        env.pop("COLUMNS", None), env.pop("LINES", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "thermoscope.cli", "top", *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
            start_new_session=True,
        )
        os.close(slave)
        self.master = master
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.raw = ""

    @property
    def text(self) -> str:
        """Everything shown so far, escape sequences removed."""
        return ANSI.sub("", self.raw).replace("\r", "")

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if not ready:
            return True
        try:
            chunk = os.read(self.master, 65536)
        except OSError:  # EIO: the process closed the terminal
            return False
        self.raw += self._decoder.decode(chunk)
        return bool(chunk)

    def wait_for(self, shown: Callable[[str], bool], what: str, timeout: float = 60.0) -> str:
        """Read until `shown(text)` holds; the text. Fails naming `what`, with the screen, if not."""
        deadline = time.monotonic() + timeout
        while not shown(self.text):
            if time.monotonic() > deadline or (not self._read(0.2) and self.proc.poll() is not None):
                pytest.fail(f"top never showed {what}; its screen:\n{self.text[-4000:]}")
        return self.text

    def press(self, key: str) -> None:
        os.write(self.master, key.encode())

    def exit_code(self, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            self._read(0.2)
        while (
            self._read(0.05) and self.proc.poll() is not None and select.select([self.master], [], [], 0)[0]
        ):
            pass
        return self.proc.wait(timeout=1)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        os.close(self.master)


def last_screen(text: str, marker: str = TITLE, jobs: tuple[str, ...] = ("cooler", "idle", "learner")) -> str:
    """The last whole frame drawn: from the last `marker` (in the title line) whose frame has a
    row for each of `jobs`, to the next title ("" if none is whole yet)."""
    frames = text.split(TITLE)
    for i in range(len(frames) - 1, 0, -1):
        frame = TITLE + frames[i]
        if marker in frame and all(re.search(rf"^{j}\s", frame, re.M) for j in jobs):
            return frame
    return ""


def row(screen: str, job: str) -> str:
    (line,) = [line for line in screen.splitlines() if re.search(rf"(^|\s){re.escape(job)}\s", line)]
    return line


def close_to(shown: str, expected: float) -> bool:
    """Whether a number shown in `shown` is `expected` to the 4 significant digits shown."""
    return any(math.isclose(float(n), expected, rel_tol=1e-3, abs_tol=1e-9) for n in NUMBER.findall(shown))


@dataclass
class Jobs:
    """Three jobs on a collector: `learner` (rank 0 streams, rank 1's stream broke: it is stale;
    entropy grows, temperature negative), `cooler` (entropy falls, temperature positive) and
    `idle` (the same sample at every step: nothing moves, its temperature is undefined)."""

    collector: Collector
    learner: OpenStream
    cooler: OpenStream


@pytest.fixture
def jobs(collector: Collector) -> Iterator[Jobs]:
    learner = OpenStream(collector.grpc_target, hello("learner", world_size=2))
    lost = OpenStream(collector.grpc_target, hello("learner", rank=1, world_size=2))
    cooler = OpenStream(collector.grpc_target, hello("cooler"))
    idle = OpenStream(collector.grpc_target, hello("idle"))
    try:
        feed(learner, range(1, 3))
        feed(lost, range(1, 3))
        lost.cancel()
        url = collector.metrics_url
        wait_until(
            lambda: value(scrape(url), "thermoscope_rank_stale", job_id="learner", rank="1") == 1,
            30,
            "learner's rank 1 never went stale",
        )
        feed(learner, range(3, 8))  # rank 1 owes nothing now: the steps merge
        feed(cooler, range(1, 8), spread=-0.01)
        for step in range(1, 8):
            assert idle.ack(codec.encode(learning(1), step)) == step
        for job in ("learner", "cooler"):
            wait_until(
                lambda job=job: not math.isnan(value(scrape(url), "thermoscope_temperature", job_id=job)),
                30,
                f"{job}'s temperature stayed undefined",
            )
        yield Jobs(collector, learner, cooler)
    finally:
        for agent in (learner, cooler, idle):
            agent.close()


def test_top_in_a_terminal_shows_each_jobs_readings_as_metrics_has_them_and_quits_on_q(jobs: Jobs) -> None:
    url = jobs.collector.metrics_url
    metrics = scrape(url)
    assert phase(metrics, "learner", "layer0") == "type_i"

    term = Terminal("--collector", url.removeprefix("http://").removesuffix("/metrics"), "--interval", "0.3")
    try:
        term.wait_for(lambda t: last_screen(t) != "", "the jobs")
        screen = last_screen(term.text)
        line = row(screen, "learner")
        shown_as = (
            ("thermoscope_energy", {}),
            ("thermoscope_temperature", {}),
            ("thermoscope_site_efficiency_quantile_ratio", {"q": "0.5"}),  # the median site efficiency
        )
        for name, labels in shown_as:
            assert close_to(line, value(metrics, name, job_id="learner", **labels)), f"{name} not in {line!r}"
        stderr = value(metrics, "thermoscope_temperature_stderr", job_id="learner")
        shown = re.findall(rf"± *({NUMBER.pattern})", line)
        assert len(shown) == 1 and math.isclose(float(shown[0]), stderr, rel_tol=0.05), (line, stderr)
        assert phase(metrics, "learner", "") in line
        assert str(int(value(metrics, "thermoscope_last_step", job_id="learner"))) in line
        assert re.search(r"\b1 live, 1 stale\b", line), line  # rank 0 streams, rank 1 broke
        assert re.search(r"\b1 live\b", row(screen, "idle")) and "stale" not in row(screen, "idle")
        assert "±" not in row(screen, "idle")  # an undefined temperature has no error either

        # layer0 learns: it leaves type_i while top watches, and top names it
        feed(jobs.learner, range(8, 30))
        wait_until(lambda: phase(scrape(url), "learner", "layer0") != "type_i", 30, "layer0 stayed in type_i")
        now = phase(scrape(url), "learner", "layer0")
        term.wait_for(
            lambda t: re.search(rf"^learner: layer0 type_i→{now}", last_screen(t), re.M),
            f"layer0 type_i→{now} below the jobs",
        )
        term.press("q")
        assert term.exit_code() == 0
    finally:
        term.close()


LONG = "my-run-transformer-2026"  # a job id as users name their runs


def header(screen: str) -> list[str]:
    """The column names of the jobs' table in `screen`."""
    (line,) = [line for line in screen.splitlines() if re.match(r"job\s+phase\b", line)]
    return line.split()


@pytest.mark.parametrize(("columns", "kept"), [(80, "step"), (60, "ranks")])
def test_top_in_a_narrow_terminal_shows_job_ids_and_phases_whole_and_drops_columns_by_priority(
    jobs: Jobs, columns: int, kept: str
) -> None:
    """At 80 columns (and 60) every line fits, the job id and phase are whole, and the columns shown
    are the first ones of `top.COLUMNS`' priority, down to `kept` at least, not all."""
    long = OpenStream(jobs.collector.grpc_target, hello(LONG))
    try:
        feed(long, range(1, 8))
        url = jobs.collector.metrics_url
        wait_until(lambda: phase(scrape(url), LONG, "") != "", 30, f"{LONG} never got a phase")
        jobs.collector.detach("cooler")  # paused: its ranks are quiet, not stale
        wait_until(lambda: value(scrape(url), "thermoscope_job_paused", job_id="cooler") == 1, 30, "no pause")
        metrics = scrape(url)
        everyone = ("cooler", "idle", "learner", LONG)
        term = Terminal("--collector", url, "--interval", "0.3", columns=columns)
        try:
            term.wait_for(lambda t: last_screen(t, jobs=everyone) != "", "every job's row")
            screen = last_screen(term.text, jobs=everyone)
            assert max(len(line) for line in screen.splitlines()) <= columns, screen
            names = [c.name for c in top.COLUMNS]
            shown = header(screen)
            assert shown == names[: len(shown)] and kept in shown and len(shown) < len(names), screen
            for job in everyone:
                assert row(screen, job).split()[:2] == [job, phase(metrics, job, "")], screen
            assert "paused" in row(screen, "cooler") and "paused" not in row(screen, "idle"), screen
            assert re.search(r"\b1 live, 1 stale\b", row(screen, "learner")), screen
            term.press("q")
            assert term.exit_code() == 0
        finally:
            term.close()
    finally:
        long.close()


def test_top_lists_the_layers_that_changed_phase_below_the_jobs_keeping_every_column_of_a_wide_terminal(
    jobs: Jobs,
) -> None:
    url = jobs.collector.metrics_url
    term = Terminal("--collector", url, "--interval", "0.3", columns=160)
    try:
        term.wait_for(lambda t: last_screen(t) != "", "the jobs")
        feed(jobs.learner, range(8, 30))
        wait_until(lambda: phase(scrape(url), "learner", "layer0") != "type_i", 30, "layer0 stayed in type_i")
        now = phase(scrape(url), "learner", "layer0")
        term.wait_for(lambda t: f"learner: layer0 type_i→{now}" in last_screen(t), "layer0's change")
        screen = last_screen(term.text)
        assert header(screen) == [c.name for c in top.COLUMNS], screen
        assert row(screen, "learner").split()[0] == "learner"  # the job id whole beside the change
        below = screen.index("layers that changed phase")
        assert below > screen.index(row(screen, "learner"))  # the layer list is below the table
        term.press("q")
        assert term.exit_code() == 0
    finally:
        term.close()


def test_top_pointed_at_the_grpc_port_says_in_one_line_it_is_not_a_metrics_endpoint(
    collector: Collector,
) -> None:
    shown = thermoscope("top", "--collector", collector.grpc_target, "--once")
    assert shown.returncode == 1
    (line,) = shown.stderr.splitlines()
    assert "is not a /metrics endpoint" in line and "--collector" in line, line


def order(text: str, sort: str) -> list[str]:
    """The jobs' rows in the last frame sorted by `sort`."""
    screen = last_screen(text, f"sorted by {sort}")
    return [
        j for line in screen.splitlines() for j in ("cooler", "idle", "learner") if re.match(rf"{j}\s", line)
    ]


def test_top_sorts_by_temperature_or_entropy_change_at_a_key(jobs: Jobs) -> None:
    term = Terminal("--collector", jobs.collector.metrics_url, "--interval", "0.3")
    try:
        term.wait_for(lambda t: len(order(t, "job")) == 3, "three rows")
        assert order(term.text, "job") == ["cooler", "idle", "learner"]
        # the hottest first; idle's temperature is undefined: last
        term.press("t")
        term.wait_for(lambda t: len(order(t, "temperature")) == 3, "the t sort")
        assert order(term.text, "temperature") == ["cooler", "learner", "idle"]
        # the largest entropy change per step first, either sign: learner's variance grows 5 % a
        # step, cooler's shrinks 1 %; idle has not moved since top started (undefined: last)
        feed(jobs.learner, range(8, 12))
        feed(jobs.cooler, range(8, 12), spread=-0.01)
        term.wait_for(
            lambda t: all(
                re.search(r"\s11\s", row(last_screen(t), j) if last_screen(t) else "")
                for j in ("learner", "cooler")
            ),
            "step 11 of learner and cooler",
        )
        term.press("s")
        term.wait_for(lambda t: len(order(t, "entropy change")) == 3, "the s sort")
        assert order(term.text, "entropy change") == ["learner", "cooler", "idle"]
        term.press("j")
        term.wait_for(lambda t: t.rfind("sorted by job") > t.rfind("sorted by entropy change"), "the j sort")
        term.press("q")
        assert term.exit_code() == 0
    finally:
        term.close()


def test_top_reads_metrics_over_tls_with_basic_auth_as_prometheus_would(pki, tmp_path: Path) -> None:
    users, password = tmp_path / "users", tmp_path / "password"
    users.write_text(f"prometheus:{hash_password('s3cret', rounds=4)}\n")
    password.write_text("s3cret\n")  # a trailing newline, as editors write it
    security = Security(
        metrics_tls_cert=pki.server_cert, metrics_tls_key=pki.server_key, metrics_basic_auth=users
    )
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=None, security=security).running() as c:
        agent = OpenStream(c.grpc_target, hello("secure-job", n_layers=2))
        try:
            feed(agent, range(1, 4))
            address = f"127.0.0.1:{c.metrics_port}"
            auth = ["--basic-auth-user", "prometheus", "--basic-auth-password-file", str(password)]
            shown = thermoscope("top", "--collector", address, "--tls-ca", str(pki.ca), *auth, "--once")
            assert shown.returncode == 0, shown.stderr
            assert re.search(r"secure-job\s", shown.stdout) and "1 live" in shown.stdout
            # --job shows that job alone
            only = thermoscope(
                "top", "--collector", address, "--tls-ca", str(pki.ca), *auth, "--once", "--job", "x"
            )
            assert only.returncode == 0 and "secure-job" not in only.stdout and "no job" in only.stdout

            # refusals say what to give, and exit at once: a retry would not help
            password.write_text("wrong")
            refused = thermoscope("top", "--collector", address, "--tls-ca", str(pki.ca), *auth)
            assert refused.returncode == 1
            assert "401" in refused.stderr and "--basic-auth-password-file" in refused.stderr
            bare = thermoscope("top", "--collector", address, "--tls-ca", str(pki.ca), "--once")
            assert bare.returncode == 1 and "--basic-auth-user" in bare.stderr
            unverified = thermoscope("top", "--collector", f"https://{address}/metrics", "--once")
            assert unverified.returncode == 1 and "--tls-ca" in unverified.stderr
        finally:
            agent.close()


def test_top_once_without_a_collector_says_where_it_looked() -> None:
    address = f"127.0.0.1:{free_port()}"
    shown = thermoscope("top", "--collector", address, "--once")
    assert shown.returncode == 1
    assert f"http://{address}/metrics" in shown.stderr and "cannot reach" in shown.stderr
    assert "Traceback" not in shown.stderr


def test_top_refuses_bad_flags_before_reading_anything(tmp_path: Path) -> None:
    half = thermoscope("top", "--basic-auth-user", "prometheus", "--once")
    assert half.returncode == 2 and "--basic-auth-password-file" in half.stderr
    missing = thermoscope(
        "top", "--basic-auth-user", "p", "--basic-auth-password-file", str(tmp_path / "nope"), "--once"
    )
    assert missing.returncode == 2 and "nope" in missing.stderr
    assert thermoscope("top", "--collector", "nowhere", "--once").returncode == 2
    assert thermoscope("top", "--interval", "0", "--once").returncode == 2
