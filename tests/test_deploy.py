"""deploy/: every file parses, and its names, ports and commands agree with the code.

Nothing here runs Docker or Kubernetes (neither is available); the files are read as those
tools would, and every command line is parsed by the real `thermoscope` parser. The collector
image's one claim the code must keep (it needs no torch) is run for real.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

from thermoscope.cli.main import parser
from thermoscope.collector.ingest.server import SERVICE
from thermoscope.wire.contract import ACTOR_NAME, DEFAULT_GRPC, DEFAULT_METRICS, NAMESPACE, split_address

from helpers.metrics import scrape
from helpers.processes import free_port, stop_process, wait_serving

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose"
KUBE = DEPLOY / "kubernetes"
GRPC_PORT = split_address(DEFAULT_GRPC)[1]
METRICS_PORT = split_address(DEFAULT_METRICS)[1]
PROMETHEUS_PORT, GRAFANA_PORT = 9090, 3000


def load(path: Path) -> Any:
    (doc,) = yaml.safe_load_all(path.read_text())
    return doc


def kube_objects() -> dict[tuple[str, str], dict[str, Any]]:
    """The resources kustomization.yaml applies, by (kind, name)."""
    kustomization = load(KUBE / "kustomization.yaml")
    objects = {}
    for resource in kustomization["resources"]:
        for doc in yaml.safe_load_all((KUBE / resource).read_text()):
            objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def parse_thermoscope(argv: list[str]) -> Any:
    """`thermoscope argv` as the real CLI parses it; a bad flag or value fails the test."""
    try:
        return parser().parse_args(argv)
    except SystemExit:
        pytest.fail(f"thermoscope {shlex.join(argv)}: the CLI refuses this command line")


def dockerfile_instruction(name: str) -> list[str]:
    """The exec-form (JSON) arguments of a Dockerfile instruction."""
    (line,) = [
        line for line in (DEPLOY / "Dockerfile").read_text().splitlines() if line.startswith(name + " ")
    ]
    return json.loads(line[len(name) + 1 :])


def port_of(address: str) -> int:
    return split_address(address)[1]


def test_every_yaml_and_json_file_under_deploy_parses() -> None:
    ymls = sorted([*DEPLOY.rglob("*.yml"), *DEPLOY.rglob("*.yaml")])
    jsons = sorted(DEPLOY.rglob("*.json"))
    assert len(ymls) >= 10 and jsons
    for path in ymls:
        docs = list(yaml.safe_load_all(path.read_text()))
        assert docs and all(isinstance(d, dict) for d in docs), f"{path}: empty or not a mapping"
    for path in jsons:
        json.loads(path.read_text())
    # and the YAML inside them: the RayJob's runtime env
    (rayjob,) = [o for (kind, _), o in kube_objects().items() if kind == "RayJob"]
    assert isinstance(yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"]), dict)


def test_every_thermoscope_flag_in_deploy_files_exists_in_the_cli() -> None:
    p = parser()
    (commands,) = [a for a in p._actions if a.dest == "command"]
    global_flags = set(p._option_string_actions)
    mention = re.compile(rf"\bthermoscope\s+({'|'.join(commands.choices)})\b(.*)")
    seen = 0
    for path in sorted(DEPLOY.rglob("*")):
        if (
            not path.is_file()
            or path.suffix not in (".md", ".yml", ".yaml", ".py", "")
            or "file_sd" in path.parts
        ):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for match in mention.finditer(line):
                known = global_flags | set(commands.choices[match[1]]._option_string_actions)
                rest = re.split(r"[`#|;)]", match[2])[0]
                for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", rest):
                    seen += 1
                    assert flag in known, (
                        f"{path.relative_to(ROOT)}:{number}: thermoscope {match[1]} has no {flag}"
                    )
    assert seen >= 5


def test_the_collector_image_runs_the_collector_on_the_default_ports() -> None:
    entrypoint, cmd = dockerfile_instruction("ENTRYPOINT"), dockerfile_instruction("CMD")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert entrypoint == ["thermoscope"] and "thermoscope" in project["scripts"]
    args = parse_thermoscope(cmd)
    assert args.command == "collector" and not args.ray
    assert split_address(args.grpc) == ("0.0.0.0", GRPC_PORT)
    assert split_address(args.metrics) == ("0.0.0.0", METRICS_PORT)
    assert Path(args.db).parent == Path("/var/lib/thermoscope")
    expose = [line for line in (DEPLOY / "Dockerfile").read_text().splitlines() if line.startswith("EXPOSE ")]
    assert expose == [f"EXPOSE {GRPC_PORT} {METRICS_PORT}"]


def test_the_collector_image_installs_the_package_with_its_declared_dependencies() -> None:
    """The image installs the package as users do: its dependencies are the collector's, with
    no torch or ray among them (those are the training side's extras), and it copies every
    folder the package is built from."""
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"pip install --no-cache-dir -c constraints\.txt \.\s", text)
    assert "--no-deps" not in text

    def name(requirement: str) -> str:
        return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].lower().replace("_", "-")

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert not {name(r) for r in project["project"]["dependencies"]} & {"torch", "ray"}
    ignored = {i.rstrip("/") for i in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()}
    copied = {s.rstrip("/") for c in re.findall(r"^COPY (.+) \S+$", text, flags=re.M) for s in c.split()}
    for source in copied:
        assert (ROOT / source).exists() and f"!{source}" in ignored
    folders = {d.split("/")[0] for d in project["tool"]["setuptools"]["package-dir"].values()}
    assert folders <= copied


@pytest.mark.slow
def test_the_collector_runs_without_torch(tmp_path: Path) -> None:
    """What the image relies on: `thermoscope collector` never imports torch (nor ray)."""
    grpc_port, metrics_port = free_port(), free_port()
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['ray'] = None\n"
        "from thermoscope.cli.main import main\n"
        "sys.exit(main(sys.argv[1:]))"
    )
    argv = ["collector", "--grpc", f"127.0.0.1:{grpc_port}", "--metrics", f"127.0.0.1:{metrics_port}"]
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *argv, "--db", str(tmp_path / "events.db")],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        wait_serving(f"127.0.0.1:{grpc_port}")
        metrics = scrape(f"http://127.0.0.1:{metrics_port}/metrics")
        assert any(name == "thermoscope_collector_info" for name, _ in metrics)
    finally:
        stop_process(proc)


def compose() -> dict[str, Any]:
    return load(COMPOSE / "compose.yaml")


def mounts(service: dict[str, Any]) -> dict[str, Path]:
    """A compose service's bind mounts: container path -> host path (named volumes left out)."""
    found = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("."):
            found[target] = (COMPOSE / source).resolve()
    return found


def test_compose_services_ports_and_commands_agree_with_the_code() -> None:
    services = compose()["services"]
    assert set(services) == {"credentials", "collector", "prometheus", "grafana"}
    assert services["credentials"]["image"] == services["collector"]["image"]  # built by the collector's

    collector = services["collector"]
    assert (COMPOSE / collector["build"]["context"] / collector["build"]["dockerfile"]).resolve() == (
        DEPLOY / "Dockerfile"
    )
    args = parse_thermoscope(collector["command"])  # the image's entrypoint is `thermoscope`
    assert args.command == "collector"
    assert split_address(args.grpc) == ("0.0.0.0", GRPC_PORT)
    assert split_address(args.metrics) == ("0.0.0.0", METRICS_PORT)
    assert any(v.endswith(":" + str(Path(args.db).parent)) for v in collector["volumes"])
    published = {
        int(p.split(":")[1]): int(p.split(":")[0]) for s in services.values() for p in s.get("ports", [])
    }
    assert published == {
        GRPC_PORT: GRPC_PORT,
        METRICS_PORT: METRICS_PORT,
        PROMETHEUS_PORT: PROMETHEUS_PORT,
        GRAFANA_PORT: GRAFANA_PORT,
    }
    # the healthcheck asks the gRPC health service, which answers without the token /metrics would need
    healthcheck = str(collector["healthcheck"]["test"])
    assert f"127.0.0.1:{GRPC_PORT}" in healthcheck and f"service='{SERVICE}'" in healthcheck

    prometheus = services["prometheus"]
    config = next(a.split("=", 1)[1] for a in prometheus["command"] if a.startswith("--config.file="))
    assert mounts(prometheus)[config] == COMPOSE / "prometheus.yml"
    assert not any(a.startswith("--web.listen-address") for a in prometheus["command"])  # :9090

    grafana = services["grafana"]
    assert re.fullmatch(r"grafana/grafana:(\d+)\.(\d+)\.(\d+)", grafana["image"])
    major, minor, patch = map(int, grafana["image"].split(":")[1].split("."))
    assert (major, minor, patch) >= (12, 1, 2), "keepFiringFor in provisioned alert rules needs 12.1.2"
    grafana_mounts = mounts(grafana)
    provisioning = DEPLOY / "grafana" / "provisioning"
    for kind in ("datasources", "dashboards", "alerting"):
        assert grafana_mounts[f"/etc/grafana/provisioning/{kind}"] == provisioning / kind
    (provider,) = load(provisioning / "dashboards" / "thermoscope.yml")["providers"]
    dashboards = provider["options"]["path"]
    assert grafana_mounts[dashboards] == DEPLOY / "grafana" / "dashboards"
    home = PurePosixPath(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert (
        home.parent == PurePosixPath(dashboards) and (DEPLOY / "grafana" / "dashboards" / home.name).exists()
    )
    for service in services.values():
        assert all(path.exists() for path in mounts(service).values())

    # Grafana reaches Prometheus by its service name, Prometheus the collector by its
    (source,) = load(provisioning / "datasources" / "prometheus.yml")["datasources"]
    assert source["url"] == f"http://prometheus:{PROMETHEUS_PORT}"
    (job,) = load(COMPOSE / "prometheus.yml")["scrape_configs"]
    assert job["static_configs"] == [{"targets": [f"collector:{METRICS_PORT}"]}]


def test_compose_prometheus_is_the_shipped_config_with_the_compose_target(tmp_path: Path) -> None:
    shipped, ours = load(DEPLOY / "prometheus" / "prometheus.yml"), load(COMPOSE / "prometheus.yml")
    assert ours["global"] == shipped["global"]
    (shipped_job,) = [j for j in shipped["scrape_configs"] if j["job_name"] == "thermoscope"]
    (our_job,) = ours["scrape_configs"]
    assert our_job["job_name"] == shipped_job["job_name"]  # up{job=~"thermoscope.*"} alerts on it
    (shipped_targets,) = [c["targets"] for c in shipped_job["static_configs"]]
    assert [port_of(t) for t in shipped_targets] == [METRICS_PORT]

    # Every rule file of deploy/prometheus is loaded in compose, through compose's mounts.
    container = PurePosixPath("/etc/prometheus")
    prometheus_mounts = mounts(compose()["services"]["prometheus"])
    rule_files = [
        path
        for path in (DEPLOY / "prometheus").rglob("*.y*ml")
        if isinstance(doc := load(path), dict) and "groups" in doc
    ]
    loaded = set()
    for pattern in ours.get("rule_files", []):
        absolute = container / pattern
        for target, source in prometheus_mounts.items():
            if source.is_dir() and absolute.is_relative_to(target):
                loaded |= {
                    p
                    for p in source.rglob("*")
                    if fnmatch.fnmatch(str(p), str(source / absolute.relative_to(target)))
                }
    assert set(rule_files) <= loaded, f"compose does not load {sorted(set(rule_files) - loaded)}"

    if shutil.which("promtool"):  # lay the files out as compose mounts them, and check it all
        etc = tmp_path / "etc" / "prometheus"
        for target, source in prometheus_mounts.items():
            place = etc / PurePosixPath(target).relative_to(container)
            place.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if source.is_dir() else shutil.copy)(source, place)
        checked = subprocess.run(
            ["promtool", "check", "config", str(etc / "prometheus.yml")], capture_output=True, text=True
        )
        assert checked.returncode == 0, checked.stdout + checked.stderr
        assert f"{len(rule_files)} rule files found" in checked.stdout, checked.stdout


def test_kubernetes_collector_deployment_and_service_agree_with_the_code() -> None:
    kustomization = load(KUBE / "kustomization.yaml")
    objects = kube_objects()
    namespace = kustomization["namespace"]
    assert ("Namespace", namespace) in objects
    deployment = objects[("Deployment", "thermoscope-collector")]
    service = objects[("Service", "thermoscope-collector")]
    assert deployment["spec"]["replicas"] == 1  # a job's ranks must all reach one collector
    assert deployment["spec"]["strategy"]["type"] == "Recreate"
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["image"] == compose()["services"]["collector"]["image"]
    args = parse_thermoscope(container["args"])
    assert args.command == "collector" and not args.ray
    assert split_address(args.grpc) == ("0.0.0.0", GRPC_PORT)
    assert split_address(args.metrics) == ("0.0.0.0", METRICS_PORT)
    assert any(m["mountPath"] == str(Path(args.db).parent) for m in container["volumeMounts"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": GRPC_PORT, "metrics": METRICS_PORT}
    probe = container["readinessProbe"]["grpc"]
    assert probe == {"port": GRPC_PORT, "service": SERVICE}  # the health service's name for Telemetry
    assert ports[container["livenessProbe"]["tcpSocket"]["port"]] == METRICS_PORT
    # no scrape annotation: the generic job that honours it has no password, and would read 401
    assert "prometheus.io/scrape" not in pod["metadata"].get("annotations", {})
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert {p["name"]: (p["port"], ports[p["targetPort"]]) for p in service["spec"]["ports"]} == {
        "grpc": (GRPC_PORT, GRPC_PORT),
        "metrics": (METRICS_PORT, METRICS_PORT),
    }
    pvc = {
        v["persistentVolumeClaim"]["claimName"]
        for v in pod["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert pvc
    assert pvc <= {name for kind, name in objects if kind == "PersistentVolumeClaim"}


def test_kubernetes_rayjob_is_zero_code_and_streams_to_the_collector_service() -> None:
    kustomization = load(KUBE / "kustomization.yaml")
    objects = kube_objects()
    (rayjob,) = [o for (kind, _), o in objects.items() if kind == "RayJob"]
    assert rayjob["apiVersion"] == "ray.io/v1"
    env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])

    hook = env["worker_process_setup_hook"]
    module, _, attr = hook.rpartition(".")
    assert callable(getattr(importlib.import_module(module), attr)), f"{hook} is not a callable"
    assert hook == "thermoscope.agent.raytrain.setup"
    # the training side asks for the agent's extra: torch is not a dependency of the collector
    assert any(p.split()[0] == "thermoscope[agent]" for p in env["pip"]["packages"])

    service = objects[("Service", "thermoscope-collector")]
    (grpc,) = [p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc"]
    address = env["env_vars"]["THERMOSCOPE_COLLECTOR"]
    assert address == f"{service['metadata']['name']}.{kustomization['namespace']}.svc:{grpc}"
    assert grpc == GRPC_PORT

    # the entrypoint runs train.py from the ConfigMap kustomize makes of it
    (generated,) = kustomization["configMapGenerator"]
    assert kustomization["generatorOptions"]["disableNameSuffixHash"] is True
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (volume,) = [v for v in head["volumes"] if v.get("configMap", {}).get("name") == generated["name"]]
    (mount,) = [m for c in head["containers"] for m in c["volumeMounts"] if m["name"] == volume["name"]]
    python, script, *train_args = shlex.split(rayjob["spec"]["entrypoint"])
    assert python == "python" and PurePosixPath(script).parent == PurePosixPath(mount["mountPath"])
    assert PurePosixPath(script).name in generated["files"] and (KUBE / PurePosixPath(script).name).exists()
    spec = importlib.util.spec_from_file_location("thermoscope_kube_train", KUBE / "train.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    train.parser().parse_args(train_args)  # a bad flag exits here

    # zero-code: the training script does not mention Thermoscope
    tree = ast.parse((KUBE / "train.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(m.split(".")[0] == "thermoscope" for m in imported)

    # one Ray version: the cluster's and its images'
    cluster = rayjob["spec"]["rayClusterSpec"]
    images = [c["image"] for c in head["containers"]]
    images += [c["image"] for g in cluster["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]]
    assert {i.split(":")[1].split("-")[0] for i in images} == {cluster["rayVersion"]}


def test_kubernetes_prometheus_scrape_job_finds_the_collector() -> None:
    (job,) = load(KUBE / "prometheus-scrape.yml")["scrape_configs"]
    assert re.fullmatch("thermoscope.*", job["job_name"])  # the ThermoscopeCollectorDown alert's up{job=~}
    objects = kube_objects()
    pod = objects[("Deployment", "thermoscope-collector")]["spec"]["template"]
    (sd,) = job["kubernetes_sd_configs"]
    assert sd["role"] == "pod" and sd["namespaces"]["names"] == [
        load(KUBE / "kustomization.yaml")["namespace"]
    ]
    keeps = {
        tuple(r["source_labels"]): r["regex"] for r in job["relabel_configs"] if r.get("action") == "keep"
    }
    label = keeps[("__meta_kubernetes_pod_label_app_kubernetes_io_name",)]
    assert re.fullmatch(label, pod["metadata"]["labels"]["app.kubernetes.io/name"])
    (container,) = pod["spec"]["containers"]
    (port,) = [
        p
        for p in container["ports"]
        if re.fullmatch(keeps[("__meta_kubernetes_pod_container_port_name",)], p["name"])
    ]
    assert port["containerPort"] == METRICS_PORT


def test_the_deploy_readme_names_the_actor_and_ports_as_the_code_does() -> None:
    text = (DEPLOY / "README.md").read_text()
    actors = re.findall(r"actor `([\w-]+)` in (?:Ray )?namespace `([\w-]+)`", text)
    assert actors and set(actors) == {(ACTOR_NAME, NAMESPACE)}
    assert f"{GRPC_PORT}" in text and f"{METRICS_PORT}" in text
    for block in re.findall(r"```(?:sh|bash)\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("thermoscope ") and "<" not in line:
                parse_thermoscope(shlex.split(line)[1:])
