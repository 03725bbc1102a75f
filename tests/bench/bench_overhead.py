"""What the thermoscope agent costs a training loop: step time with and without a `Monitor`.

Run it as a script (pytest does not collect it):

    python tests/bench/bench_overhead.py                 # defaults: CPU, 5 rounds x 200 steps
    python tests/bench/bench_overhead.py --device cuda --out overhead.md

The reference model is an MLP of 4 x `nn.Linear(1024, 1024)` with `nn.ReLU` between them
(4.2 M parameters), trained with Adam on MSE against random targets, batch 64, drawn from a
fixed, seeded pool of batches. Each configuration trains its own copy of the model (same
initial weights):

* `no monitor`: the bare loop, the baseline;
* `every=1, collector`: a `Monitor` sampling every step, streaming to a live collector;
* `every=10, collector`: the same, sampling one step in ten (the default);
* `every=10, in-process`: `collector=None`, samples kept in-process (not derived: nothing
  calls `latest()`), i.e. the sampler's own cost without the sender thread;
* `every=10, dormant`: a monitor that looks for its collector and finds none (what `watch`
  and the zero-code hook are in a Ray job nobody attached to): it samples nothing, and its
  sender thread looks the collector up once per discovery interval.

The collector is a separate process (`thermoscope collector` on free loopback ports), as in
production: it does not share the training process's GIL, but on a small machine it shares
its cores.

A step is timed with `time.perf_counter` around forward, backward, `optimizer.step()`,
`zero_grad()` and `monitor.step(loss)` (on CUDA, with a `torch.cuda.synchronize()` before
the clock is read, for timing only). After a warm-up, the configurations run in interleaved
rounds, the order rotating from round to round, so that slow drifts of the machine (thermal,
other tenants) fall on all of them alike. Between two segments each monitor is flushed off
the clock, so that one configuration's backlog is not charged to the next; the time spent
waiting there is printed at the end (large only when the sender cannot keep up).

How to read the table (times per step, ratios against `no monitor`):

* `median`: a typical step. With every=10 it is an unsampled step, which runs with no hook
  at all; it may still read a little above the baseline: one step in ten is slow, which
  moves the median up the fast steps' distribution (to their 56th percentile), and each
  configuration trains its own copy of the model, whose memory placement alone moves step
  times by about a percent either way.
* `mean` includes the sampled steps, whose extra work lands in the tail (`p90` and above),
  so `mean x` is the throughput cost of monitoring: 1.02 means training runs 2 % slower.
  The mean is sensitive to anything else the machine runs; `mean x (rounds)`, the median
  over rounds of each round's mean ratio, is the sturdier reading on a shared machine.
* `sampled ms`: the median time of a sampled step (every step for every=1), so
  `sampled ms` - the baseline median is what one sample costs.
* `sample cost ms`: a sampled step's median minus an unsampled step's median *of the same
  configuration* (for every=1, minus the baseline's), and `amortized` = that cost / every /
  the baseline median: the throughput cost, read within one model copy, so it does not move
  with the copies' memory placement as the ratios do. This is the figure to hold against
  the 1 % target.
* `frames`: sampled steps the collector acknowledged; `dropped`: those that never reached
  it (queue overflow or a broken stream). Both are 0 without a collector; `dropped` should
  be 0 everywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers

if TYPE_CHECKING:
    from thermoscope.agent import Monitor


@dataclass(frozen=True)
class Shape:
    """The reference MLP: `depth` x Linear(width, width) with ReLU between, batches of `batch`."""

    width: int = 1024
    depth: int = 4
    batch: int = 64


POOL = 16  # distinct batches, cycled
LR = 1e-3
JOB = "bench"
READY_TIMEOUT = 30.0  # seconds for the collector process to start serving
DRAIN_TIMEOUT = 60.0  # seconds to wait for a monitor's backlog between segments


@dataclass(frozen=True)
class Config:
    name: str
    every: int | None  # None: no monitor
    streamed: bool = False  # to the collector process, else in-process
    dormant: bool = False  # looking for a collector that is not there


@dataclass
class Arm:
    """One configuration's model, optimizer, monitor and measurements."""

    config: Config
    model: nn.Module
    optimizer: torch.optim.Optimizer
    monitor: Monitor | None
    steps: int = 0  # steps trained so far, warm-up included
    times: list[float] = field(default_factory=list)  # seconds per timed step
    sampled: list[bool] = field(default_factory=list)  # whether each timed step was sampled
    rounds: list[slice] = field(default_factory=list)  # each round's timed steps in `times`
    drain: float = 0.0  # seconds spent flushing between segments, off the clock
    drained: bool = True  # every flush finished within DRAIN_TIMEOUT
    closed: bool = True  # `monitor.close()` reported nothing left unsent
    frames: int = 0
    dropped: int = 0


