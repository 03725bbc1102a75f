"""deploy/: every shipped manifest starts a collector that passes its own security checks.

The collector refuses to listen off loopback unprotected (`collector.security.check_exposure`),
and every manifest listens on 0.0.0.0. So each collector command line a manifest runs (the
image's CMD, compose's command, the Deployment's args) is parsed by the real CLI and its
`Security` loaded as `thermoscope collector` loads it before binding a port: the exposure check,
then every file read. The files are the ones the manifest mounts, made as its documentation or
its init step makes them, at the container paths mapped to a temporary directory. The agents'
token and Prometheus' password that the same manifests hand out are then checked against what
that collector loaded: a token it accepts, a password its `/metrics` admits. Nothing here runs
Docker or Kubernetes; the one process test runs compose's collector and its healthcheck for real.
"""

from __future__ import annotations

import base64
import os
import re
import shlex
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from thermoscope.cli import security as security_cli
from thermoscope.cli.main import parser
from thermoscope.collector.credentials import AuthConfigError
from thermoscope.collector.exposition.passwords import BasicAuthUsers
from thermoscope.collector.security import Guard
from thermoscope.wire.contract import split_address

from helpers.processes import free_port, stop_process, wait_serving

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose"
KUBE = DEPLOY / "kubernetes"
#: The flags of `Security` that name a file (argparse's dests).
SECURITY_FILES = (
    "tokens",
    "tls_cert",
    "tls_key",
    "tls_client_ca",
    "metrics_tls_cert",
    "metrics_tls_key",
    "metrics_basic_auth",
)
#: Where a Prometheus run by the Operator mounts a Secret it lists in `spec.secrets`; the
#: explicit scrape job reads its password file there (deploy/README.md).
PROMETHEUS_SECRETS = PurePosixPath("/etc/prometheus/secrets")


def load(path: Path) -> Any:
    (doc,) = yaml.safe_load_all(path.read_text())
    return doc


def collector_argv(argv: list[str], files: dict[PurePosixPath, Path]) -> Any:
    """`thermoscope argv` parsed by the real CLI, with each security file's container path
    replaced by the file `files` maps it to (a path the manifest does not mount fails)."""
    args = parser().parse_args(argv)
    assert args.command == "collector" and not args.ray
    assert not args.insecure, "a shipped manifest protects the collector with secrets, not --insecure"
    for dest in SECURITY_FILES:
        path = getattr(args, dest)
        if path is not None:
            assert PurePosixPath(path) in files, f"{path}: the manifest mounts no file there"
            setattr(args, dest, str(files[PurePosixPath(path)]))
    return args


def startup_checks(argv: list[str], files: dict[PurePosixPath, Path]) -> Guard:
    """What `thermoscope collector` checks before it binds a port: its `Security`, from its flags,
    loaded for its own hosts (InsecureError off loopback unprotected, AuthConfigError for a file)."""
    args = collector_argv(argv, files)
    security = security_cli.from_args(args, parser())
    return security.load(split_address(args.grpc)[0], split_address(args.metrics)[0])


def dockerfile_instruction(name: str) -> list[str]:
    """The exec-form (JSON) arguments of a Dockerfile instruction."""
    lines = (DEPLOY / "Dockerfile").read_text().splitlines()
    (line,) = [line for line in lines if line.startswith(name + " ")]
    return yaml.safe_load(line[len(name) + 1 :])


# --- the image ------------------------------------------------------------------------------


def image_files(argv: list[str], made: dict[str, Path]) -> dict[PurePosixPath, Path]:
    """The image's security files, each mapped to the file of the same name in `made`."""
    args = parser().parse_args(argv)
    paths = [PurePosixPath(getattr(args, d)) for d in SECURITY_FILES if getattr(args, d) is not None]
    return {path: made[path.name] for path in paths}


