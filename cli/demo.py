"""`thermoscope demo`: the whole path on one machine, with nothing to set up.

A collector starts in-process on free loopback ports; a small MLP student learns a fixed
random teacher (data made here, seeded) with a real `Monitor` streaming over real gRPC. Half
way through, the data shift to another teacher, so the run goes type_i -> transition -> type_ii,
then refresh -> transition -> type_ii again. The readings and the transitions shown at the end
are the ones the collector derived, stored and serves at `/metrics`.

With `workers=N` the same training runs as an N-worker Ray Train job (DDP over gloo) on a
local Ray cluster bound to loopback: each rank draws its own batches and streams through
`watch`, which finds the collector from `$THERMOSCOPE_COLLECTOR` in the job's runtime_env;
the collector merges the ranks into the one job shown at the end.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from torch import nn

from thermoscope.agent import Monitor
from thermoscope.collector.service import Collector
from thermoscope.collector.state.store import Event
from thermoscope.science.derive import Reading

JOB = "demo"


@dataclass(frozen=True)
class DemoResult:
    reading: Reading
    sites: dict[str, str]  # site name -> activation kind
    metrics_url: str
    frames: int
    dropped: int
    events: list[Event]  # the job's phase transitions, in order
    layer_phases: dict[str, str]  # each layer's phase at the end


def teacher_student(seed: int, n: int = 4096, dim: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs x ~ N(0, I) and targets from a fixed random tanh teacher plus a little noise."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen)
    w1 = torch.randn(dim, 64, generator=gen) / math.sqrt(dim)
    w2 = torch.randn(64, 1, generator=gen) / 8.0
    y = torch.tanh(x @ w1) @ w2 + 0.05 * torch.randn(n, 1, generator=gen)
    return x, y


def student(dim: int = 32, hidden: int = 128) -> nn.Module:
    return nn.Sequential(
        nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.Tanh(), nn.Linear(hidden, 1)
    )


def run(
    *,
    every: int,
    steps: int = 1200,
    seed: int = 0,
    serve: bool = False,
    figure: str | None = None,
    shift_at: int | None = None,
    db: str | None = None,
    console: Console | None = None,
    workers: int = 0,
) -> DemoResult:
    """Train, stream, show; the data shift at `shift_at` (default: half way; 0: never). `every`:
    the agent's sampling interval (its default is the `demo` verb's: `thermoscope.cli.main`).

    With `figure`, also draw the run's readings (see `plot.phase_figure`); events go to `db`,
    or to a temporary database that goes away with the demo. `workers` > 0 trains as a Ray
    Train job of that many workers (see the module docstring).
    """
    console = console or Console()
    shift_at = steps // 2 if shift_at is None else shift_at
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="thermoscope-")))
        db = db or str(tmp / "events.db")
        if workers:  # first: Ray forks its processes, which must not inherit gRPC's threads
            stack.enter_context(_local_ray(workers, tmp))
        history: list[Reading] = []  # every reading the collector merged, for the figure
        collector = Collector(
            "127.0.0.1:0",
            "127.0.0.1:0",
            db=db,
            history_interval=0,  # all of it
            on_reading=lambda job, reading: history.append(reading) if job == JOB else None,
        )
        stack.enter_context(collector.running())
        console.print(
            f"collector: gRPC [bold]{collector.grpc_target}[/], metrics [bold]{collector.metrics_url}[/], "
            f"page [bold]{collector.page_url}[/]"
        )
        config = {"steps": steps, "every": every, "seed": seed, "shift_at": shift_at}
        if workers:
            dropped = _train_on_ray(collector, workers, config, tmp, console)
        else:
            dropped = _train(collector, config, console)
        reading = _wait_for(collector, (steps - 1) // every * every)
        collector.checkpoint()  # the events so far, into the database
        job = collector.jobs[JOB]
        result = DemoResult(
            reading=reading,
            sites={s.name: s.kind for s in job.sites.values()},
            metrics_url=collector.metrics_url,
            frames=job.frames_received,
            dropped=dropped,
            events=[e for e in collector.store.query(job=JOB) if e.scope == "job"],
            layer_phases=dict(zip(reading.layer_names, job.phases().layers, strict=True)),
        )
        show(result, console)
        if figure:
            from .plot import phase_figure

            path = phase_figure(history, figure, title=f"thermoscope demo: {steps} steps, every {every}")
            console.print(f"figure written to {path}")
        if serve:
            console.print(f"serving {collector.page_url} and {collector.metrics_url} until Ctrl-C")
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)
    return result


def _training(
    config: dict,
    make_monitor: Callable[[nn.Module, torch.optim.Optimizer], Monitor],
    *,
    rank: int = 0,
    distributed: bool = False,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
) -> Monitor:
    """The training loop of every rank: the student learns the teacher, which shifts once.

    Ranks share the data and the initial weights (the seed), and draw their own batches.
    """
    seed, shift_at = config["seed"], config["shift_at"]
    torch.manual_seed(seed)
    x, y = teacher_student(seed)
    model = student(x.shape[1])
    if distributed:
        from ray.train.torch import prepare_model

        model = prepare_model(model)  # DDP over the worker group
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed + 1 + rank)
    monitor = make_monitor(model, optimizer)
    for step in range(config["steps"]):
        if step == shift_at:
            x, y = teacher_student(seed + 1000)
        idx = torch.randint(0, x.shape[0], (64,), generator=gen)
        loss = nn.functional.mse_loss(model(x[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        monitor.step(loss)
        if on_step is not None:
            on_step(step, loss)
    monitor.close()
    return monitor


def _progress(console: Console) -> Progress:
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    return Progress(*columns, console=console)


def _train(collector: Collector, config: dict, console: Console) -> int:
    """The training run in this process, with a progress bar; returns its drops."""
    with _progress(console) as progress:
        task = progress.add_task("training", total=config["steps"])

        def on_step(step: int, loss: torch.Tensor) -> None:
            if step == config["shift_at"]:
                progress.console.print(f"step {step}: the data shift to another teacher")
            if step % 20 == 0:
                progress.update(task, description=f"training  loss {loss.item():.4f}")
            progress.advance(task)

        def make_monitor(model: nn.Module, optimizer: torch.optim.Optimizer) -> Monitor:
            return Monitor(model, optimizer, collector=collector.grpc_target, job=JOB, every=config["every"])

        monitor = _training(config, make_monitor, on_step=on_step)
    return monitor.dropped


def _ray_worker(config: dict) -> None:
    """One Ray Train worker: `watch` names the rank from Ray; the collector is the driver's."""
    import ray.train

    from thermoscope.agent import watch

    def make_monitor(model: nn.Module, optimizer: torch.optim.Optimizer) -> Monitor:
        return watch(model, optimizer, collector=config["collector"], job=JOB, every=config["every"])

    _training(config, make_monitor, rank=ray.train.get_context().get_world_rank(), distributed=True)