@dataclass(frozen=True)
class Row:
    name: str
    median_ms: float
    mean_ms: float
    p90_ms: float
    median_ratio: float
    mean_ratio: float
    round_mean_ratio: float
    sampled_ms: float | None
    sample_cost_ms: float | None  # a sampled step minus an unsampled step of the same arm
    amortized: float | None  # sample_cost / every / baseline median: the throughput cost
    frames: int
    dropped: int


# -- the collector process --------------------------------------------------------------------


def _log_tail(log: IO[bytes], limit: int = 4000) -> str:
    log.flush()
    log.seek(0)
    return log.read().decode(errors="replace")[-limit:]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Ctrl-C first (the CLI shuts down cleanly on it), then SIGTERM, then SIGKILL."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def collector_process() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A `thermoscope collector` process on free loopback ports: yields its gRPC target and itself."""
    # Imported here, as `Monitor` in `make_arm`: bench_families.py builds the reference model from
    # this module in processes whose peak memory must not include gRPC or the agent.
    from helpers.processes import start_collector_process

    with tempfile.TemporaryFile() as log, tempfile.TemporaryDirectory() as state:
        try:
            collector = start_collector_process(
                Path(state) / "events.db",
                global_options=("--log-level", "WARNING"),
                ready_timeout=READY_TIMEOUT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}:\n{_log_tail(log)}") from exc
        proc = collector.proc
        try:
            yield collector.grpc_target, proc
        finally:
            alive = proc.poll() is None
            _stop(proc)
            if not alive or proc.returncode != 0:
                print(
                    f"warning: collector process {'had exited' if not alive else 'ended'} "
                    f"with status {proc.returncode}:\n{_log_tail(log)}",
                    file=sys.stderr,
                )


# -- training -----------------------------------------------------------------------------------


def make_model(shape: Shape, seed: int, device: torch.device) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i in range(shape.depth):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Linear(shape.width, shape.width))
    return nn.Sequential(*layers).to(device)


def make_pool(shape: Shape, seed: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(shape.batch, shape.width, generator=gen).to(device),
            torch.randn(shape.batch, shape.width, generator=gen).to(device),
        )
        for _ in range(POOL)
    ]


