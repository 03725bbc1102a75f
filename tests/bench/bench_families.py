"""The agent's overhead on each model family, beside wandb.watch and TensorBoard, on one model.

Run it as a script (pytest does not collect it); wandb and tensorboard come with the `bench`
extra (`pip install -c constraints.txt -e '.[bench]'`), and an arm whose package is missing is
skipped with a message:

    python tests/bench/bench_families.py                        # every workload, CPU, 2 threads
    python tests/bench/bench_families.py --workload gpt2 --rounds 1 --steps 40
    python tests/bench/bench_families.py --device cuda --out families.md

Workloads (issue 15's table, plus Llama), random weights from configs, no download:

* `mlp`: the reference model of bench_overhead.py, 4 x Linear(1024) + ReLU, Adam, MSE, batch 64;
* `resnet`: ResNet-18 (transformers' ResNetConfig: basic blocks 2-2-2-2, widths 64 to 512),
  SGD with momentum 0.9, 32x32 images, batch 32, 10 classes;
* `gpt2`: GPT-2, 4 layers 256 wide, 4 heads, a vocabulary of 8192, AdamW, batch 8 x 64 tokens;
* `llama`: Llama, 4 layers 256 wide (MLP 688), 4 heads, a vocabulary of 8192, AdamW, batch
  8 x 64 tokens.

`--workload all` runs each in a process of its own, one after the other. Within one process
every arm trains the SAME model and optimizer (two copies of a model differ by up to 7 % in step
time by memory placement alone), in blocks of `--block` steps: in each cycle every arm trains
one block, the order rotating from cycle to cycle, `--steps` steps per arm per round, `--rounds`
rounds, after `--warmup` untimed steps per arm. The arms, every one sampling 1 step in 10:

* `no monitor`: the bare loop, the baseline;
* `thermoscope -> collector`: `Monitor(every=10)` streaming to a `thermoscope collector` process
  on loopback (flushed after each of its blocks, off the clock);
* `thermoscope in-process`: `Monitor(collector=None, every=10)`;
* `wandb.watch`: `wandb.watch(model, log="all", log_freq=10)` in offline mode, watched before
  each of its blocks and unwatched after it; the row its hooks fill is committed in the step
  that filled it (`run.log({})`), as in a loop that logs every step;
* `TensorBoard`: `SummaryWriter.add_histogram` of every parameter and every gradient, every
  10th step, after `optimizer.step()`.

Each arm's sampled steps are known, not guessed: wandb counts its hooks' calls from `watch`, so
it samples the 10th and 20th step of a block (TensorBoard the same ones); our monitors are built
once with `step=5` and count only their own blocks' steps, so they sample the 6th and 16th,
and a block never ends with their hooks armed or with the next step's work hook pending (the
other arms' blocks run with none of their hooks).

How to read a table (one per workload; times per step, ratios against `no monitor`):

* `median x`, `mean x`: the arm's median and mean step against the baseline's. `mean x` is
  the throughput cost: 1.02 means training runs 2 % slower.
* `sampled ms`: a sampled step's median minus the median of the arm's plain steps (neither
  sampled nor the one after), i.e. one typical sample's cost. `next ms`: the same for the step
  after a sample (where our agent reads the next gradient against the sampled update, the
  per-layer work w+; about 0 for the others).
* `amortized`: (the mean of the arm's steps - the mean of its plain steps) / the baseline's
  mean: what sampling adds to throughput, read within the arm's own blocks, with the heavier
  one-in-ten shape samples included. The figure to hold against the 1 % target.
* `host peak +`, `device peak +`: what the arm adds to the training process's peak memory, from
  fresh processes, `--memory-repeats` per arm, the arms taking turns, the median of each arm's
  (`--memory-steps` steps each, the first sample and the first shape sample among them; one
  process's peak moves by up to ~20 MiB from run to run): the peak resident set (VmHWM: the
  arm's imports, threads, buffers and what it holds) and, on CUDA,
  `torch.cuda.max_memory_allocated`, each minus the `no monitor` process's and as a share of it.
  wandb's service and our collector run as processes of their own and are not counted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from bench_overhead import DRAIN_TIMEOUT, LR, POOL, Shape, collector_process, make_model
from torch import nn

WORKLOADS = ("mlp", "resnet", "gpt2", "llama")
ARMS = ("base", "collector", "local", "wandb", "tensorboard")
EVERY = 10
PHASE = EVERY // 2  # our monitors' first step: their samples fall mid-block (see the docstring)
VOCAB = 8192
INSTALL = "pip install -c constraints.txt -e '.[bench]'"  # transformers, wandb and tensorboard
SEQ = 64


class Skipped(Exception):
    """An arm that cannot run here (its package is missing): the table says why."""


# -- workloads ------------------------------------------------------------------------------------


@dataclass
class Workload:
    """One model, its optimizer and a pool of seeded batches; `loss(batch)` runs the forward pass."""

    name: str
    summary: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    batches: list[dict[str, torch.Tensor]]
    loss: Callable[[dict[str, torch.Tensor]], torch.Tensor]
    steps: int = 0  # steps trained so far, by every arm

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def _pool(make: Callable[[torch.Generator], dict[str, torch.Tensor]], seed: int, device: torch.device):
    gen = torch.Generator().manual_seed(seed)
    return [{k: v.to(device) for k, v in make(gen).items()} for _ in range(POOL)]


def _tokens(gen: torch.Generator) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (8, SEQ), generator=gen)
    return {"input_ids": ids, "labels": ids}


def _images(gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {
        "pixel_values": torch.randn(32, 3, 32, 32, generator=gen),
        "labels": torch.randint(0, 10, (32,), generator=gen),
    }


def build(name: str, device: torch.device, seed: int) -> Workload:
    """The `name` workload (one of WORKLOADS), seeded, in training mode."""
    if name == "mlp":
        shape = Shape()
        model = make_model(shape, seed, device)
        mse = nn.MSELoss()

        def mlp_batch(gen: torch.Generator) -> dict[str, torch.Tensor]:
            x = torch.randn(shape.batch, shape.width, generator=gen)
            return {"x": x, "y": torch.randn(shape.batch, shape.width, generator=gen)}

        return Workload(
            name,
            f"{shape.depth} x Linear({shape.width}) + ReLU, Adam, MSE, batch {shape.batch}",
            model,
            torch.optim.Adam(model.parameters(), lr=LR),
            _pool(mlp_batch, seed + 1, device),
            lambda b: mse(model(b["x"]), b["y"]),
        )
    import transformers  # only the transformers workloads need it

    torch.manual_seed(seed)
    if name == "resnet":
        config = transformers.ResNetConfig(
            num_channels=3, embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
            layer_type="basic", num_labels=10,
        )  # fmt: skip
        model = transformers.ResNetForImageClassification(config).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        summary, make = "ResNet-18, SGD momentum 0.9, cross-entropy, 32x32, batch 32", _images
    elif name == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=256, n_layer=4, n_head=4)
        model = transformers.GPT2LMHeadModel(config).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
        summary, make = f"GPT-2, 4 layers x 256, vocabulary {VOCAB}, AdamW, batch 8 x {SEQ} tokens", _tokens
    elif name == "llama":
        config = transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ,
        )  # fmt: skip
        model = transformers.LlamaForCausalLM(config).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
        summary, make = f"Llama, 4 layers x 256, vocabulary {VOCAB}, AdamW, batch 8 x {SEQ} tokens", _tokens
    else:
        raise ValueError(f"unknown workload {name!r}: one of {', '.join(WORKLOADS)}")
    model.train()
    return Workload(name, summary, model, optimizer, _pool(make, seed + 1, device), lambda b: model(**b).loss)


# -- arms -----------------------------------------------------------------------------------------


class Arm:
    """What one arm does around the loop: nothing, for the baseline."""

    name = "no monitor"

    def sampled(self, j: int) -> bool:
        """Whether the arm samples step `j` of a block (blocks are multiples of EVERY)."""
        return False

    def attach(self) -> None:
        """Before each of the arm's blocks, off the clock."""

    def after_update(self, loss: torch.Tensor, j: int) -> None:
        """On the clock, after `optimizer.step()` and before `zero_grad()` of block step `j`."""

    def detach(self) -> None:
        """After each of the arm's blocks, off the clock."""

    def close(self) -> list[str]:
        """At the end: what went wrong, if anything."""
        return []