@contextlib.contextmanager
def _local_ray(workers: int, tmp: Path) -> Iterator[None]:
    """A Ray cluster of this machine only: loopback, its state in `tmp`, no token in ~/.ray."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # nothing but loopback can reach it
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read at import: node on 127.0.0.1
    import ray

    ray.init(
        address="local",
        num_cpus=workers,
        _node_ip_address="127.0.0.1",
        _temp_dir=str(tmp / "ray"),
        include_dashboard=False,
        logging_level="WARNING",
        log_to_driver=False,
    )
    try:
        yield
    finally:
        ray.shutdown()


def _train_on_ray(collector: Collector, workers: int, config: dict, tmp: Path, console: Console) -> int:
    """The training run as a Ray Train job; progress is the step the collector merged last."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={**config, "collector": collector.grpc_target},
        scaling_config=ScalingConfig(num_workers=workers),
        run_config=RunConfig(storage_path=str(tmp / "train")),
    )
    with _progress(console) as progress, ThreadPoolExecutor(1) as pool:
        task = progress.add_task(f"starting {workers} Ray Train workers", total=config["steps"])
        fit = pool.submit(trainer.fit)
        while not fit.done():
            job = collector.jobs.get(JOB)
            if job is not None and job.merged_step >= 0:
                done = job.merged_step + 1
                progress.update(task, completed=done, description=f"training on {workers} workers")
            time.sleep(0.2)
        fit.result()
        progress.update(task, completed=config["steps"])
    # every rank samples the same steps: what the collector lacks was dropped
    sampled = workers * len(range(0, config["steps"], config["every"]))
    return sampled - collector.jobs[JOB].frames_received