def test_the_image_cmd_starts_a_protected_collector_with_its_credentials_mounted(tmp_path: Path) -> None:
    argv = dockerfile_instruction("CMD")
    made = {key.split("/", 1)[1]: path for key, path in credentials_as_documented(tmp_path).items()}
    guard = startup_checks(argv, image_files(argv, made))
    assert guard.tokens is not None and guard.auth is not None


def test_the_image_cmd_without_its_credentials_says_which_file_to_mount(tmp_path: Path) -> None:
    """`docker run` with nothing mounted: the collector stops at its first missing file, naming it;
    the Dockerfile says which directory to mount, and which files it holds."""
    argv = dockerfile_instruction("CMD")
    absent = image_files(argv, {n: tmp_path / "absent" / n for n in ("tokens", "metrics-users")})
    assert {p.name for p in absent} == {"tokens", "metrics-users"}
    with pytest.raises(AuthConfigError, match=re.escape(str(tmp_path / "absent" / "tokens"))):
        startup_checks(argv, absent)
    lines = (DEPLOY / "Dockerfile").read_text().splitlines()
    comments = " ".join(line for line in lines if line.startswith("#"))
    (directory,) = {p.parent for p in absent}
    assert f"{directory}/tokens" in comments and f"{directory}/metrics-users" in comments


# --- compose --------------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    return load(COMPOSE / "compose.yaml")


def compose_path(service: dict[str, Any], path: str, volumes: Path) -> Path | None:
    """Where a container path of a compose service lies on this machine: through its bind
    mounts (relative to compose.yaml) or named volumes (a directory each under `volumes`)."""
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if PurePosixPath(path).is_relative_to(target):
            rest = PurePosixPath(path).relative_to(target)
            base = (COMPOSE / source).resolve() if source.startswith(".") else volumes / source
            return base / rest
    return None


def run_compose_init(name: str, volumes: Path) -> subprocess.CompletedProcess:
    """A compose service that runs once (`python SCRIPT ARGS`), here, on its mounts."""
    service = compose()["services"][name]
    program, *args = [*service.get("entrypoint", []), *service.get("command", [])]
    assert program == "python"  # the image's Python, which has thermoscope installed
    local = [str(compose_path(service, a, volumes) or a) if a.startswith("/") else a for a in args]
    for volume in service["volumes"]:
        if not volume.split(":")[0].startswith("."):
            (volumes / volume.split(":")[0]).mkdir(parents=True, exist_ok=True)
    return subprocess.run([sys.executable, *local], capture_output=True, text=True, timeout=60)


def compose_credentials(volumes: Path) -> tuple[dict[str, Any], dict[PurePosixPath, Path]]:
    """Run compose's init step, as `docker compose up` does before the collector; the collector
    service and its security files, mapped to where the init step wrote them."""
    services = compose()["services"]
    collector = services["collector"]
    (init,) = [
        name
        for name, condition in collector.get("depends_on", {}).items()
        if condition.get("condition") == "service_completed_successfully"
    ]
    made = run_compose_init(init, volumes)
    assert made.returncode == 0, made.stdout + made.stderr
    args = parser().parse_args(collector["command"])
    files = {}
    for dest in SECURITY_FILES:
        path = getattr(args, dest)
        if path is not None and (local := compose_path(collector, path, volumes)) is not None:
            files[PurePosixPath(path)] = local
    return collector, files


def test_compose_starts_a_protected_collector_on_the_credentials_its_init_step_makes(tmp_path: Path) -> None:
    collector, files = compose_credentials(tmp_path / "volumes")
    guard = startup_checks(collector["command"], files)
    assert guard.tokens is not None and guard.auth is not None
    # the collector only reads them, and starts only once they are made
    services = compose()["services"]
    (init,) = [
        n for n, c in collector["depends_on"].items() if c["condition"] == "service_completed_successfully"
    ]
    init_volumes = {v.split(":")[0] for v in services[init]["volumes"] if not v.startswith(".")}
    shared = [v for v in collector["volumes"] if v.split(":")[0] in init_volumes]
    assert shared and all(v.endswith(":ro") for v in shared)
    assert services["prometheus"]["depends_on"][init]["condition"] == "service_completed_successfully"


