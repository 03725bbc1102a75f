"""What one sampled step's statistics cost, against one read pass over what they must read.

Run it as a script (pytest does not collect it):

    python tests/bench/bench_sample_pass.py                      # every workload, CPU
    python tests/bench/bench_sample_pass.py --workloads gpt2 --steps 240 --device cuda

Per workload (the reference MLP, 4 x Linear(1024); GPT-2 and Llama, 4 layers x 256 wide, built
from transformers configs; a ResNet-18-like CNN at 32 x 32, batch 32, from `ResNetConfig`; random
weights, no download) it trains ONE model with ONE `Monitor(every=3, collector=None)`, so that a
sample's statistics are read within one model copy (two copies differ by memory placement alone):
steps cycle sampled, following (its optimizer pre-hook reads the gradient for the sample's work),
plain. A sample costs (sampled + following) - 2 x plain, each the median over the run's steps of
that kind; `shape` is the same for the costliest phase of the samples (sample number modulo
SHAPE_EVERY: the phases take different shares of the histograms and probes), against the median of
all samples (the ratio is what issue 15 item 3 bounds by 2).

The read pass is one `torch._foreach_norm` per dtype over the parameters, their gradients and the
inputs and outputs of every activation site of one forward (kept by hooks for this measure only):
the least a sample must read (issue 15 item 2 bounds a sample by 3 of them). `held KiB` is the most
the sampler kept from one step to the next (`Sampler.held_bytes`, read after every step: its peak is
after a sample, which keeps theta_t on the work coordinates until the next step's gradient), against
the parameters' own bytes.

Timings on a shared machine are noisy: read the table for direction, and run it alone for figures.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers

from thermoscope.agent import Monitor
from thermoscope.agent.sampler import SHAPE_EVERY
from thermoscope.agent.sites import find_sites


@dataclass
class Workload:
    """A model, its optimizer and a seeded batch per step (`loss(step)` runs forward and loss)."""

    name: str
    model: nn.Module
    loss: Callable[[int], torch.Tensor]


def mlp(device: torch.device) -> Workload:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i in range(4):
        layers += [nn.Linear(1024, 1024)] + ([nn.ReLU()] if i < 3 else [])
    model = nn.Sequential(*layers).to(device)
    xs = torch.randn(16, 64, 1024, device=device)
    ys = torch.randn(16, 64, 1024, device=device)
    return Workload("mlp 4x1024", model, lambda s: nn.functional.mse_loss(model(xs[s % 16]), ys[s % 16]))


def _lm(name: str, config, model_class, device: torch.device) -> Workload:
    torch.manual_seed(0)
    model = model_class(config).to(device).train()
    ids = torch.randint(0, config.vocab_size, (16, 8, 64), device=device)
    return Workload(name, model, lambda s: model(input_ids=ids[s % 16], labels=ids[s % 16]).loss)


def gpt2(device: torch.device) -> Workload:
    config = transformers.GPT2Config(
        vocab_size=2048, n_positions=64, n_embd=256, n_layer=4, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return _lm("gpt2 4x256", config, transformers.GPT2LMHeadModel, device)


def llama(device: torch.device) -> Workload:
    config = transformers.LlamaConfig(
        vocab_size=2048, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
    )  # fmt: skip
    return _lm("llama 4x256", config, transformers.LlamaForCausalLM, device)


def resnet(device: torch.device) -> Workload:
    torch.manual_seed(0)
    config = transformers.ResNetConfig(
        num_channels=3, embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2],
        layer_type="basic", num_labels=10,
    )  # fmt: skip
    model = transformers.ResNetForImageClassification(config).to(device).train()
    pixels = torch.randn(4, 32, 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (4, 32), device=device)
    return Workload(
        "resnet-18 32px", model, lambda s: model(pixel_values=pixels[s % 4], labels=labels[s % 4]).loss
    )


WORKLOADS = {"mlp": mlp, "gpt2": gpt2, "llama": llama, "resnet": resnet}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def read_pass_ms(work: Workload, monitor: Monitor, device: torch.device, repeats: int = 20) -> float:
    """Median ms of one fused read (`_foreach_norm`) of the parameters, gradients and site tensors."""
    kept: list[torch.Tensor] = []
    hooks = [
        module.register_forward_hook(
            lambda m, args, out: kept.extend(
                t.detach() for t in (args[0], out) if isinstance(t, torch.Tensor)
            )
        )
        for _, module in find_sites(work.model)
    ]
    loss = work.loss(0)
    loss.backward()
    for h in hooks:
        h.remove()
    tensors = [p.detach() for p in work.model.parameters()] + [
        p.grad for p in work.model.parameters() if p.grad is not None
    ]
    tensors += kept
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for group in groups.values():
            torch._foreach_norm(group)
        _sync(device)
        times.append(time.perf_counter() - start)
    work.model.zero_grad(set_to_none=True)
    return statistics.median(times) * 1e3


def measure(work: Workload, device: torch.device, steps: int) -> dict[str, float]:
    opt = torch.optim.Adam(work.model.parameters(), lr=1e-4)
    monitor = Monitor(work.model, opt, every=3)
    kinds: dict[str, list[float]] = {"following": [], "plain": []}
    phases: dict[int, list[float]] = {}  # sampled steps by sample number modulo SHAPE_EVERY
    held = 0  # the most the sampler held after a step (after a sample: its theta_t for the work)
    for step in range(steps + 6):
        phase = (step // 3) % SHAPE_EVERY
        _sync(device)
        start = time.perf_counter()
        loss = work.loss(step)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        monitor.step(loss)
        _sync(device)
        elapsed = (time.perf_counter() - start) * 1e3
        held = max(held, monitor._sampler.held_bytes())
        monitor.sink.pending.clear()  # kept samples are not this measure's business
        if step < 6:  # warm-up: the first sample settles the site table and takes every shape
            continue
        if step % 3 == 0:
            phases.setdefault(phase, []).append(elapsed)
        else:
            kinds["following" if step % 3 == 1 else "plain"].append(elapsed)
    read = read_pass_ms(work, monitor, device)
    monitor.close()
    plain = statistics.median(kinds["plain"])
    following = statistics.median(kinds["following"]) - plain
    ordinary = statistics.median([t for ts in phases.values() for t in ts]) - plain + following
    shape = max(statistics.median(ts) for ts in phases.values()) - plain + following
    params = sum(p.numel() * p.element_size() for p in work.model.parameters())
    return {
        "params M": sum(p.numel() for p in work.model.parameters()) / 1e6,
        "tensors": len(list(work.model.parameters())),
        "sites": len(monitor.sites),
        "plain ms": plain,
        "read ms": read,
        "sample ms": ordinary,
        "x read": ordinary / read,
        "shape ms": shape,
        "shape x": shape / ordinary,
        "held KiB": held / 1024,
        "held %": 100 * held / params,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=3 * 3 * SHAPE_EVERY, help="timed steps per workload")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"- torch {torch.__version__}, device {device}, torch threads {args.threads}, {args.steps} steps each"
    )
    print(f"- samples every 3 steps; histograms and probes on one sample in {SHAPE_EVERY}\n")
    rows = [(name, measure(WORKLOADS[name](device), device, args.steps)) for name in args.workloads]
    columns = list(rows[0][1])
    print("| workload | " + " | ".join(columns) + " |")
    print("| --- |" + " ---: |" * len(columns))
    for name, row in rows:
        cells = [f"{v:d}" if isinstance(v, int) else f"{v:.2f}" for v in row.values()]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
