"""`thermoscope attach`, `thermoscope detach` and `thermoscope collector --ray`: the collector
actor of a Ray cluster, driven from any machine that can join the cluster.

`attach` takes the security flags of `thermoscope collector` (`security.add_arguments`), and both
commands that may start the actor read those files here, on the machine the command runs on,
and ship their contents to it (`actor.PackedSecurity`): a file that cannot be read or used, or a
node address that would be exposed unprotected, is refused before anything starts (the CLI
exits 2). The flags apply when the actor starts; one already running keeps its own.

Ray is imported here only, so the other commands run where it is not installed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from thermoscope.collector.security import Security
from thermoscope.collector.settings import DEFAULTS

from . import extras
from . import security as security_cli


def _actor(what: str):
    """The collector actor's module, once Ray is known to be installed (`extras.need`)."""
    extras.need(what, "ray")
    from thermoscope.collector import actor

    return actor


def _connect(actor, address: str | None):
    try:
        actor.connect(address)
    except ConnectionError as exc:
        where = address or "$RAY_ADDRESS or a local cluster"
        raise SystemExit(f"thermoscope: no Ray cluster at {where}: {exc}") from None
    return actor


def join(what: str, address: str | None):
    """Join the Ray cluster at `address` (Ray installed: `extras.need`); the collector actor's module."""
    return _connect(_actor(what), address)


def _start(
    what: str, security: Security, address: str | None, **options: Any
) -> tuple[Any, dict[str, str], bool]:
    """Start or find the collector actor: (handle, targets, whether it was started here).
    `what`: the command, as the user typed it.

    The security files are read and checked before Ray is joined (AuthConfigError), the
    exposure of this node before the actor is created (InsecureError); the caller turns both
    into exit status 2. Flags given for an actor that is already running are reported as unused.
    """
    actor = _actor(what)
    packed = actor.PackedSecurity.pack(security)
    _connect(actor, address)
    import ray

    running = actor.find()
    if running is not None:
        if security != Security():
            print(
                "thermoscope: the collector actor is already running and keeps the security settings it "
                "was started with (`thermoscope detach --stop`, then start it again, to change them)",
                file=sys.stderr,
            )
        return running, ray.get(running.targets.remote(), timeout=DEFAULTS.actor_timeout), False
    try:
        handle, targets = actor.start(security=packed, **options)
    except ray.exceptions.RayActorError as exc:
        raise SystemExit(f"thermoscope: the collector actor could not start: {exc}") from None
    return handle, targets, True


def start(args: argparse.Namespace, settings: dict[str, Any]) -> int:
    """`collector --ray`: start (or find) the collector actor and print where it serves.

    `settings`: the `Collector` settings of the command line, `security` among them.
    """
    from thermoscope.wire.contract import split_address

    _, targets, _ = _start(
        "collector --ray",
        address=args.address,
        grpc_port=split_address(args.grpc)[1],
        metrics_port=split_address(args.metrics)[1],
        sd_file=args.sd_file,
        **settings,
    )
    print(json.dumps(targets, indent=2))
    return 0


def running_jobs() -> dict[str, str]:
    """The Ray jobs running on the cluster joined, but this command's own: id -> entrypoint.

    Read from Ray's job table, which core Ray has (`ray list jobs` needs `ray[default]`)."""
    import ray
    from ray._private import state

    own = ray.get_runtime_context().get_job_id()
    running = [j for j in state.jobs() if not j["IsDead"] and j["JobID"] != own]
    return {j["JobID"]: " ".join(j["Entrypoint"].split()) for j in running}  # a command line, on one line


def _check_job(what: str, job: str | None, seen: dict[str, Any]) -> None:
    """Exit with one line naming the jobs there are when `job` is neither a running Ray job nor one
    the collector sees (`seen`: its snapshot): a typo once said "attached" and waited for nothing."""
    if job is None:
        return
    running = running_jobs()
    if job in running or job in seen:
        return
    there = [f"{j} ({entrypoint})" if entrypoint else j for j, entrypoint in sorted(running.items())]
    there += sorted(set(seen) - set(running))
    print(
        f"thermoscope {what}: no job {job!r} on this Ray cluster; "
        + (f"the jobs there: {', '.join(there)}" if there else "no job is running there"),
        file=sys.stderr,
    )
    raise SystemExit(1)


def attach(args: argparse.Namespace, security: Security) -> int:
    """Start or find the collector actor, let the job (or every job) stream, and report who streams."""
    _actor("attach").PackedSecurity.pack(security)  # the security files, checked before Ray is joined
    actor = join("attach", args.address)
    import ray

    running = actor.find()
    _check_job("attach", args.job, {} if running is None else ray.get(running.snapshot.remote()))
    handle, targets, fresh = _start(
        "attach",
        security,
        args.address,
        grpc_port=args.grpc_port,
        metrics_port=args.metrics_port,
        sd_file=args.sd_file,
        active=args.job is None,  # a collector started for one job watches that job only
    )
    if fresh:
        print(f"started the collector actor: gRPC {targets['grpc']}, metrics {targets['metrics']}")

    if not _authorized(ray, handle.attach.remote(args.job, _token()), "attach"):
        return 1
    what = f"job {args.job}" if args.job else "every job"
    print(f"attached to {what}; dormant agents connect within two discovery intervals", flush=True)
    return _wait_for_ranks(ray, handle, args.job, args.wait)