class Thermoscope(Arm):
    """A `Monitor` built once, streaming to `collector` or (None) keeping its samples in-process."""

    def __init__(self, work: Workload, collector: str | None) -> None:
        from thermoscope.agent import Monitor  # not in the other arms' memory processes

        self.name = "thermoscope -> collector" if collector else "thermoscope in-process"
        self.monitor = Monitor(
            work.model, work.optimizer, collector=collector, job=f"bench-{work.name}", every=EVERY, step=PHASE
        )
        self.streamed = collector is not None
        self.drained = True

    def sampled(self, j: int) -> bool:
        return (PHASE + j) % EVERY == 0

    def after_update(self, loss: torch.Tensor, j: int) -> None:
        self.monitor.step(loss)

    def detach(self) -> None:
        if self.streamed:  # this block's samples are not charged to the next arm's block
            self.drained &= self.monitor.flush(DRAIN_TIMEOUT)

    def close(self) -> list[str]:
        closed = self.monitor.close()
        found = [f"{self.monitor.dropped} frames dropped"] if self.monitor.dropped else []
        if not self.drained:
            found.append(f"a flush between blocks timed out ({DRAIN_TIMEOUT:.0f} s)")
        if not closed:
            found.append("close() left frames unsent")
        return found


class Wandb(Arm):
    """`wandb.watch(log="all", log_freq=EVERY)`, offline, watched for each block."""

    name = f"wandb.watch(log=all, log_freq={EVERY})"

    def __init__(self, work: Workload, folder: str) -> None:
        os.environ["WANDB_MODE"] = "offline"
        os.environ.setdefault("WANDB_SILENT", "true")
        try:
            import wandb
        except ImportError as exc:
            raise Skipped(f"wandb is not installed ({exc}); {INSTALL}") from exc
        self.model = work.model
        self.run = wandb.init(project="thermoscope-bench", dir=folder, mode="offline")

    def sampled(self, j: int) -> bool:
        return (j + 1) % EVERY == 0  # its hooks count calls from `watch`, log at the EVERY-th

    def attach(self) -> None:
        self.run.watch(self.model, log="all", log_freq=EVERY, idx=0)  # idx: the same names each time

    def after_update(self, loss: torch.Tensor, j: int) -> None:
        if self.sampled(j):
            self.run.log({})  # commits the row the hooks filled, as a loop that logs each step does

    def detach(self) -> None:
        self.run.unwatch(self.model)

    def close(self) -> list[str]:
        self.run.finish()
        return []


