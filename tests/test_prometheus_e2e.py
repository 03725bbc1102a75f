"""The shipped Prometheus setup against the real thing: a training run whose data shift streams to
a `thermoscope collector` process, scraped by Debian's `prometheus` with the shipped config and
rules (only the collector's address rewritten), until `ThermoscopeDataShift` fires for the job."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from thermoscope.agent import Monitor
from thermoscope.cli.demo import student, teacher_student

from helpers.metrics import scrape
from helpers.processes import CollectorProcess, free_port, stop_process

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"
SHIPPED_TARGET = "127.0.0.1:9108"
PROMETHEUS = shutil.which("prometheus")
JOB = "prometheus-e2e"
EVERY = 5  # optimizer steps per sample
PACE = 0.01  # seconds of sleep per step: some 60 steps/s, so every 5 s scrape sees ~60 new samples
MIN_SHIFT_STEP = 200  # the demo's run reaches type_ii at step 170
MAX_STEPS = 6000  # the run stops here whatever happens (over a minute at this pace)
DEADLINE = 50.0  # seconds from Prometheus' start for the alert to fire

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        PROMETHEUS is None,
        reason="prometheus not found on PATH (Debian's prometheus package; .ci/run installs it)",
    ),
]


class Prometheus:
    """Debian's prometheus on a free loopback port, with the shipped config and rules."""

    def __init__(self, tmp: Path, metrics_port: int) -> None:
        self.config_dir = tmp / "prometheus"
        shutil.copytree(DEPLOY, self.config_dir, ignore=shutil.ignore_patterns("tests", "file_sd"))
        config = self.config_dir / "prometheus.yml"
        text = config.read_text()
        assert text.count(SHIPPED_TARGET) == 1, "the shipped config's static target moved"
        config.write_text(text.replace(SHIPPED_TARGET, f"127.0.0.1:{metrics_port}"))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log = tmp / "prometheus.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                [
                    str(PROMETHEUS),
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp / 'tsdb'}",
                    f"--web.listen-address={self.url.removeprefix('http://')}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.answers: dict[str, object] = {}  # the last answer of each API path, for failures

    def get(self, path: str, **params: str) -> object:
        """The `data` of a JSON API answer (None until Prometheus answers)."""
        url = f"{self.url}{path}" + (f"?{urllib.parse.urlencode(params)}" if params else "")
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                answer = json.load(resp)
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            answer = {"status": "unreachable", "error": repr(exc)}
        self.answers[f"{path} {params}" if params else path] = answer
        return answer.get("data") if answer.get("status") == "success" else None

    def query(self, promql: str) -> list[dict]:
        """The instant vector's samples (none until Prometheus answers)."""
        data = self.get("/api/v1/query", query=promql)
        return data["result"] if isinstance(data, dict) else []

    def explain(self, what: str) -> str:
        log = self.log.read_text()[-3000:]
        answers = json.dumps(self.answers, indent=1)[-6000:]
        return f"{what}\nlast API answers:\n{answers}\nprometheus exit code {self.proc.poll()}, log:\n{log}"

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture
def prometheus(tmp_path: Path, collector_process: CollectorProcess) -> Iterator[Prometheus]:
    port = urllib.parse.urlsplit(collector_process.metrics_url).port
    server = Prometheus(tmp_path, port)
    try:
        yield server
    finally:
        server.stop()