def test_compose_init_step_keeps_the_credentials_it_made_on_a_second_up(tmp_path: Path) -> None:
    volumes = tmp_path / "volumes"
    _, files = compose_credentials(volumes)
    first = {path: local.read_bytes() for path, local in files.items()}
    _, files = compose_credentials(volumes)
    assert {path: local.read_bytes() for path, local in files.items()} == first  # agents keep their token
    for local in files.values():  # the collector's files: readable by its user only
        assert os.stat(local).st_mode & 0o077 == 0, local


def test_compose_prometheus_scrapes_with_a_password_the_collector_admits(tmp_path: Path) -> None:
    volumes = tmp_path / "volumes"
    collector, files = compose_credentials(volumes)
    args = collector_argv(collector["command"], files)
    users = BasicAuthUsers.load(args.metrics_basic_auth)
    (job,) = load(COMPOSE / "prometheus.yml")["scrape_configs"]
    auth = job["basic_auth"]
    password_file = compose_path(compose()["services"]["prometheus"], auth["password_file"], volumes)
    assert password_file is not None, "Prometheus does not mount its password file"
    assert users.check(auth["username"], password_file.read_text().strip())  # Prometheus trims it
    assert os.stat(password_file).st_mode & 0o004  # Prometheus runs as another user (nobody)


def test_compose_tells_agents_where_their_token_is(tmp_path: Path) -> None:
    """The token the README's `docker compose exec` prints is one the collector accepts."""
    volumes = tmp_path / "volumes"
    collector, files = compose_credentials(volumes)
    guard = startup_checks(collector["command"], files)
    readme = (DEPLOY / "README.md").read_text()
    (command,) = set(
        re.findall(r"docker compose -f deploy/compose/compose\.yaml exec -T collector ([^)`]+)", readme)
    )
    program, path = shlex.split(command)
    assert program == "cat"
    token = compose_path(collector, path, volumes).read_text().strip()
    assert guard.tokens.match(token) is not None


@pytest.mark.slow
def test_compose_collector_serves_and_its_healthcheck_passes(tmp_path: Path) -> None:
    """compose's collector command, run for real on all interfaces (free ports in place of its
    own): it starts, its healthcheck passes, and /metrics admits Prometheus' password only."""
    volumes = tmp_path / "volumes"
    collector, files = compose_credentials(volumes)
    args = collector_argv(collector["command"], files)
    grpc_port, metrics_port = free_port(), free_port()
    argv = [*collector["command"]]
    own_grpc = argv[argv.index("--grpc") + 1]
    replace = {
        "--grpc": f"{split_address(own_grpc)[0]}:{grpc_port}",
        "--metrics": f"{split_address(args.metrics)[0]}:{metrics_port}",
        "--db": str(tmp_path / "events.db"),
    }
    replace.update({"--" + d.replace("_", "-"): getattr(args, d) for d in SECURITY_FILES if getattr(args, d)})
    for flag, value in replace.items():
        argv[argv.index(flag) + 1] = value
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "thermoscope.cli", *argv], env=env)
    try:
        wait_serving(f"127.0.0.1:{grpc_port}", proc=proc)
        kind, program, *check = collector["healthcheck"]["test"]
        assert (kind, program) == ("CMD", "python")
        here = f"127.0.0.1:{split_address(own_grpc)[1]}"
        check = [a.replace(here, f"127.0.0.1:{grpc_port}") for a in check]
        healthy = subprocess.run([sys.executable, *check], capture_output=True, text=True, timeout=60)
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr

        (job,) = load(COMPOSE / "prometheus.yml")["scrape_configs"]
        password = compose_path(
            compose()["services"]["prometheus"], job["basic_auth"]["password_file"], volumes
        )
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=10)
        assert refused.value.code == 401
        pair = f"{job['basic_auth']['username']}:{password.read_text().strip()}".encode()
        request = urllib.request.Request(
            url, headers={"Authorization": "Basic " + base64.b64encode(pair).decode()}
        )
        with urllib.request.urlopen(request, timeout=10) as reply:
            assert reply.status == 200 and b"thermoscope_collector_info" in reply.read()
    finally:
        stop_process(proc)