def make_arm(config: Config, shape: Shape, target: str | None, seed: int, device: torch.device) -> Arm:
    from thermoscope.agent import Monitor

    model = make_model(shape, seed, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    monitor = None
    if config.every is not None:
        collector = target if config.streamed else (lambda: None) if config.dormant else None
        monitor = Monitor(model, optimizer, collector=collector, job=JOB, every=config.every)
    return Arm(config, model, optimizer, monitor)


def train(arm: Arm, pool: list[tuple[torch.Tensor, torch.Tensor]], steps: int, record: bool) -> None:
    """`steps` training steps; their wall times go to `arm.times` if `record`."""
    model, optimizer, monitor = arm.model, arm.optimizer, arm.monitor
    sync = next(model.parameters()).is_cuda
    loss_fn = nn.MSELoss()
    clock = time.perf_counter
    for _ in range(steps):
        x, y = pool[arm.steps % len(pool)]
        # The monitor samples steps 0, every, 2 every, ... (it arms itself on construction).
        sampled = (
            monitor is not None and monitor.enabled and not monitor.dormant and arm.steps % monitor.every == 0
        )
        t0 = clock()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if monitor is not None:
            monitor.step(loss)
        if sync:
            torch.cuda.synchronize()
        t1 = clock()
        arm.steps += 1
        if record:
            arm.times.append(t1 - t0)
            arm.sampled.append(sampled)


def drain(arm: Arm) -> None:
    """Wait, off the clock, until the collector has acknowledged everything sampled so far."""
    if arm.monitor is None:
        return
    t0 = time.perf_counter()
    arm.drained &= arm.monitor.flush(DRAIN_TIMEOUT)
    arm.drain += time.perf_counter() - t0


def close(arm: Arm) -> None:
    if arm.monitor is not None:
        arm.closed = arm.monitor.close()
        arm.frames = arm.monitor.delivered
        arm.dropped = arm.monitor.dropped


# -- report ---------------------------------------------------------------------------------------


def summarize(arms: list[Arm]) -> list[Row]:
    base_arm = arms[0]
    base = base_arm.times
    base_median, base_mean = statistics.median(base), statistics.fmean(base)
    rows = []
    for arm in arms:
        median, mean = statistics.median(arm.times), statistics.fmean(arm.times)
        p90 = statistics.quantiles(arm.times, n=10)[-1]
        by_round = [
            statistics.fmean(arm.times[own]) / statistics.fmean(base[ref])
            for own, ref in zip(arm.rounds, base_arm.rounds, strict=True)
        ]
        sampled = [t for t, s in zip(arm.times, arm.sampled, strict=True) if s]
        unsampled = [t for t, s in zip(arm.times, arm.sampled, strict=True) if not s]
        cost = None
        if sampled:
            reference = statistics.median(unsampled) if unsampled else base_median
            cost = statistics.median(sampled) - reference
        rows.append(
            Row(
                name=arm.config.name,
                median_ms=median * 1e3,
                mean_ms=mean * 1e3,
                p90_ms=p90 * 1e3,
                median_ratio=median / base_median,
                mean_ratio=mean / base_mean,
                round_mean_ratio=statistics.median(by_round),
                sampled_ms=statistics.median(sampled) * 1e3 if sampled else None,
                sample_cost_ms=None if cost is None else cost * 1e3,
                amortized=None if cost is None else cost / arm.config.every / base_median,  # type: ignore[operator]
                frames=arm.frames,
                dropped=arm.dropped,
            )
        )
    return rows


def table(rows: list[Row]) -> str:
    lines = [
        "| configuration | median ms | mean ms | p90 ms | median x | mean x | mean x (rounds) "
        "| sampled ms | sample cost ms | amortized | frames | dropped |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        sampled = "-" if r.sampled_ms is None else f"{r.sampled_ms:.2f}"
        cost = "-" if r.sample_cost_ms is None else f"{r.sample_cost_ms:.2f}"
        amortized = "-" if r.amortized is None else f"{r.amortized:+.1%}"
        lines.append(
            f"| {r.name} | {r.median_ms:.2f} | {r.mean_ms:.2f} | {r.p90_ms:.2f} | {r.median_ratio:.3f} "
            f"| {r.mean_ratio:.3f} | {r.round_mean_ratio:.3f} | {sampled} | {cost} | {amortized} "
            f"| {r.frames} | {r.dropped} |"
        )
    return "\n".join(lines)


def problems(arm: Arm) -> list[str]:
    found = [
        what
        for what, bad in (
            (f"{arm.dropped} frames dropped", arm.dropped > 0),
            (f"a flush between segments timed out ({DRAIN_TIMEOUT:.0f} s)", not arm.drained),
            ("close() left frames unsent", not arm.closed),
        )
        if bad
    ]
    return [f"{arm.config.name}: {what}" for what in found]


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(
    shape: Shape, device: torch.device, threads: int, steps: int, rounds: int, warmup: int
) -> str:
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    params = shape.depth * (shape.width + 1) * shape.width
    lines = [
        f"- torch {torch.__version__}, Python {platform.python_version()}, "
        f"{platform.system()} {platform.machine()}",
        f"- CPU: {_cpu_model()}; {os.cpu_count()} CPUs, {usable} usable; torch threads: {threads}",
    ]
    if device.type == "cuda":
        lines.append(f"- device: {torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})")
    else:
        lines.append("- device: cpu")
    lines.append(
        f"- model: {shape.depth} x Linear({shape.width}, {shape.width}) + ReLU, "
        f"{params / 1e6:.1f} M parameters, Adam, MSE, batch {shape.batch}"
    )
    lines.append(f"- timing: {rounds} rounds x {steps} steps per configuration, after {warmup} warm-up steps")
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    p.add_argument("--steps", type=int, default=200, help="timed steps per configuration per round (200)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (5)")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps per configuration first (20)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to train (cpu)")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (2)")
    p.add_argument("--no-local", action="store_true", help="skip the in-process (collector=None) run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=Shape.width, help=f"layer width ({Shape.width})")
    p.add_argument("--depth", type=int, default=Shape.depth, help=f"Linear layers ({Shape.depth})")
    p.add_argument("--batch", type=int, default=Shape.batch, help=f"batch size ({Shape.batch})")
    p.add_argument("--out", metavar="FILE", help="also write the machine info and table here (markdown)")
    args = p.parse_args(argv)
    if args.steps < 10 or args.rounds < 1 or args.warmup < 0 or args.threads < 1:
        p.error("need --steps >= 10, --rounds >= 1, --warmup >= 0, --threads >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    configs = [
        Config("no monitor", None),
        Config("every=1, collector", 1, streamed=True),
        Config("every=10, collector", 10, streamed=True),
    ]
    if not args.no_local:
        configs.append(Config("every=10, in-process", 10))
    configs.append(Config("every=10, dormant", 10, dormant=True))

    shape = Shape(args.width, args.depth, args.batch)
    pool = make_pool(shape, args.seed + 1, device)
    began = time.monotonic()
    with collector_process() as (target, proc):
        print(f"collector: pid {proc.pid}, gRPC {target}", file=sys.stderr)
        arms = [make_arm(c, shape, target, args.seed, device) for c in configs]
        try:
            for arm in arms:
                train(arm, pool, args.warmup, record=False)
                drain(arm)
                arm.drain = 0.0
            for r in range(args.rounds):
                for arm in arms[r % len(arms) :] + arms[: r % len(arms)]:  # the order rotates
                    start = len(arm.times)
                    train(arm, pool, args.steps, record=True)
                    arm.rounds.append(slice(start, len(arm.times)))
                    drain(arm)
                medians = ", ".join(
                    f"{a.config.name} {statistics.median(a.times[a.rounds[-1]]) * 1e3:.1f}" for a in arms
                )
                print(
                    f"round {r + 1}/{args.rounds} ({time.monotonic() - began:.0f} s): median ms: {medians}",
                    file=sys.stderr,
                )
        finally:
            for arm in arms:
                close(arm)
        collector_died = proc.poll() is not None

    info = machine_info(shape, device, args.threads, args.steps, args.rounds, args.warmup)
    text = f"{info}\n\n{table(summarize(arms))}\n"
    print(text)
    drains = ", ".join(f"{a.config.name} {a.drain:.2f} s" for a in arms if a.config.streamed)
    print(f"untimed drain between segments: {drains}", file=sys.stderr)
    found = [p for a in arms for p in problems(a)]
    if collector_died:
        found.append(f"the collector process exited during the run (status {proc.returncode})")
    for line in found:
        print(f"warning: {line}", file=sys.stderr)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text)
    print(f"done in {time.monotonic() - began:.0f} s", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
