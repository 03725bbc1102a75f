"""`thermoscope demo`: the whole path on one machine, with nothing to set up.

A collector starts in-process on free loopback ports; a small MLP student learns a fixed
random teacher (data made here, seeded) with a real `Monitor` streaming over real gRPC. Half
way through, the data shift to another teacher, so the run goes type_i -> transition -> type_ii,
then refresh -> transition -> type_ii again. The readings and the transitions shown at the end
are the ones the collector derived, stored and serves at `/metrics`.
"""

from __future__ import annotations

import contextlib
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table
from torch import nn

from thermoscope.agent import Monitor, Reading

from .service import Collector
from .store import Event

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
    steps: int = 1200,
    every: int = 5,
    seed: int = 0,
    serve: bool = False,
    figure: str | None = None,
    shift_at: int | None = None,
    db: str | None = None,
    console: Console | None = None,
) -> DemoResult:
    """Train, stream, show; the data shift at `shift_at` (default: half way; 0: never).

    With `figure`, also draw the run's readings (see `plot.phase_figure`); events go to `db`,
    or to a temporary database that goes away with the demo.
    """
    console = console or Console()
    shift_at = steps // 2 if shift_at is None else shift_at
    with contextlib.ExitStack() as stack:
        db = db or str(Path(stack.enter_context(tempfile.TemporaryDirectory())) / "events.db")
        collector = stack.enter_context(Collector("127.0.0.1:0", "127.0.0.1:0", db=db).running())
        console.print(
            f"collector: gRPC [bold]{collector.grpc_target}[/], metrics [bold]{collector.metrics_url}[/]"
        )
        monitor, history = _train(collector, steps, every, seed, shift_at, console)
        reading = _wait_for(collector, (steps - 1) // every * every)
        job = collector.jobs[JOB]
        result = DemoResult(
            reading=reading,
            sites={s.name: s.kind for s in monitor.sites},
            metrics_url=collector.metrics_url,
            frames=job.frames_received,
            dropped=monitor.dropped,
            events=[e for e in collector.store.query(job=JOB) if e.scope == "job"],
            layer_phases=dict(zip(reading.layer_names, job.detector.layer_phases(), strict=True)),
        )
        show(result, console)
        if figure:
            from .plot import phase_figure

            if history[-1] is not reading:
                history.append(reading)
            path = phase_figure(history, figure, title=f"thermoscope demo: {steps} steps, every {every}")
            console.print(f"figure written to {path}")
        if serve:
            console.print(f"serving {collector.metrics_url} until Ctrl-C")
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)
    return result


def _train(
    collector: Collector, steps: int, every: int, seed: int, shift_at: int, console: Console
) -> tuple[Monitor, list[Reading]]:
    """The training run, with a progress bar; returns its monitor and the readings seen."""
    torch.manual_seed(seed)
    x, y = teacher_student(seed)
    model = student(x.shape[1])
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed + 1)
    monitor = Monitor(model, optimizer, collector=collector.grpc_target, job=JOB, every=every)
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    history: list[Reading] = []  # the collector's readings as they appeared, for the figure
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("training", total=steps)
        for step in range(steps):
            if step == shift_at:
                x, y = teacher_student(seed + 1000)
                progress.console.print(f"step {step}: the data shift to another teacher")
            idx = torch.randint(0, x.shape[0], (64,), generator=gen)
            loss = nn.functional.mse_loss(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            monitor.step(loss)
            if step % 20 == 0:
                progress.update(task, description=f"training  loss {loss.item():.4f}")
            progress.advance(task)
            job = collector.jobs.get(JOB)
            if (
                job is not None
                and job.reading is not None
                and (not history or history[-1] is not job.reading)
            ):
                history.append(job.reading)
    monitor.close()
    return monitor, history


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
    for col in ("energy (loss)", "entropy (nats)", "temperature (loss/nat)", "efficiency", "engine"):
        job.add_column(col, justify="right")
    job.add_row(
        _fmt(r.energy),
        _fmt(r.entropy, ".6g"),
        _fmt(r.temperature),
        _fmt(r.efficiency, ".3f"),
        r.engine or "?",
    )
    layers = Table(title="layers")
    layers.add_column("layer")
    for col in ("entropy (nats)", "temperature (loss/nat)", "work (loss)", "negentropy (nats/value)"):
        layers.add_column(col, justify="right")
    rows = zip(
        r.layer_names, r.layer_entropy, r.layer_temperature, r.layer_work, r.layer_negentropy, strict=True
    )
    for name, s, t, w, j in rows:
        layers.add_row(name, _fmt(s, ".6g"), _fmt(t), _fmt(w, ".3e"), _fmt(j, ".3f"))
    sites = Table(title="activation sites")
    sites.add_column("site")
    sites.add_column("activation")
    sites.add_column("efficiency", justify="right")
    sites.add_column("engine")
    for name, eta, engine in zip(r.site_names, r.site_efficiency, r.site_engine, strict=True):
        sites.add_row(name, result.sites.get(name, "?"), _fmt(eta, ".3f"), _engine(engine))
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
