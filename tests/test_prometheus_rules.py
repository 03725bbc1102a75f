"""The shipped Prometheus config and rules: promtool checks them and runs their unit tests
(deploy/prometheus/tests/), the alerts keep their agreed names, expressions and timings, each
has its runbook section, and every metric the rules read is one the collector exports."""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from helpers.metrics import scrape
from helpers.protocol import OpenStream, frame, hello, stream

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy" / "prometheus"
RULES = DEPLOY / "rules" / "thermoscope.yml"
RUNBOOK = ROOT / "deploy" / "RUNBOOK.md"
RUNBOOK_URL = "https://github.com/thermoscope/thermoscope/blob/main/deploy/RUNBOOK.md#"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not found on PATH (Debian's prometheus package; .ci/run installs it)"
)

#: The alerts as agreed with the Grafana-managed rules: name -> (expr, for, keep_firing_for, severity).
ALERTS = {
    "ThermoscopeDataShift": (
        'increase(thermoscope_phase_transitions_total{to="refresh"}[10m]) > 0',
        "0m",
        "15m",
        "warning",
    ),
    "ThermoscopeUnstable": ('thermoscope_phase{scope="job",phase="unstable"} == 1', "1m", "5m", "critical"),
    "ThermoscopeAgentsDisappeared": ("max by (job_id) (thermoscope_rank_stale) == 1", "2m", "5m", "warning"),
    "ThermoscopeCollectorDown": ('up{job=~"thermoscope.*"} == 0', "1m", None, "critical"),
    "ThermoscopeNegativeLayerTemperature": ("thermoscope_layer_temperature < 0", "5m", "5m", "warning"),
}


def promtool(*args: str) -> subprocess.CompletedProcess:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=ROOT)


def groups() -> dict[str, list[dict]]:
    return {g["name"]: g["rules"] for g in yaml.safe_load(RULES.read_text())["groups"]}


def slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@needs_promtool
def test_promtool_accepts_the_shipped_config_and_loads_its_rule_files() -> None:
    checked = promtool("check", "config", str(DEPLOY / "prometheus.yml"))
    out = checked.stdout + checked.stderr
    assert checked.returncode == 0, out
    assert "SUCCESS: 1 rule files found" in out, out
    # the one warning allowed: no Ray collector has written its file-SD file here
    warnings = [line for line in out.splitlines() if "WARNING" in line]
    assert all('file_sd/*.json" for file_sd' in line for line in warnings), out


@needs_promtool
def test_promtool_accepts_the_rule_files() -> None:
    files = sorted(str(p) for p in (DEPLOY / "rules").glob("*.yml"))
    assert files == [str(RULES)]
    checked = promtool("check", "rules", *files)
    out = checked.stdout + checked.stderr
    assert checked.returncode == 0 and "WARNING" not in out, out


@needs_promtool
@pytest.mark.parametrize("unit", sorted(p.name for p in (DEPLOY / "tests").glob("*.yml")))
def test_promtool_unit_tests_of_the_rules_pass(unit: str) -> None:
    tested = promtool("test", "rules", str(DEPLOY / "tests" / unit))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


#: The findings' alerts (one per job and finding, docs/findings.md): name -> (finding, severity).
FINDING_ALERTS = {
    "ThermoscopeDeadSite": ("dead_site", "warning"),
    "ThermoscopeSaturatedSite": ("saturated_site", "warning"),
    "ThermoscopeFrozenLayer": ("frozen_layer", "warning"),
    "ThermoscopeVanishingGradient": ("vanishing_gradient", "warning"),
    "ThermoscopeExplodingUpdate": ("exploding_update", "critical"),
    "ThermoscopeNonfinite": ("nonfinite", "critical"),
}
FINDINGS_DOC = ROOT / "docs" / "findings.md"
FINDINGS_URL = "https://github.com/thermoscope/thermoscope/blob/main/docs/findings.md#"


def test_every_rule_file_group_is_unit_tested() -> None:
    tests = {p.name for p in (DEPLOY / "tests").glob("*.yml")}
    assert tests == {"alerts_test.yml", "recording_test.yml", "findings_test.yml"}
    unit = yaml.safe_load((DEPLOY / "tests" / "findings_test.yml").read_text())
    tested = {t["alertname"] for group in unit["tests"] for t in group["alert_rule_test"]}
    assert tested == set(FINDING_ALERTS)
    unit = yaml.safe_load((DEPLOY / "tests" / "alerts_test.yml").read_text())
    tested = {t["alertname"] for group in unit["tests"] for t in group["alert_rule_test"]}
    assert tested == set(ALERTS)
    unit = yaml.safe_load((DEPLOY / "tests" / "recording_test.yml").read_text())
    tested = {t["expr"] for group in unit["tests"] for t in group["promql_expr_test"]}
    assert tested == {rule["record"] for rule in groups()["thermoscope-recording"]}