class TensorBoard(Arm):
    """`SummaryWriter.add_histogram` of every parameter and gradient every EVERY-th step."""

    name = f"TensorBoard histograms every {EVERY}"

    def __init__(self, work: Workload, folder: str) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise Skipped(f"tensorboard is not installed ({exc}); {INSTALL}") from exc
        self.writer = SummaryWriter(log_dir=folder)
        self.named = list(work.model.named_parameters())
        self.samples = 0

    def sampled(self, j: int) -> bool:
        return (j + 1) % EVERY == 0  # the steps wandb samples

    def after_update(self, loss: torch.Tensor, j: int) -> None:
        if not self.sampled(j):
            return
        for name, p in self.named:
            self.writer.add_histogram(f"parameters/{name}", p, self.samples)
            if p.grad is not None:
                self.writer.add_histogram(f"gradients/{name}", p.grad, self.samples)
        self.samples += 1

    def detach(self) -> None:
        self.writer.flush()

    def close(self) -> list[str]:
        self.writer.close()
        return []


def make_arm(key: str, work: Workload, collector: str | None, folder: str) -> Arm:
    """The arm named `key` (one of ARMS); raises Skipped where its package is missing."""
    if key == "base":
        return Arm()
    if key in ("collector", "local"):
        return Thermoscope(work, collector if key == "collector" else None)
    return (Wandb if key == "wandb" else TensorBoard)(work, tempfile.mkdtemp(prefix=f"{key}-", dir=folder))