class Training:
    """The demo's run (a student learning a teacher) on a thread, paced, its data shifted once
    `shift` is set and it has trained MIN_SHIFT_STEP steps."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.shift = threading.Event()
        self.stop = threading.Event()
        self.shifted_at: int | None = None
        self.step = 0
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="training", daemon=True)

    def _run(self) -> None:
        try:
            torch.manual_seed(0)
            x, y = teacher_student(0)
            model = student(x.shape[1])
            optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
            gen = torch.Generator().manual_seed(1)
            monitor = Monitor(model, optimizer, collector=self.target, job=JOB, every=EVERY)
            try:
                for step in range(MAX_STEPS):
                    if self.stop.is_set():
                        break
                    if self.shifted_at is None and step >= MIN_SHIFT_STEP and self.shift.is_set():
                        x, y = teacher_student(1000)  # the demo's shift: another teacher
                        self.shifted_at = step
                    idx = torch.randint(0, x.shape[0], (64,), generator=gen)
                    loss = nn.functional.mse_loss(model(x[idx]), y[idx])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    monitor.step(loss)
                    self.step = step
                    time.sleep(PACE)
            finally:
                monitor.close(timeout=10)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def __enter__(self) -> Training:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the training thread did not stop"


def test_prometheus_fires_the_data_shift_alert_for_a_real_run_with_the_shipped_rules(
    collector_process: CollectorProcess, prometheus: Prometheus
) -> None:
    start = time.monotonic()
    job = f'job_id="{JOB}"'
    with Training(collector_process.grpc_target) as training:

        def wait(what: str, done) -> object:
            while True:
                result = done()
                if result:
                    return result
                assert training.error is None, f"training failed: {training.error!r}"
                assert prometheus.proc.poll() is None, prometheus.explain("prometheus exited")
                if time.monotonic() - start > DEADLINE:
                    try:
                        phases = {
                            dict(labels)["phase"]: v
                            for (name, labels), v in scrape(collector_process.metrics_url).items()
                            if name == "thermoscope_phase" and dict(labels).get("scope") == "job"
                        }
                    except OSError as exc:
                        phases = f"unknown: {exc!r}"
                    pytest.fail(
                        prometheus.explain(
                            f"{what} within {DEADLINE} s (training at step {training.step}, "
                            f"shifted at {training.shifted_at}, the collector's job phase {phases})"
                        )
                    )
                time.sleep(0.25)

        wait(
            "prometheus never scraped the job's layer temperatures",
            lambda: prometheus.query(f"thermoscope_layer_temperature{{{job}}}"),
        )
        # before the shift: the job is in equilibrium, and Prometheus holds the refresh counter at 0
        # from at least two scrapes, so that increase() sees the step to 1
        wait(
            "the job never reached type_ii in Prometheus",
            lambda: prometheus.query(f'thermoscope_phase{{{job},scope="job",phase="type_ii"}} == 1'),
        )
        refresh = f'thermoscope_phase_transitions_total{{{job},to="refresh"}}'
        wait(
            "prometheus never scraped the refresh counter at 0 twice",
            lambda: prometheus.query(
                f"count_over_time({refresh}[1m]) >= 2 and max_over_time({refresh}[1m]) == 0"
            ),
        )
        before = time.monotonic() - start
        training.shift.set()

        def firing() -> list[dict]:
            alerts = prometheus.get("/api/v1/alerts") or {"alerts": []}
            return [
                a
                for a in alerts["alerts"]
                if a["labels"]["alertname"] == "ThermoscopeDataShift"
                and a["labels"].get("job_id") == JOB
                and a["state"] == "firing"
            ]

        alerts = wait("ThermoscopeDataShift never fired for the job", firing)
        fired = time.monotonic() - start

    alert = alerts[0]
    assert alert["labels"] == {
        "alertname": "ThermoscopeDataShift",
        "severity": "warning",
        "job": "thermoscope",
        "instance": urllib.parse.urlsplit(collector_process.metrics_url).netloc,
        "job_id": JOB,
        "from": "type_ii",
        "to": "refresh",
    }, alert
    assert alert["annotations"]["summary"] == f"Job {JOB}: its data shifted (phase refresh)", alert
    assert alert["annotations"]["runbook_url"].endswith("RUNBOOK.md#thermoscopedatashift"), alert
    assert training.shifted_at is not None and training.shifted_at >= MIN_SHIFT_STEP
    # the collector saw the shift as a refresh
    assert prometheus.query(f"{refresh} == 1"), prometheus.explain("the refresh counter is not 1")

    # the shipped rules loaded and evaluate cleanly, and the recording rules have the job
    rules = prometheus.get("/api/v1/rules") or {"groups": []}
    loaded = {g["name"]: g for g in rules["groups"]}
    groups = {"thermoscope-recording", "thermoscope-alerts", "thermoscope-findings"}
    assert set(loaded) == groups, prometheus.explain("rule groups")
    for group in loaded.values():
        assert group["interval"] == 5, group  # the shipped evaluation_interval
        for rule in group["rules"]:
            assert rule["health"] == "ok", prometheus.explain(f"rule {rule['name']} is {rule['health']}")
    for record in ("thermoscope:frames_received:rate1m", "thermoscope:layers_negative_temperature:count"):
        assert prometheus.query(f"{record}{{{job}}}"), prometheus.explain(f"{record} has no series")
    assert prometheus.query(f"sum(thermoscope:layers_in_phase:count{{{job}}}) > 0"), prometheus.explain(
        "no layers in any phase"
    )
    print(f"\nshifted at step {training.shifted_at} after {before:.1f} s; the alert fired at {fired:.1f} s")