# --- Kubernetes -----------------------------------------------------------------------------


def readme_secret_block() -> str:
    """The deploy README's shell block that makes the collector's Secrets."""
    blocks = re.findall(r"```sh\n(.*?)```", (DEPLOY / "README.md").read_text(), flags=re.S)
    (block,) = [b for b in blocks if "create secret generic thermoscope-collector" in b]
    return block


def credentials_as_documented(directory: Path) -> dict[str, Path]:
    """Run the README's block that makes the Secrets' files, in `directory` (its `kubectl` lines
    left out, its `docker run IMAGE` run as the image's entrypoint, `thermoscope`): every file
    by the Secret key the block's `kubectl create secret` gives it, and each literal by key."""
    deployment = kube_objects()[("Deployment", "thermoscope-collector")]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert dockerfile_instruction("ENTRYPOINT") == ["thermoscope"]
    script, keys = ["set -euo pipefail"], {}
    for raw in readme_secret_block().splitlines():
        line = raw.split(" #")[0].strip()
        words = shlex.split(line)
        if not words:
            continue
        if words[0] == "kubectl":
            if "generic" in words:  # kubectl create secret generic
                keys.update(secret_keys(words, directory))
            continue
        if words[:2] == ["docker", "run"]:
            image = next(w for w in words[2:] if not w.startswith("-"))
            assert image == container["image"]
            line = "thermoscope " + line.split(image, 1)[1]
        script.append(line)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    made = subprocess.run(
        ["bash", "-c", "\n".join(script)],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        start_new_session=True,  # no terminal: hash-password reads the password from stdin
        stdin=subprocess.DEVNULL,
    )
    assert made.returncode == 0, made.stdout + made.stderr
    return keys


def secret_keys(words: list[str], directory: Path) -> dict[str, Path]:
    """`kubectl create secret generic NAME --from-file=[KEY=]PATH --from-literal=KEY=VALUE`:
    each key, as `SECRET/KEY`, with the file it holds (a literal is written to one)."""
    name = words[words.index("generic") + 1]
    keys = {}
    for word in words:
        if word.startswith("--from-file="):
            spec = word.split("=", 1)[1]
            key, _, path = spec.rpartition("=")
            keys[f"{name}/{key or Path(path).name}"] = directory / path
        elif word.startswith("--from-literal="):
            key, value = word.split("=", 1)[1].split("=", 1)
            literal = directory / f"{name}.{key}.literal"
            literal.write_text(value)
            keys[f"{name}/{key}"] = literal
    return keys


def kube_objects() -> dict[tuple[str, str], dict[str, Any]]:
    kustomization = load(KUBE / "kustomization.yaml")
    return {
        (doc["kind"], doc["metadata"]["name"]): doc
        for resource in kustomization["resources"]
        for doc in yaml.safe_load_all((KUBE / resource).read_text())
    }


def secret_files(
    pod: dict[str, Any], container: dict[str, Any], keys: dict[str, Path]
) -> dict[PurePosixPath, Path]:
    """A container's files from Secret volumes: its path -> the documented file of that key."""
    volumes = {v["name"]: v for v in pod["volumes"]}
    files = {}
    for mount in container.get("volumeMounts", []):
        secret = volumes[mount["name"]].get("secret")
        if secret is None:
            continue
        assert mount.get("readOnly") is True
        name = secret["secretName"]
        items = secret.get("items") or [
            {"key": k.split("/", 1)[1], "path": k.split("/", 1)[1]} for k in keys if k.startswith(name + "/")
        ]
        for item in items:
            assert f"{name}/{item['key']}" in keys, f"the README's Secret {name} has no key {item['key']}"
            files[PurePosixPath(mount["mountPath"]) / item["path"]] = keys[f"{name}/{item['key']}"]
    return files