# -- timing ---------------------------------------------------------------------------------------


@dataclass
class Timings:
    """One arm's timed steps: seconds, and whether each was sampled, the one after, or plain."""

    seconds: list[float] = field(default_factory=list)
    kind: list[str] = field(default_factory=list)

    def of(self, kind: str) -> list[float]:
        return [t for t, k in zip(self.seconds, self.kind, strict=True) if k == kind]


def kind(arm: Arm, j: int) -> str:
    if arm.sampled(j):
        return "sampled"
    return "next" if j and arm.sampled(j - 1) else "plain"


def train_block(work: Workload, arm: Arm, steps: int, record: Timings | None) -> None:
    """`steps` training steps with `arm` attached; their wall times go to `record`."""
    model_on_cuda = next(work.model.parameters()).is_cuda
    optimizer, clock = work.optimizer, time.perf_counter
    arm.attach()
    for j in range(steps):
        batch = work.batches[work.steps % len(work.batches)]
        t0 = clock()
        loss = work.loss(batch)
        loss.backward()
        optimizer.step()
        arm.after_update(loss, j)
        optimizer.zero_grad()
        if model_on_cuda:
            torch.cuda.synchronize()  # for timing only
        t1 = clock()
        work.steps += 1
        if record is not None:
            record.seconds.append(t1 - t0)
            record.kind.append(kind(arm, j))
    arm.detach()


