"""The web page's JSON API and its bounds, against a real collector process that real training
loops stream to: `/api/v1/jobs`, `/api/v1/jobs/<job>`, users bound to job prefixes, the
Content-Security-Policy, the static files, and a job's history bounded however long it runs."""

from __future__ import annotations

import base64
import json
import re
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from thermoscope.cli.collector_process import CollectorProcess, start_collector_process
from thermoscope.collector.credentials import AuthConfigError
from thermoscope.collector.exposition.passwords import BasicAuthUsers, hash_password
from thermoscope.collector.web.recorder import MAX_POINTS, Recorder, Trace

from helpers.demo_run import DemoRun
from helpers.exporter_jobs import reading

ADMIN, TEAM, PASSWORD = "admin", "team", "pw-of-both"
MINE, THEIRS = "team-a/run 1", "other-b"


def _get(collector: CollectorProcess, path: str, user: str = ADMIN, password: str = PASSWORD):
    """(status, headers, body) of a GET of `path` on the collector's HTTP port."""
    url = collector.metrics_url.removesuffix("metrics") + path
    auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(url, headers={"Authorization": auth})
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.headers, answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


def _job_path(job: str) -> str:
    return "api/v1/jobs/" + urllib.request.quote(job, safe="")


@pytest.fixture(scope="module")
def collector(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CollectorProcess]:
    """A collector with an admin and a user bound to `team-`, two jobs of real training loops in it."""
    tmp = tmp_path_factory.mktemp("web")
    hashed = hash_password(PASSWORD)
    (tmp / "users").write_text(f"{ADMIN}:{hashed}\n{TEAM}:{hashed}:team-, team-b\n")
    with (tmp / "collector.log").open("w") as log:  # the process holds its own descriptor
        process = start_collector_process(
            tmp / "events.db", None, "--metrics-basic-auth", str(tmp / "users"), stderr=log
        )
    try:
        for job in (MINE, THEIRS):  # one after the other: one training loop per process at a time
            with DemoRun(process.grpc_target, job, steps=120) as run:
                run.done.wait(120)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until both merged their last sampled step
            jobs = json.loads(_get(process, "api/v1/jobs")[2])["jobs"]
            if [j["step"] for j in jobs] == [115, 115]:
                break
            time.sleep(0.2)
        yield process
    finally:
        process.stop()


def test_the_collector_says_where_its_page_is(collector: CollectorProcess) -> None:
    page = collector.metrics_url.removesuffix("metrics")
    log = Path(collector.proc.args[collector.proc.args.index("--db") + 1]).with_name("collector.log")
    assert f"metrics at {collector.metrics_url}, page at {page}\n" in log.read_text()


def test_the_jobs_list_shows_each_job_with_its_run_phase_step_and_ranks(collector: CollectorProcess) -> None:
    status, headers, body = _get(collector, "api/v1/jobs")
    assert status == 200 and headers["Content-Type"] == "application/json"
    jobs = json.loads(body)["jobs"]
    assert [j["job"] for j in jobs] == [THEIRS, MINE]
    for j in jobs:
        assert j["step"] == 115 and re.fullmatch(r"[0-9a-f]{12}", j["run"])
        assert j["phase"] in ("type_i", "transition", "type_ii", "refresh", "unstable")
        assert j["ranks"] == {"live": 0, "stale": 0, "finished": 1} and j["paused"] is False
        assert sum(j["layer_phases"].values()) == 6  # the demo's student: 3 weights, 3 biases


def test_one_job_gives_its_history_events_and_latest_reading(collector: CollectorProcess) -> None:
    status, _, body = _get(collector, _job_path(MINE))
    assert status == 200
    job = json.loads(body)
    history, latest = job["history"], job["latest"]
    assert history["step"] == list(range(0, 120, 5))  # every sampled step, in order
    columns = ("time", "energy", "temperature", "temperature_low", "temperature_high", "layer_entropy_change")
    assert all(len(history[c]) == len(history["step"]) for c in columns)
    assert history["layer_names"] == [layer["name"] for layer in latest["layers"]]
    assert latest["step"] == 115 and latest["energy"] == history["energy"][-1]
    assert [(s["name"], s["function"]) for s in latest["sites"]] == [("1", "ReLU()"), ("3", "Tanh()")]
    assert {s["engine"] for s in latest["sites"]} <= {"A", "B", ""}
    # the first job-scope event the collector detected: type_i left within the run
    first = next(e for e in job["events"] if e["scope"] == "job")
    assert first["from"] == "type_i" and 0 < first["step"] <= 115 and first["job"] == MINE
    assert job["summary"]["job"] == MINE