def _authorized(ray, done: object, what: str) -> bool:
    """Wait for the actor's attach or detach; False, with one line, if it refused who asked (a
    collector with a tokens file takes a token covering the job)."""
    try:
        ray.get(done)
    except ray.exceptions.RayTaskError as exc:
        if not isinstance(exc.cause, PermissionError):
            raise
        print(f"thermoscope {what}: refused: {exc.cause}", file=sys.stderr)
        return False
    return True


def _token() -> str | None:
    """The token attach and detach show a collector with a tokens file: the agents' own
    ($THERMOSCOPE_TOKEN, or the first line of $THERMOSCOPE_TOKEN_FILE)."""
    from thermoscope.agent.security import resolve

    return resolve().token


def _wait_for_ranks(ray, handle, job: str | None, wait: float) -> int:
    """Show the streaming ranks until every rank of the job(s) streams, or `wait` s: one line
    updated in place on a terminal; elsewhere (a pipe, a log) a line when the ranks change, and
    the last one."""
    began, shown = time.monotonic(), None
    terminal = sys.stdout.isatty()
    while True:
        jobs = ray.get(handle.snapshot.remote())
        if job is not None:
            jobs = {j: v for j, v in jobs.items() if j == job}
        complete = bool(jobs) and all(_streaming(v) == _world_size(v) for v in jobs.values())
        ranks = ", ".join(
            f"job {j}: {_streaming(v)}/{_world_size(v)} ranks streaming" for j, v in jobs.items()
        )
        elapsed = time.monotonic() - began
        done = complete or elapsed >= wait
        line = f"{ranks or 'no agent connected yet'} ({elapsed:.1f} s after attaching)"
        if terminal:
            print(f"\r\x1b[K{line}", end="\n" if done else "", flush=True)
        elif ranks != shown or done:
            print(line, flush=True)
        shown = ranks
        if done:
            return 0 if complete or wait == 0 else 1
        time.sleep(min(0.25, wait / 10))


def _streaming(job: dict[str, Any]) -> int:
    return int(job["agents_connected"])


def _world_size(job: dict[str, Any]) -> int:
    return max((int(r.get("world_size", 1)) for r in job["ranks"].values()), default=1)


def detach(args: argparse.Namespace) -> int:
    """Pause the job (or every job): agents stop sampling, the training never notices."""
    actor = join("detach", args.address)
    if args.stop:
        print("stopped the collector actor" if actor.stop() else "no collector actor was running")
        return 0
    handle = actor.find()
    import ray

    _check_job("detach", args.job, {} if handle is None else ray.get(handle.snapshot.remote()))
    if handle is None:
        print("no collector actor is running: nothing is attached")
        return 0
    if not _authorized(ray, handle.detach.remote(args.job, _token()), "detach"):
        return 1
    print(f"detached from {'job ' + args.job if args.job else 'every job'}; its agents are idle")
    return 0


def add_arguments(sub: argparse._SubParsersAction, collector: argparse.ArgumentParser) -> None:
    """The Ray options of `collector`, and the `attach` and `detach` commands."""
    sd_default = DEFAULTS.sd_file
    collector.add_argument(
        "--ray",
        action="store_true",
        help="start it as the Ray cluster's detached collector actor, on the ports of --grpc and "
        "--metrics and the address of its node, and return; the security files are read here and "
        "their contents shipped to the actor",
    )
    address_help = "Ray cluster address (default: $RAY_ADDRESS, else the local cluster)"
    collector.add_argument("--address", help=address_help + "; with --ray")
    collector.add_argument(
        "--sd-file",
        default=str(sd_default),
        help=f"Prometheus file-SD JSON, with --ray (default {sd_default})",
    )
    a = sub.add_parser("attach", help="monitor a running Ray job: start or find the collector actor")
    a.add_argument("--address", help=address_help)
    a.add_argument("--job", help="Ray job id to monitor (default: every job)")
    a.add_argument(
        "--wait", type=float, default=0.0, help="seconds to wait until every rank streams, printing progress"
    )
    a.add_argument("--sd-file", default=str(sd_default), help="Prometheus file-SD JSON if a collector starts")
    a.add_argument(
        "--grpc-port", type=int, default=DEFAULTS.grpc_port, help="if a collector starts (0: any free port)"
    )
    a.add_argument(
        "--metrics-port",
        type=int,
        default=DEFAULTS.metrics_port,
        help="if a collector starts (0: any free port)",
    )
    security_cli.add_arguments(a)  # if a collector starts: read here, shipped to the actor
    d = sub.add_parser("detach", help="stop monitoring a Ray job (the job keeps running, untouched)")
    d.add_argument("--address", help=address_help)
    d.add_argument("--job", help="Ray job id (default: every job)")
    d.add_argument("--stop", action="store_true", help="also stop the collector actor")