def _wait_for(collector: Collector, step: int, timeout: float = 10.0) -> Reading:
    deadline = time.monotonic() + timeout
    while True:
        job = collector.jobs.get(JOB)
        reading = job.reading if job is not None else None
        if reading is not None and reading.step >= step:
            return reading
        if time.monotonic() > deadline:
            raise RuntimeError(f"the collector did not merge step {step} within {timeout} s")
        time.sleep(0.02)


def _fmt(value: float, spec: str = ".4g") -> str:
    return "undefined" if math.isnan(value) else format(value, spec)


def _temperature(value: float, stderr: float) -> str:
    """T +- its standard error, or "undefined" (not significant over the window)."""
    return "undefined" if math.isnan(value) else f"{value:.4g} ± {stderr:.2g}"


def _count(phases) -> str:
    counts: dict[str, int] = {}
    for phase in phases:
        counts[phase] = counts.get(phase, 0) + 1
    return ", ".join(f"{n} {phase}" for phase, n in counts.items())


def _engine(engine: str) -> str:
    return {"A": "A (scale-invariant)", "B": "B (temperature-dependent)"}.get(engine, "not probed")


def show(result: DemoResult, console: Console) -> None:
    r = result.reading
    job = Table(title=f"job {JOB!r} at step {r.step}")
    # the loss, or where no loss was seen (docs/science.md section 2) the cumulative work
    energy = "energy: cumulative work (loss)" if r.energy_from_work else "energy (loss)"
    for col in (
        energy,
        "entropy (nats)",
        "temperature ± s.e. (loss/nat)",
        "median site efficiency",
        "engine",
    ):
        job.add_column(col, justify="right")
    job.add_row(
        _fmt(r.energy),
        _fmt(r.entropy, ".6g"),
        _temperature(r.temperature, r.temperature_stderr),
        _fmt(r.efficiency, ".3f"),
        r.engine or "?",
    )
    # where a layer's T is undefined, what is measurable says why: its entropy change over the
    # window and its share of the window's work (a layer doing little work has no measurable T)
    layers = Table(title="layers (temperature undefined: see the entropy change and the work share)")
    layers.add_column("layer")
    columns = (
        "entropy (nats)",
        "temperature ± s.e. (loss/nat)",
        "ΔS over the window (nats)",
        "share of the work",
        "work (loss)",
        "negentropy (nats/value)",
    )
    for col in columns:
        layers.add_column(col, justify="right")
    rows = zip(
        r.layer_names,
        r.layer_entropy,
        r.layer_temperature,
        r.layer_temperature_stderr,
        r.layer_entropy_change,
        r.layer_work_share,
        r.layer_work,
        r.layer_negentropy,
        strict=True,
    )
    for name, s, t, t_err, ds, share, w, j in rows:
        layers.add_row(
            name,
            _fmt(s, ".6g"),
            _temperature(t, t_err),
            _fmt(ds, ".3g"),
            _fmt(share, ".1%"),
            _fmt(w, ".3e"),
            _fmt(j, ".3f"),
        )
    sites = Table(title="activation sites")
    sites.add_column("site")
    sites.add_column("activation")
    sites.add_column("efficiency", justify="right")
    sites.add_column("engine")
    sites.add_column("input RMS", justify="right")  # at the probe that read the engine type
    rows = zip(
        r.site_names, r.site_function, r.site_efficiency, r.site_engine, r.site_input_scale, strict=True
    )
    for name, function, eta, engine, scale in rows:
        activation = function or result.sites.get(name, "?")
        sites.add_row(name, activation, _fmt(eta, ".3f"), _engine(engine), _fmt(scale, ".3g"))
    phases = Table(title="phase transitions of the job")
    for col in ("step", "from", "to", "statistic", "confidence"):
        phases.add_column(col, justify="right" if col in ("step", "confidence") else "left")
    for e in result.events:
        phases.add_row(str(e.step), e.from_, e.to, e.statistic, f"{e.confidence:.2f}")
    console.print(job, layers, sites, phases)
    path = " -> ".join(["type_i", *(e.to for e in result.events)])
    console.print(f"job phases: {path}; layers now: {_count(result.layer_phases.values())}")
    console.print(
        f"{result.frames} frames merged, {result.dropped} dropped; metrics were at {result.metrics_url}"
    )