def test_a_user_bound_to_job_prefixes_sees_only_those_jobs_and_is_refused_metrics(
    collector: CollectorProcess,
) -> None:
    jobs = json.loads(_get(collector, "api/v1/jobs", TEAM)[2])["jobs"]
    assert [j["job"] for j in jobs] == [MINE]
    assert _get(collector, _job_path(MINE), TEAM)[0] == 200
    # another team's job reads as one that does not exist
    status, _, body = _get(collector, _job_path(THEIRS), TEAM)
    assert (status, json.loads(body)) == (404, {"error": "no such job"})
    assert _get(collector, _job_path("nobody"), TEAM)[0] == 404
    # /metrics names every job: refused, not narrowed silently
    assert _get(collector, "metrics", TEAM)[0] == 403
    assert _get(collector, "", TEAM)[0] == 200
    # the admin, bound to nothing, reads /metrics as before
    status, _, body = _get(collector, "metrics")
    assert status == 200 and f'job_id="{THEIRS}"'.encode() in body


def test_a_wrong_password_gets_401_on_the_page_and_the_api(collector: CollectorProcess) -> None:
    for path in ("", "api/v1/jobs", _job_path(MINE), "static/page.js"):
        assert _get(collector, path, ADMIN, "wrong")[0] == 401, path


def test_the_page_allows_no_inline_script_and_loads_only_its_own_files(collector: CollectorProcess) -> None:
    status, headers, body = _get(collector, "")
    assert status == 200 and headers["Content-Type"] == "text/html; charset=utf-8"
    policy = dict(part.strip().split(" ", 1) for part in headers["Content-Security-Policy"].split(";"))
    assert policy["script-src"] == "'self'" and policy["default-src"] == "'none'"
    assert headers["X-Content-Type-Options"] == "nosniff"
    html = body.decode()
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", html, re.S)
    assert scripts and all(' src="static/' in attrs and not inline.strip() for attrs, inline in scripts)
    assert "http://" not in html and "https://" not in html  # no CDN: it works offline
    for path in re.findall(r'(?:src|href)="(static/[^"]+)"', html):
        status, headers, _ = _get(collector, path)
        assert status == 200 and "Content-Security-Policy" in headers, path
    # the page script puts names in as text, never as markup
    script = _get(collector, "static/page.js")[2].decode()
    assert "innerHTML" not in script and "insertAdjacentHTML" not in script
    assert b"MIT License" in _get(collector, "static/uPlot.LICENSE.txt")[2]


@pytest.mark.parametrize("path", ["static/../service.py", "static/index.html", "static/", "api/v1/nothing"])
def test_no_path_outside_the_page_files_and_api_is_served(collector: CollectorProcess, path: str) -> None:
    assert _get(collector, path)[0] == 404


def test_a_job_history_stays_bounded_and_whole_however_long_the_run() -> None:
    trace = Trace()
    for step in range(5 * MAX_POINTS):
        trace.add(reading(["a", "b"], ["s"], step=step))
    kept = trace.columns()["step"]
    assert len(kept) <= MAX_POINTS and kept[0] == 0 and kept[-1] >= 5 * MAX_POINTS - 8
    assert kept == sorted(kept) and len(set(kept)) == len(kept)


def test_a_new_run_of_a_job_is_drawn_from_its_start_not_after_the_old_one() -> None:
    recorder = Recorder({"job": object()})
    for step in (0, 5, 10, 15):
        recorder.record("job", reading(["a"], [], step=step))
    for step in (0, 5):  # the job restarted: a new run, its steps from 0 again
        recorder.record("job", reading(["a"], [], step=step))
    assert recorder.history("job")["step"] == [0, 5]


def test_a_basic_auth_line_with_an_empty_job_prefix_is_one_clear_error(tmp_path: Path) -> None:
    users = tmp_path / "users"
    users.write_text(f"{TEAM}:{hash_password(PASSWORD)}:team-,\n")
    with pytest.raises(AuthConfigError, match="line 1: expected job prefixes separated by commas"):
        BasicAuthUsers.load(users)
    users.write_text(f"{TEAM}:{hash_password(PASSWORD)}:team-, lab-\n")
    assert BasicAuthUsers.load(users).prefixes(TEAM) == ("team-", "lab-")