def kube_collector(tmp_path: Path) -> tuple[Guard, dict[str, Path]]:
    """The Deployment's collector checked on the Secret made as the README says; and the files by key."""
    keys = credentials_as_documented(tmp_path)
    pod = kube_objects()[("Deployment", "thermoscope-collector")]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    guard = startup_checks(container["args"], secret_files(pod, container, keys))
    return guard, keys


def test_kubernetes_collector_starts_protected_on_the_secret_the_readme_makes(tmp_path: Path) -> None:
    guard, _ = kube_collector(tmp_path)
    assert guard.tokens is not None and guard.auth is not None
    # the README makes them in the namespace the kustomization applies to
    namespace = load(KUBE / "kustomization.yaml")["namespace"]
    for line in readme_secret_block().splitlines():
        if "create secret" in line:
            assert f"-n {namespace} " in line


def test_kubernetes_ray_workers_get_a_token_the_collector_accepts(tmp_path: Path) -> None:
    guard, keys = kube_collector(tmp_path)
    (rayjob,) = [o for (kind, _), o in kube_objects().items() if kind == "RayJob"]
    cluster = rayjob["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        for container in pod["spec"]["containers"]:
            (ref,) = [
                e["valueFrom"]["secretKeyRef"] for e in container["env"] if e["name"] == "THERMOSCOPE_TOKEN"
            ]
            token = keys[f"{ref['name']}/{ref['key']}"].read_text().strip()  # the agent strips it
            assert guard.tokens.match(token) is not None, (
                f"{container['name']}: the collector refuses its token"
            )


def test_kubernetes_prometheus_scrape_job_logs_in_with_the_scrape_secret(tmp_path: Path) -> None:
    _, keys = kube_collector(tmp_path)
    pod = kube_objects()[("Deployment", "thermoscope-collector")]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    users = BasicAuthUsers.load(
        collector_argv(container["args"], secret_files(pod, container, keys)).metrics_basic_auth
    )
    (job,) = load(KUBE / "prometheus-scrape.yml")["scrape_configs"]
    auth = job["basic_auth"]
    secret, key = PurePosixPath(auth["password_file"]).relative_to(PROMETHEUS_SECRETS).parts
    assert users.check(auth["username"], keys[f"{secret}/{key}"].read_text().strip())


def test_kubernetes_service_monitor_logs_in_with_the_scrape_secret(tmp_path: Path) -> None:
    _, keys = kube_collector(tmp_path)
    pod = kube_objects()[("Deployment", "thermoscope-collector")]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    users = BasicAuthUsers.load(
        collector_argv(container["args"], secret_files(pod, container, keys)).metrics_basic_auth
    )
    monitor = load(KUBE / "operator" / "servicemonitor.yaml")
    (endpoint,) = monitor["spec"]["endpoints"]
    auth = endpoint["basicAuth"]
    user, password = (
        keys[f"{auth[part]['name']}/{auth[part]['key']}"].read_text() for part in ("username", "password")
    )
    assert users.check(user, password)  # the Operator passes the Secret's bytes as they are


def test_kubernetes_probes_need_no_credentials() -> None:
    """A kubelet probe cannot send basic auth: an httpGet of /metrics would read 401 and restart
    a healthy collector. The probes use the gRPC health service (open without a token) or TCP."""
    pod = kube_objects()[("Deployment", "thermoscope-collector")]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert "httpGet" not in container[probe], probe
        assert {"grpc", "tcpSocket"} & set(container[probe]), probe
