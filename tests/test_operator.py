"""deploy/kubernetes/operator/: the Prometheus Operator's resources (kube-prometheus-stack).

The PrometheusRule is generated from the shipped rules file, never edited by hand: its groups
are that file's groups, its committed text is what the generator writes, and promtool checks
and unit-tests the spec extracted from it as it does the rules file. The ServiceMonitor and the
PodMonitor are held to the collector's Service and ports. No cluster runs here: the manifests
are parsed, rendered by `kubectl kustomize` where kubectl is installed, and checked by promtool.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from thermoscope.wire.contract import DEFAULT_METRICS, split_address

ROOT = Path(__file__).resolve().parents[1]
KUBE = ROOT / "deploy" / "kubernetes"
OPERATOR = KUBE / "operator"
RULES = ROOT / "deploy" / "prometheus" / "rules"
UNIT_TESTS = ROOT / "deploy" / "prometheus" / "tests"
GENERATOR = OPERATOR / "generate.py"
METRICS_PORT = split_address(DEFAULT_METRICS)[1]
API = "monitoring.coreos.com/v1"
PROMTOOL = shutil.which("promtool")
KUBECTL = shutil.which("kubectl")


def load(path: Path) -> Any:
    (doc,) = yaml.safe_load_all(path.read_text())
    return doc


def manifests() -> dict[str, dict[str, Any]]:
    """The resources the operator kustomization applies, by kind."""
    kustomization = load(OPERATOR / "kustomization.yaml")
    return {doc["kind"]: doc for r in kustomization["resources"] for doc in [load(OPERATOR / r)]}


def rules_groups() -> list[dict[str, Any]]:
    """The groups of every shipped rules file, in file order."""
    return [g for path in sorted(RULES.glob("*.yml")) for g in load(path)["groups"]]


def collector_objects() -> dict[tuple[str, str], dict[str, Any]]:
    return {
        (d["kind"], d["metadata"]["name"]): d
        for d in yaml.safe_load_all((KUBE / "collector.yaml").read_text())
    }


def generate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(GENERATOR), *args], capture_output=True, text=True, timeout=60, cwd=ROOT
    )


def test_the_operator_kustomization_applies_a_service_monitor_a_pod_monitor_and_the_rules() -> None:
    objects = manifests()
    assert set(objects) == {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    assert all(o["apiVersion"] == API for o in objects.values())
    # the same namespace as the collector's, and the label kube-prometheus-stack selects by
    kustomization, main = load(OPERATOR / "kustomization.yaml"), load(KUBE / "kustomization.yaml")
    assert kustomization["namespace"] == main["namespace"]
    (labels,) = kustomization["labels"]
    assert labels["pairs"] == {"release": "kube-prometheus-stack"} and not labels.get("includeSelectors")
    # not in the base kustomization: without the Operator's CRDs `kubectl apply -k` would fail
    assert "operator" not in " ".join(main["resources"])


def test_the_prometheus_rule_holds_exactly_the_shipped_rules_groups() -> None:
    rule = manifests()["PrometheusRule"]
    assert rule["spec"]["groups"] == rules_groups()
    assert rule["metadata"]["name"] == "thermoscope"


def test_the_committed_prometheus_rule_is_what_the_generator_writes() -> None:
    checked = generate("--check")
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_the_generator_check_fails_on_a_stale_prometheus_rule(tmp_path: Path) -> None:
    stale = tmp_path / "prometheusrule.yaml"
    text = (OPERATOR / "prometheusrule.yaml").read_text()
    stale.write_text(text.replace("for: 1m", "for: 2m", 1))
    assert stale.read_text() != text
    checked = generate("--check", "--out", str(stale))
    assert checked.returncode == 1
    assert str(stale) in checked.stderr and "generate.py" in checked.stderr
    # and writing it repairs it
    assert generate("--out", str(stale)).returncode == 0
    assert stale.read_text() == text


def test_the_generated_file_says_where_its_source_is() -> None:
    spec = importlib.util.spec_from_file_location("thermoscope_operator_generate", GENERATOR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = module.render(sorted(RULES.glob("*.yml")))
    assert text == (OPERATOR / "prometheusrule.yaml").read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    assert any("deploy/prometheus/rules/thermoscope.yml" in line for line in header)
    assert any("do not edit" in line.lower() for line in header)


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not found on PATH (Debian's prometheus package)")
def test_promtool_checks_and_unit_tests_the_spec_extracted_from_the_prometheus_rule(tmp_path: Path) -> None:
    extracted = tmp_path / "rules" / "thermoscope.yml"
    extracted.parent.mkdir()
    extracted.write_text(yaml.safe_dump({"groups": manifests()["PrometheusRule"]["spec"]["groups"]}))
    checked = subprocess.run([PROMTOOL, "check", "rules", str(extracted)], capture_output=True, text=True)
    out = checked.stdout + checked.stderr
    assert checked.returncode == 0 and "WARNING" not in out, out
    assert f"SUCCESS: {sum(len(g['rules']) for g in rules_groups())} rules found" in out, out
    # the rules' unit tests, run against the extracted spec in place of the rules file
    tests = tmp_path / "tests"
    tests.mkdir()
    for unit in sorted(UNIT_TESTS.glob("*.yml")):
        doc = load(unit)
        assert doc["rule_files"] == ["../rules/thermoscope.yml"]
        (tests / unit.name).write_text(yaml.safe_dump(doc))
    tested = subprocess.run(
        [PROMTOOL, "test", "rules", *sorted(str(p) for p in tests.glob("*.yml"))],
        capture_output=True,
        text=True,
        cwd=tests,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert tested.stdout.count("SUCCESS") == len(list(UNIT_TESTS.glob("*.yml")))


def test_the_service_monitor_scrapes_the_collector_service_metrics_port() -> None:
    monitor = manifests()["ServiceMonitor"]
    objects = collector_objects()
    service = objects[("Service", "thermoscope-collector")]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    (endpoint,) = monitor["spec"]["endpoints"]
    ports = {p["name"]: p["port"] for p in service["spec"]["ports"]}
    assert ports[endpoint["port"]] == METRICS_PORT
    assert endpoint["path"] == "/metrics"
    # the job label the shipped scrape config gives, which ThermoscopeCollectorDown watches
    (job,) = [r for r in endpoint["relabelings"] if r["targetLabel"] == "job"]
    assert job["replacement"] == "thermoscope" and re.fullmatch("thermoscope.*", job["replacement"])


def test_the_pod_monitor_scrapes_the_ray_actor_on_the_head_pod_with_basic_auth() -> None:
    monitor = manifests()["PodMonitor"]
    assert monitor["spec"]["selector"]["matchLabels"] == {"ray.io/node-type": "head"}
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    # the head container declares this port (docs/deploy.md shows how): the Operator scrapes
    # only declared ports
    snippet = re.search(r"```yaml\n( *ports:.*?)```", (ROOT / "docs" / "deploy.md").read_text(), re.S)
    assert snippet is not None, "docs/deploy.md shows no `ports:` block for the Ray head"
    (port,) = yaml.safe_load(textwrap.dedent(snippet[1]))["ports"]
    assert port == {"name": endpoint["port"], "containerPort": METRICS_PORT}
    assert len(endpoint["port"]) <= 15  # a Kubernetes port name
    # off loopback the actor refuses to start without /metrics protection: the monitor has it
    auth = endpoint["basicAuth"]
    assert auth["username"]["name"] == auth["password"]["name"] == "thermoscope-scrape"
    assert (auth["username"]["key"], auth["password"]["key"]) == ("username", "password")
    (job,) = [r for r in endpoint["relabelings"] if r["targetLabel"] == "job"]
    shipped = {
        j["job_name"] for j in load(ROOT / "deploy" / "prometheus" / "prometheus.yml")["scrape_configs"]
    }
    assert job["replacement"] == "thermoscope-ray" and job["replacement"] in shipped


@pytest.mark.skipif(KUBECTL is None, reason="kubectl not found on PATH")
def test_kubectl_kustomize_renders_the_operator_resources_in_the_collectors_namespace() -> None:
    built = subprocess.run([KUBECTL, "kustomize", str(OPERATOR)], capture_output=True, text=True, timeout=60)
    assert built.returncode == 0, built.stderr
    docs = list(yaml.safe_load_all(built.stdout))
    assert sorted(d["kind"] for d in docs) == ["PodMonitor", "PrometheusRule", "ServiceMonitor"]
    for doc in docs:
        assert doc["apiVersion"] == API
        assert doc["metadata"]["namespace"] == "thermoscope"
        assert doc["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (rule,) = [d for d in docs if d["kind"] == "PrometheusRule"]
    assert rule["spec"]["groups"] == rules_groups()
    # the selectors are left as written (the release label is the Prometheus's, not the pods')
    for doc in docs:
        if doc["kind"] != "PrometheusRule":
            assert "release" not in doc["spec"]["selector"]["matchLabels"]


def test_the_deploy_readme_applies_the_operator_resources() -> None:
    assert "kubectl apply -k deploy/kubernetes/operator" in (ROOT / "deploy" / "README.md").read_text()
    assert "kubectl apply -k deploy/kubernetes/operator" in (ROOT / "docs" / "deploy.md").read_text()
