"""deploy/grafana: the generated dashboard and alert rules, their provisioning, and the contract.

Grafana itself is not installable here, so these are structure tests: the committed files are
what deploy/grafana/generate.py makes, they read back through the SDK's own types unchanged,
the provisioning files agree on uids, and every query names only series that a real collector
exports (scraped after a real Monitor streamed to it) or recording rules of deploy/prometheus.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

pytest.importorskip("grafana_foundation_sdk")  # the test extra pins it (Python >= 3.11)

from thermoscope.agent import Monitor

from helpers.metrics import scrape
from helpers.protocol import frame, stream
from helpers.training import train_steps

ROOT = Path(__file__).resolve().parents[1]
GRAFANA = ROOT / "deploy" / "grafana"
PROMETHEUS = ROOT / "deploy" / "prometheus"


def load_generator():
    spec = importlib.util.spec_from_file_location("thermoscope_grafana_generate", GRAFANA / "generate.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gen = load_generator()


def dashboard() -> dict[str, Any]:
    return json.loads(gen.DASHBOARD_FILE.read_text())


def alerting() -> dict[str, Any]:
    return yaml.safe_load(gen.ALERTING_FILE.read_text())


def panels(model: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows' collapsed panels included."""
    found = []
    for panel in model["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def dashboard_queries(model: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target, annotation and template variable."""
    queries = [
        (f"panel {p['title']!r} {t['refId']}", t["expr"]) for p in panels(model) for t in p.get("targets", [])
    ]
    for a in model["annotations"]["list"]:
        for expr in (a.get("expr"), a.get("target", {}).get("expr")):
            if expr:
                queries.append((f"annotation {a['name']!r}", expr))
    for v in model["templating"]["list"]:
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        queries.append((f"variable {v['name']!r}", q))
    return queries


def alert_queries(rules: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (f"alert {r['title']} {d['refId']}", d["model"]["expr"])
        for g in rules["groups"]
        for r in g["rules"]
        for d in r["data"]
        if d["datasourceUid"] != "__expr__"
    ]


def series_names(promql: str) -> set[str]:
    """The thermoscope_* metric and thermoscope:* recording-rule names a PromQL query reads."""
    unquoted = re.sub(r'"(?:[^"\\]|\\.)*"', '""', promql)  # label values are not names
    return set(re.findall(r"\bthermoscope[_:][A-Za-z0-9_:]*", unquoted))


def recording_rules() -> set[str]:
    """Names of the recording rules that deploy/prometheus defines."""
    names = set()
    for path in sorted(PROMETHEUS.rglob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            for group in (doc or {}).get("groups", []) if isinstance(doc, dict) else []:
                names.update(rule["record"] for rule in group.get("rules", []) if "record" in rule)
    return names


def prometheus_alerts() -> dict[str, dict[str, Any]]:
    alerts = {}
    for path in sorted(PROMETHEUS.rglob("*.y*ml")):
        for doc in yaml.safe_load_all(path.read_text()):
            for group in (doc or {}).get("groups", []) if isinstance(doc, dict) else []:
                alerts.update({rule["alert"]: rule for rule in group.get("rules", []) if "alert" in rule})
    return alerts


def seconds(duration: str | None) -> float:
    """A Prometheus duration ("1m", "1h30m", "0s") in seconds; None is 0."""
    if not duration:
        return 0.0
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    parts = re.findall(r"(\d+)(ms|[smhdwy])", duration)
    assert "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(int(n) * units[u] for n, u in parts)


def test_the_committed_dashboard_and_alert_rules_are_what_generate_py_makes() -> None:
    for path, text in gen.render().items():
        assert path.read_text() == text, (
            f"{path.relative_to(ROOT)} drifted: run python deploy/grafana/generate.py"
        )
    assert gen.main(["--check"]) == 0


def test_the_dashboard_reads_back_through_the_sdks_types_unchanged() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from grafana_foundation_sdk.cog.encoder import JSONEncoder
        from grafana_foundation_sdk.cog.plugins import register_default_plugins
        from grafana_foundation_sdk.models.dashboard import Dashboard

    register_default_plugins()  # panel options and Prometheus queries decode to their own types
    model = dashboard()
    # a key the SDK's schema does not know would be dropped here, a wrong shape would raise
    assert json.loads(JSONEncoder().encode(Dashboard.from_json(model))) == model


def test_the_alert_rules_read_back_through_the_sdks_types_unchanged() -> None:
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.alerting import Rule

    register_default_plugins()
    for group in alerting()["groups"]:
        for rule in group["rules"]:
            # back to the HTTP API's shape, which is the SDK's (see generate.provisioning_rule)
            api = {k: v for k, v in rule.items() if k not in ("keepFiringFor", "dashboardUid", "panelId")}
            api |= {"folderUID": "", "ruleGroup": "", "orgID": 0}
            if "keepFiringFor" in rule:
                api["keep_firing_for"] = rule["keepFiringFor"]
            assert json.loads(JSONEncoder().encode(Rule.from_json(api))) == api


def test_dashboard_layout_ids_and_variable() -> None:
    model = dashboard()
    assert model["uid"] == gen.DASHBOARD_UID
    ids = [p["id"] for p in panels(model)]
    assert len(ids) == len(set(ids)) and all(i > 0 for i in ids)
    for p in panels(model):
        grid = p["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, p["title"]
        if p["type"] != "row":
            assert p["targets"], f"panel {p['title']!r} has no query"
            assert all(t.get("refId") for t in p["targets"])
    # panels do not overlap
    cells = {}
    for p in panels(model):
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]
    (variable,) = model["templating"]["list"]
    assert variable["name"] == "job_id" and variable["type"] == "query"
    assert re.fullmatch(r"label_values\(thermoscope_\w+, job_id\)", variable["query"])
    per_collector = {"thermoscope_collector_info", "thermoscope_frames_rejected_total"}  # no job_id label
    for where, promql in dashboard_queries(model):
        if series_names(promql) - per_collector and not where.startswith("variable"):
            assert 'job_id=~"$job_id"' in promql, f"{where} does not follow the job_id variable"
    kinds = {p["type"] for p in panels(model)}
    assert {"timeseries", "heatmap", "state-timeline", "stat", "table"} <= kinds
    heat = next(p for p in panels(model) if p["type"] == "heatmap")
    assert "thermoscope_layer_temperature" in heat["targets"][0]["expr"]
    assert heat["options"]["filterValues"] == {}, "the default filter hides negative temperatures"
    transitions = [a for a in model["annotations"]["list"] if "phase_transitions" in a["target"]["expr"]]
    assert transitions and transitions[0]["enable"]
    findings = [
        a for a in model["annotations"]["list"] if "thermoscope_findings_total" in a["target"]["expr"]
    ]
    assert findings and findings[0]["enable"]
    (table,) = [p for p in panels(model) if p["title"] == "Findings that hold"]
    assert table["type"] == "table" and "thermoscope_finding{" in table["targets"][0]["expr"]


def test_phase_panels_map_every_phase_of_the_detector() -> None:
    from thermoscope.science.detect import PHASES

    model = dashboard()
    phase_panels = [p for p in panels(model) if "thermoscope_phase{" in str(p.get("targets"))]
    assert {p["type"] for p in phase_panels} == {"stat", "state-timeline"}
    for p in phase_panels:
        (mapping,) = p["fieldConfig"]["defaults"]["mappings"]
        assert {v["text"] for v in mapping["options"].values()} == set(PHASES)
        for code, result in mapping["options"].items():
            assert f"{code} * sum by" in p["targets"][0]["expr"]
            assert f'phase="{result["text"]}"' in p["targets"][0]["expr"].split(f"{code} * sum by")[1]


@pytest.mark.slow
def test_every_query_names_only_series_the_collector_exports(collector) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    monitor = Monitor(model, opt, collector=collector.grpc_target, job="grafana", every=1)
    try:
        train_steps(monitor, model, opt, 12)
        with torch.no_grad():
            model[0].bias.fill_(-1e3)  # the ReLU dies: a finding holds (the findings table reads it)
        train_steps(monitor, model, opt, 12)
        stream(collector.grpc_target, [frame(1, 0)])  # a frame before any hello: one rejection
        deadline = time.monotonic() + 20
        needed = {
            "thermoscope_engine_info",  # the scale probe runs on one sampled step in ten
            "thermoscope_network_engine_info",
            "thermoscope_phase",
            "thermoscope_rank_stale",  # only while the rank streams
            "thermoscope_frames_rejected_total",
            "thermoscope_site_efficiency_ratio",
            "thermoscope_site_efficiency_quantile_ratio",
            "thermoscope_site_efficiency_extreme_ratio",
            "thermoscope_finding",
            "thermoscope_rank_info",
        }
        while True:
            exported = {name for name, _ in scrape(collector.metrics_url)}
            if needed <= exported or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        monitor.close()
    assert needed <= exported, needed - exported
    known = exported | recording_rules()

    queries = dashboard_queries(dashboard()) + alert_queries(alerting())
    used = set()
    for where, promql in queries:
        names = series_names(promql)
        assert names <= known, f"{where} reads series nobody exports: {sorted(names - known)}\n{promql}"
        used |= names
    # the panels cover the contract's families
    for family in (
        "thermoscope_energy",
        "thermoscope_entropy_nats",
        "thermoscope_temperature",
        "thermoscope_site_efficiency_quantile_ratio",
        "thermoscope_site_efficiency_extreme_ratio",
        "thermoscope_layer_temperature",
        "thermoscope_site_efficiency_ratio",
        "thermoscope_engine_info",
        "thermoscope_phase",
        "thermoscope_agents_connected",
        "thermoscope_rank_stale",
        "thermoscope_phase_transitions_total",
        "thermoscope_finding",
        "thermoscope_findings_total",
        "thermoscope_rank_info",
    ):
        assert family in used, f"no panel or alert reads {family}"


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool comes with Debian's prometheus")
def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query as a recording rule's expression (Grafana's variables filled in)."""
    grafana_vars = {"$__rate_interval": "1m", "$__interval": "1m", "$job_id": ".*"}
    rules = []
    for i, (where, promql) in enumerate(dashboard_queries(dashboard()) + alert_queries(alerting())):
        if promql.startswith("label_values("):  # a Grafana function, not PromQL: check its metric
            promql = re.fullmatch(r"label_values\((\w+), *\w+\)", promql)[1]
        for var, value in grafana_vars.items():
            promql = promql.replace(var, value)
        # ($1 is label_replace's capture group: Grafana leaves a name no variable has as it is)
        assert not re.search(r"\$(?!1\b)", promql), f"{where}: a Grafana variable the test does not know"
        rules.append({"record": f"check:query_{i}", "expr": promql})
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "queries", "rules": rules}]}))
    checked = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool comes with Debian's prometheus")
def test_the_gpu_panel_joins_each_rank_to_the_dcgm_exporters_series_of_its_gpu(tmp_path: Path) -> None:
    """Prometheus evaluates the panel's query over thermoscope_rank_info (labelled as the catalogue
    says) and the DCGM exporter's series (labelled as it labels them): each rank gets its GPU's."""
    from thermoscope.collector.exposition.catalogue import FAMILIES

    (family,) = [f for f in FAMILIES if f.name == "thermoscope_rank_info"]
    assert family.labels == ("job_id", "rank", "host", "pod", "gpu")
    (panel,) = [p for p in panels(dashboard()) if p["title"].startswith("GPU utilization of each rank")]
    promql = panel["targets"][0]["expr"].replace("$job_id", ".*")
    assert "thermoscope_rank_info" in promql and "DCGM_FI_DEV_GPU_UTIL" in promql
    ours = 'job="thermoscope",instance="collector:9400",job_id="llm",host="node-a",pod="trainer-0"'
    dcgm = 'job="dcgm",Hostname="node-a",UUID="GPU-{0}",device="nvidia{0}",modelName="NVIDIA H100",gpu="{0}"'
    series = [
        {"series": f'thermoscope_rank_info{{{ours},rank="0",gpu="6"}}', "values": "1x3"},
        {"series": f'thermoscope_rank_info{{{ours},rank="1",gpu="7"}}', "values": "1x3"},
        {"series": f'thermoscope_rank_info{{{ours},rank="2",gpu=""}}', "values": "1x3"},  # on CPU
        {"series": f"DCGM_FI_DEV_GPU_UTIL{{{dcgm.format(6)}}}", "values": "90x3"},
        {"series": f"DCGM_FI_DEV_GPU_UTIL{{{dcgm.format(7)}}}", "values": "15x3"},
        {"series": f"DCGM_FI_DEV_GPU_UTIL{{{dcgm.format(6).replace('node-a', 'node-b')}}}", "values": "50x3"},
    ]
    joined = ours + ',Hostname="node-a",rank="{}",gpu="{}"'
    expected = [
        {"labels": f"{{{joined.format(0, 6)}}}", "value": 90},
        {"labels": f"{{{joined.format(1, 7)}}}", "value": 15},
    ]
    (tmp_path / "join.yml").write_text(yaml.safe_dump({"groups": []}))
    tests = {
        "rule_files": ["join.yml"],
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "promql_expr_test": [{"expr": promql, "eval_time": "2m", "exp_samples": expected}],
            }
        ],
    }
    (tmp_path / "test.yml").write_text(yaml.safe_dump(tests))
    run = subprocess.run(
        ["promtool", "test", "rules", "test.yml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_recording_rule_names_are_accepted_only_where_deploy_prometheus_defines_them() -> None:
    assert series_names('sum(thermoscope:layer_temperature:max{job_id="thermoscope_x"})') == {
        "thermoscope:layer_temperature:max"
    }
    defined = recording_rules()
    assert "thermoscope:not_defined_anywhere" not in defined


def test_datasource_dashboard_and_alert_provisioning_agree() -> None:
    sources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert sources["apiVersion"] == 1
    by_uid = {s["uid"]: s for s in sources["datasources"]}
    assert by_uid[gen.DATASOURCE_UID]["type"] == "prometheus"
    assert by_uid[gen.DATASOURCE_UID]["access"] == "proxy"

    model = dashboard()
    refs = [p["datasource"] for p in panels(model) if "datasource" in p]
    refs += [t["datasource"] for p in panels(model) for t in p.get("targets", [])]
    refs += [a["datasource"] for a in model["annotations"]["list"]]
    refs += [v["datasource"] for v in model["templating"]["list"]]
    assert refs and all(r == {"type": "prometheus", "uid": gen.DATASOURCE_UID} for r in refs)

    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "thermoscope.yml").read_text())
    (provider,) = providers["providers"]
    assert providers["apiVersion"] == 1 and provider["type"] == "file"
    assert provider["folder"] == gen.FOLDER

    rules = alerting()
    assert rules["apiVersion"] == 1
    (group,) = rules["groups"]
    assert group["folder"] == gen.FOLDER and group["orgId"] == 1 and seconds(group["interval"]) > 0
    panel_ids = {p["id"]: p for p in panels(model)}
    uids = set()
    for rule in group["rules"]:
        assert re.fullmatch(r"[A-Za-z0-9_-]{1,40}", rule["uid"]) and rule["uid"] not in uids
        uids.add(rule["uid"])
        refs = {d["refId"]: d for d in rule["data"]}
        assert rule["condition"] in refs
        assert refs[rule["condition"]]["datasourceUid"] == "__expr__"
        for ref, d in refs.items():
            assert d["model"]["refId"] == ref
            assert d["datasourceUid"] in (gen.DATASOURCE_UID, "__expr__")
            if d["datasourceUid"] != "__expr__":
                assert d["relativeTimeRange"]["from"] > d["relativeTimeRange"]["to"] == 0
                assert d["model"]["instant"] is True
            else:
                assert d["model"]["expression"] in refs
        assert rule["dashboardUid"] == model["uid"] and rule["panelId"] in panel_ids
        assert rule["noDataState"] in ("OK", "NoData", "Alerting", "KeepLast")
        assert rule["execErrState"] in ("OK", "Error", "Alerting", "KeepLast")
        seconds(rule["for"]), seconds(rule.get("keepFiringFor"))
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert {"summary", "description", "runbook_url"} <= set(rule["annotations"])


def test_grafana_alerts_are_the_prometheus_alerts() -> None:
    warn, crit = "warning", "critical"
    expected = {  # name: (the Prometheus alert's expr, for, keep_firing_for, severity)
        "ThermoscopeDataShift": (
            'increase(thermoscope_phase_transitions_total{to="refresh"}[10m]) > 0',
            "0m",
            "15m",
            warn,
        ),
        "ThermoscopeUnstable": ('thermoscope_phase{scope="job",phase="unstable"} == 1', "1m", "5m", crit),
        "ThermoscopeAgentsDisappeared": ("max by (job_id) (thermoscope_rank_stale) == 1", "2m", "5m", warn),
        "ThermoscopeCollectorDown": ('up{job=~"thermoscope.*"} == 0', "1m", None, crit),
        "ThermoscopeNegativeLayerTemperature": ("thermoscope_layer_temperature < 0", "5m", "5m", warn),
    }
    rules = {r["title"]: r for g in alerting()["groups"] for r in g["rules"]}
    assert set(rules) == set(expected)
    for alert in gen.ALERTS:
        promql, for_, keep, severity = expected[alert.name]
        rule = rules[alert.name]
        assert alert.promql == promql
        (query,) = [d for d in rule["data"] if d["datasourceUid"] != "__expr__"]
        (threshold,) = [d for d in rule["data"] if d["refId"] == rule["condition"]]
        (condition,) = threshold["model"]["conditions"]
        assert query["model"]["expr"] == alert.expr
        assert condition["evaluator"] == {"type": alert.op, "params": [alert.threshold]}
        assert seconds(rule["for"]) == seconds(for_)
        assert seconds(rule.get("keepFiringFor")) == seconds(keep)
        assert rule["labels"] == {"severity": severity}
        anchor = alert.name.lower()
        assert rule["annotations"]["runbook_url"] == (
            f"https://github.com/thermoscope/thermoscope/blob/main/deploy/RUNBOOK.md#{anchor}"
        )


def test_grafana_alerts_match_the_prometheus_rules_of_deploy_prometheus() -> None:
    alerts = prometheus_alerts()
    if not alerts:
        pytest.skip("deploy/prometheus defines no alerting rules yet")
    normalize = lambda promql: re.sub(r"\s+", "", promql)  # noqa: E731
    for alert in gen.ALERTS:
        assert alert.name in alerts, f"deploy/prometheus has no alert {alert.name}"
        rule = alerts[alert.name]
        assert normalize(rule["expr"]) == normalize(alert.promql), alert.name
        assert seconds(rule.get("for")) == seconds(alert.for_), alert.name
        assert seconds(rule.get("keep_firing_for")) == seconds(alert.keep_firing_for), alert.name
        assert rule.get("labels", {}).get("severity") == alert.severity, alert.name
        if "runbook_url" in rule.get("annotations", {}):
            assert rule["annotations"]["runbook_url"] == gen.RUNBOOK.format(alert.name.lower())


def test_runbook_anchors_exist_where_the_runbook_does() -> None:
    runbook = ROOT / "deploy" / "RUNBOOK.md"
    if not runbook.exists():
        pytest.skip("deploy/RUNBOOK.md is not written yet")
    anchors = {
        re.sub(r"[^a-z0-9 _-]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in runbook.read_text().splitlines()
        if line.startswith("#")
    }
    for alert in gen.ALERTS:
        assert alert.name.lower() in anchors, f"deploy/RUNBOOK.md has no section {alert.name}"