def interleave(work: Workload, arms: list[Arm], args: argparse.Namespace) -> list[Timings]:
    """Warm every arm up, then the timed rounds: blocks, the arms' order rotating by cycle."""
    for arm in arms:
        for _ in range(args.warmup // args.block):
            train_block(work, arm, args.block, None)
    timings = [Timings() for _ in arms]
    began, cycle = time.monotonic(), 0
    for r in range(args.rounds):
        for _ in range(args.steps // args.block):
            first = cycle % len(arms)
            for i in [*range(first, len(arms)), *range(first)]:
                train_block(work, arms[i], args.block, timings[i])
            cycle += 1
        medians = ", ".join(
            f"{a.name} {statistics.median(t.seconds) * 1e3:.1f}" for a, t in zip(arms, timings, strict=True)
        )
        elapsed = time.monotonic() - began
        progress = f"{work.name} round {r + 1}/{args.rounds} ({elapsed:.0f} s)"
        print(f"{progress}: median ms: {medians}", file=sys.stderr)
    return timings


# -- memory ---------------------------------------------------------------------------------------


def peak_rss() -> int:
    """This process's peak resident set, in bytes: Linux's VmHWM, which starts afresh at exec
    (`ru_maxrss` keeps the parent's peak at fork: every child would read the benchmark's own)."""
    with contextlib.suppress(OSError), open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def peak_memory(work: Workload, key: str, collector: str | None, steps: int, block: int) -> dict[str, int]:
    """In this (fresh) process: train `steps` steps with arm `key`; the process's peaks, in bytes."""
    with tempfile.TemporaryDirectory() as folder:
        arm = make_arm(key, work, collector, folder)
        for _ in range(steps // block):
            train_block(work, arm, block, None)
        peaks = {"host": peak_rss()}
        if torch.cuda.is_available() and next(work.model.parameters()).is_cuda:
            peaks["device"] = torch.cuda.max_memory_allocated()
        arm.close()
    return peaks


def measure_memory(args: argparse.Namespace, keys: list[str], collector: str) -> dict[str, dict[str, int]]:
    """Each arm's peaks from processes of its own (this script with --memory-child), the median of
    `--memory-repeats` of them, the arms taking turns: one process's peak moves by up to ~20 MiB
    from run to run (the allocators' arenas), more than what an agent adds."""
    runs: dict[str, list[dict[str, int]]] = {}
    for repeat in range(args.memory_repeats):
        for key in ["base", *[k for k in keys if k != "base"]]:
            print(f"memory {repeat + 1}/{args.memory_repeats}: {key}", file=sys.stderr, flush=True)
            command = [
                sys.executable, __file__, "--workload", args.workload, "--device", args.device,
                "--threads", str(args.threads), "--seed", str(args.seed), "--block", str(args.block),
                "--memory-steps", str(args.memory_steps), "--memory-child", key, "--collector", collector,
            ]  # fmt: skip
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                print(f"warning: the memory process of {key} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            runs.setdefault(key, []).append(json.loads(done.stdout.strip().splitlines()[-1]))
    return {
        key: {kind: int(statistics.median(p[kind] for p in peaks)) for kind in peaks[0]}
        for key, peaks in runs.items()
    }


# -- report ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    name: str
    median_ms: float
    mean_ms: float
    median_ratio: float
    mean_ratio: float
    sampled_ms: float | None  # a sampled step's median minus the arm's plain steps' median
    next_ms: float | None  # the same for the step after a sample
    amortized: float | None  # (the arm's mean - its plain steps' mean) / the baseline's mean


def summarize(arms: list[Arm], timings: list[Timings]) -> list[Row]:
    base = timings[0].seconds
    base_median, base_mean = statistics.median(base), statistics.fmean(base)
    rows = []
    for arm, t in zip(arms, timings, strict=True):
        median, mean = statistics.median(t.seconds), statistics.fmean(t.seconds)
        plain, sampled, following = t.of("plain"), t.of("sampled"), t.of("next")
        if sampled:
            cost = (statistics.median(sampled) - statistics.median(plain)) * 1e3
            after = (statistics.median(following) - statistics.median(plain)) * 1e3
            amortized = (mean - statistics.fmean(plain)) / base_mean
        else:
            cost = after = amortized = None
        ratios = (median / base_median, mean / base_mean)
        rows.append(Row(arm.name, median * 1e3, mean * 1e3, *ratios, cost, after, amortized))
    return rows


def _added(peaks: dict[str, dict[str, int]], key: str, which: str) -> str:
    if key == "base" or key not in peaks or "base" not in peaks or which not in peaks[key]:
        return "-"
    base, own = peaks["base"][which], peaks[key][which]
    return f"{(own - base) / 2**20:+.1f} MiB ({(own - base) / base:+.1%})"


def table(rows: list[Row], keys: list[str], peaks: dict[str, dict[str, int]], skipped: dict[str, str]) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    lines = [
        "| arm | median ms | mean ms | median x | mean x | sampled ms | next ms | amortized "
        "| host peak + | device peak + |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r, key in zip(rows, keys, strict=True):
        amortized = "-" if r.amortized is None else f"{r.amortized:+.1%}"
        lines.append(
            f"| {r.name} | {r.median_ms:.2f} | {r.mean_ms:.2f} | {r.median_ratio:.3f} | {r.mean_ratio:.3f} "
            f"| {ms(r.sampled_ms)} | {ms(r.next_ms)} | {amortized} | {_added(peaks, key, 'host')} "
            f"| {_added(peaks, key, 'device')} |"
        )
    lines += [f"| {key}: skipped ({why}) | | | | | | | | | |" for key, why in skipped.items()]
    return "\n".join(lines)


def machine_info(work: Workload, args: argparse.Namespace) -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    device = "cpu"
    if args.device == "cuda":
        device = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    system = f"Python {platform.python_version()}, {platform.system()} {platform.machine()}"
    return "\n".join(
        [
            f"- torch {torch.__version__}, {system}",
            f"- CPU: {cpu}; {os.cpu_count()} CPUs; torch threads: {args.threads}; device: {device}",
            f"- workload `{work.name}`: {work.summary}, {work.parameters / 1e6:.1f} M parameters",
            f"- timing: {args.rounds} rounds x {args.steps} steps per arm in blocks of {args.block}, "
            f"after {args.warmup} warm-up steps per arm; memory: {args.memory_steps} steps per process, "
            f"the median of {args.memory_repeats} processes per arm",
        ]
    )


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    p.add_argument("--workload", choices=[*WORKLOADS, "all"], default="all")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {','.join(ARMS)} (all)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (2)")
    p.add_argument("--steps", type=int, default=200, help="timed steps per arm per round (200)")
    p.add_argument("--rounds", type=int, default=2, help="rounds (2)")
    p.add_argument("--block", type=int, default=20, help="steps per block, a multiple of 10 (20)")
    p.add_argument("--warmup", type=int, default=20, help="untimed steps per arm first (20)")
    p.add_argument("--memory-steps", type=int, default=100, help="steps per memory process (100; 0: none)")
    p.add_argument("--memory-repeats", type=int, default=3, help="memory processes per arm, median (3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", metavar="FILE", help="also write the tables here (markdown)")
    p.add_argument("--memory-child", choices=ARMS, help=argparse.SUPPRESS)
    p.add_argument("--collector", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    keys = args.arms.split(",")
    if unknown := [k for k in keys if k not in ARMS]:
        p.error(f"--arms: unknown {', '.join(unknown)}; choose among {', '.join(ARMS)}")
    args.keys = ["base", *[k for k in ARMS if k in keys and k != "base"]]
    if args.block < EVERY or args.block % EVERY:
        p.error(f"--block must be a positive multiple of {EVERY}")
    if args.steps % args.block or args.warmup % args.block or args.memory_steps % args.block:
        p.error("--steps, --warmup and --memory-steps must be multiples of --block")
    if args.steps < args.block or args.rounds < 1 or args.threads < 1:
        p.error("need --steps >= --block, --rounds >= 1, --threads >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    if args.memory_child and args.workload == "all":
        p.error("--memory-child needs one --workload")
    return args


def run_all(args: argparse.Namespace) -> int:
    """Each workload in a process of its own (a fresh allocator, one wandb run each)."""
    status, texts = 0, []
    with tempfile.TemporaryDirectory() as folder:
        for name in WORKLOADS:
            out = Path(folder) / f"{name}.md"
            command = [
                sys.executable, __file__, "--workload", name, "--arms", ",".join(args.keys),
                "--device", args.device, "--threads", str(args.threads), "--steps", str(args.steps),
                "--rounds", str(args.rounds), "--block", str(args.block), "--warmup", str(args.warmup),
                "--memory-steps", str(args.memory_steps), "--memory-repeats", str(args.memory_repeats),
                "--seed", str(args.seed), "--out", str(out),
            ]  # fmt: skip
            status = max(status, subprocess.run(command, check=False).returncode)
            if out.exists():
                texts.append(out.read_text(encoding="utf-8"))
    if args.out:
        Path(args.out).write_text("\n".join(texts), encoding="utf-8")
    return status


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.workload == "all":
        return run_all(args)
    torch.set_num_threads(args.threads)
    try:
        work = build(args.workload, torch.device(args.device), args.seed)
    except ImportError as exc:
        print(f"error: the {args.workload} workload needs {exc.name}: {INSTALL}", file=sys.stderr)
        return 2
    if args.memory_child:
        print(json.dumps(peak_memory(work, args.memory_child, args.collector, args.memory_steps, args.block)))
        return 0
    began = time.monotonic()
    with collector_process() as (target, proc), tempfile.TemporaryDirectory() as folder:
        arms, keys, skipped = [], [], {}
        for key in args.keys:
            try:
                arms.append(make_arm(key, work, target, folder))
                keys.append(key)
            except Skipped as exc:
                skipped[key] = str(exc)
                print(f"warning: the {key} arm is skipped: {exc}", file=sys.stderr)
        try:
            timings = interleave(work, arms, args)
        finally:
            found = [f"{arm.name}: {what}" for arm in arms for what in arm.close()]
        peaks = measure_memory(args, keys, target) if args.memory_steps else {}
        if proc.poll() is not None:
            found.append(f"the collector process exited during the run (status {proc.returncode})")
    text = f"{machine_info(work, args)}\n\n{table(summarize(arms, timings), keys, peaks, skipped)}\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text, encoding="utf-8")
    for line in found:
        print(f"warning: {line}", file=sys.stderr)
    print(f"{work.name}: done in {time.monotonic() - began:.0f} s", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