def test_alerts_keep_their_agreed_names_expressions_and_timings() -> None:
    rules = groups()
    assert set(rules) == {"thermoscope-recording", "thermoscope-alerts", "thermoscope-findings"}
    alerts = {rule["alert"]: rule for rule in rules["thermoscope-alerts"]}
    assert set(alerts) == set(ALERTS)
    for name, (expr, for_, keep, severity) in ALERTS.items():
        rule = alerts[name]
        assert " ".join(rule["expr"].split()) == expr, name
        assert rule["for"] == for_, name
        assert rule.get("keep_firing_for") == keep, name
        assert rule["labels"] == {"severity": severity}, name
        assert set(rule["annotations"]) == {"summary", "description", "runbook_url"}, name


def test_every_alert_links_to_its_runbook_section() -> None:
    headings = {slug(line.lstrip("#")) for line in RUNBOOK.read_text().splitlines() if line.startswith("#")}
    for rule in groups()["thermoscope-alerts"]:  # (the findings' link to docs/findings.md: below)
        url = rule["annotations"]["runbook_url"]
        assert url == RUNBOOK_URL + rule["alert"].lower(), url
        assert url.removeprefix(RUNBOOK_URL) in headings, f"no section {rule['alert']} in {RUNBOOK}"


def test_each_finding_alerts_once_per_job_grouped_and_linked_to_what_to_do() -> None:
    """One alert per job and finding (a dying block does not page once per layer), labelled for
    Alertmanager's grouping and inhibition, its runbook the finding's section of docs/findings.md."""
    headings = {
        slug(line.lstrip("#")) for line in FINDINGS_DOC.read_text().splitlines() if line.startswith("#")
    }
    alerts = {rule["alert"]: rule for rule in groups()["thermoscope-findings"]}
    assert set(alerts) == set(FINDING_ALERTS)
    for name, (finding, severity) in FINDING_ALERTS.items():
        rule = alerts[name]
        expr = f'count by (job_id, finding) (thermoscope_finding{{finding="{finding}"}} == 1)'
        assert " ".join(rule["expr"].split()) == expr, name
        assert rule["labels"] == {"severity": severity, "category": "finding"}, name
        assert rule["annotations"]["runbook_url"] == FINDINGS_URL + finding, name
        assert finding in headings, f"no section {finding} in {FINDINGS_DOC}"


def test_recording_rules_follow_the_naming_convention() -> None:
    for rule in groups()["thermoscope-recording"]:
        # level:metric:operations, the level being thermoscope
        assert re.fullmatch(r"thermoscope:[a-z_]+:[a-z0-9_]+", rule["record"]), rule["record"]
        assert "alert" not in rule


def test_every_metric_the_rules_read_is_exported_by_the_collector(collector) -> None:
    """A job streams (its rank left open: it has a liveness series), a stray frame is refused: the
    collector's /metrics then has every series the rules read."""
    _, error = stream(collector.grpc_target, [frame(1, step=1)])  # no hello first: refused
    assert error is not None
    agent = OpenStream(collector.grpc_target, hello("rules", n_layers=2))
    try:
        for seq in range(1, 4):
            assert agent.ack(frame(seq, step=seq)) == seq
        deadline = time.monotonic() + 15
        while True:
            exported = {name for name, _ in scrape(collector.metrics_url)}
            if "thermoscope_phase_transitions_total" in exported and "thermoscope_phase" in exported:
                break
            assert time.monotonic() < deadline, f"the job's phases were never exported: {sorted(exported)}"
            time.sleep(0.05)
    finally:
        agent.close()
    # (thermoscope_finding has a series only while a finding holds: test_findings.py shows it exported)
    exprs = [
        rule["expr"] for name, rules in groups().items() if name != "thermoscope-findings" for rule in rules
    ]
    read = {name for expr in exprs for name in re.findall(r"\bthermoscope_[a-z_]+", expr)}
    assert read, exprs
    assert read <= exported, read - exported
