"""The agent's work against a per-layer truth on a Qwen2 learning a Markov chain (real Monitor).

    python tests/bench/bench_work_qwen.py [--steps 20] [--held 256] [--only TEXT] [--cost]

Per run: a Qwen2 from a config (narrow: hidden 32, MLP 64; wide: hidden 128, MLP 1024), trained
on sequences of a fixed random Markov chain, with one of: AdamW 1e-3, SGD momentum 0.9 lr 0.1,
AdamW with clip_grad_norm_ 0.1. Modes: `one rank` (one backward per step: the agent's w+ alone),
`accum 4` (four micro-batches, (loss / 4).backward() each), `ddp 2` (two real processes in a gloo
group on 127.0.0.1, DistributedDataParallel, 16 sequences a rank: accum 4's 32 a step),
`closure` (Monitor(work_closure=...) on an independent batch). Every step is sampled. The truth
per layer is the trapezoid with a held-out batch's gradients at theta_t and theta_{t+1},
<(G_H(t) + G_H(t+1)) / 2, d_l>, summed over the run (taken on a copy of the model, out of the
agent's hooks). Learning columns: sum of the agent's work / sum of the truth, and / the held-out
loss change; the per-layer error, sum_l |W_l - T_l| / sum_l |T_l| over the run; the same two for
the old estimator w+ (the next step's gradient, unclipped); the truth; the sampled step's ms (the
monitored training step, load-dependent). Stationary runs (a chain with uniform transitions,
nothing to learn): the sums of the work, of w+ and of the truth, beside the truth's size per step.
`--cost`: the closure's cost on a sampled step (`cost`).
"""

from __future__ import annotations

import argparse
import time

import torch
import transformers
from torch import nn

from thermoscope.agent import Monitor

torch.set_num_threads(2)
VOCAB, SEQ, BATCH, HELD = 64, 32, 8, 256


def chain(seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(VOCAB, VOCAB, generator=gen) * 2
    return logits.softmax(-1)


def sequences(p: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randint(0, VOCAB, (n,), generator=gen)
    out = [x]
    for _ in range(SEQ - 1):
        x = torch.multinomial(p[x], 1, generator=gen).squeeze(1)
        out.append(x)
    return torch.stack(out, 1)


def qwen(wide: bool) -> nn.Module:
    torch.manual_seed(0)
    hidden, mlp = (128, 1024) if wide else (32, 64)
    config = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ, attention_dropout=0.0,
    )  # fmt: skip
    return transformers.Qwen2ForCausalLM(config).train()


def loss_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def run(
    wide: bool,
    optim: str,
    mode: str,
    steps: int,
    held: int = HELD,
    rank: int | None = None,
    stationary: bool = False,
) -> dict:
    """One run; `rank`: this process's rank in a two-process gloo group (mode `ddp 2`, the model
    wrapped in DistributedDataParallel, a batch of its own per rank; the truth on rank 0 only).
    `stationary`: a chain with uniform transitions, nothing to learn: the model starts at the
    loss's floor (ln 64, its near-uniform outputs) and the noise moves it about, E[Delta L] = 0."""
    net = qwen(wide)
    model = nn.parallel.DistributedDataParallel(net) if rank is not None else net
    params = [p for p in net.parameters()]
    p = torch.full((VOCAB, VOCAB), 1 / VOCAB) if stationary else chain(1)
    held_ids = sequences(p, held, torch.Generator().manual_seed(1))  # the same on every rank
    gen = torch.Generator().manual_seed(2 + 1000 * (rank or 0))  # the training stream, per rank
    if optim == "sgd":
        opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    else:
        opt = torch.optim.AdamW(params, lr=1e-3)
    clip = optim == "adamw+clip"
    closure = None
    if mode == "closure":
        closure = lambda: loss_of(model, sequences(p, BATCH, gen))  # noqa: E731
    monitor = Monitor(model, opt, every=1, work_closure=closure)
    micro = 4 if mode == "accum 4" else 1
    per_step = BATCH * (2 if rank is not None else micro)  # two ranks: accum 4's 32 sequences a step

    # the truth's gradients on a copy: a backward through the monitored model would reach the
    # agent's per-backward hooks (its gradient spread) and its activation sites
    shadow = qwen(wide)
    held_loss: list[float] = []

    def held_grad() -> list[torch.Tensor]:
        if rank:
            return []
        shadow.load_state_dict(net.state_dict())
        loss = loss_of(shadow, held_ids)
        held_loss.append(float(loss.detach()))
        return list(torch.autograd.grad(loss, list(shadow.parameters())))

    names = [n for n, _ in model.named_parameters()]
    truth = torch.zeros(len(params), dtype=torch.float64)
    agent = torch.zeros(len(params), dtype=torch.float64)
    plus = torch.zeros(len(params), dtype=torch.float64)
    g0 = held_grad()
    prev_d = None
    sampled_ms = 0.0
    for t in range(steps + 1):
        ids = sequences(p, per_step, gen)
        start = time.perf_counter()
        opt.zero_grad()
        for chunk in ids.chunk(micro):
            (loss_of(model, chunk) / micro).backward()
        if prev_d is not None:
            plus += torch.tensor(
                [float((q.grad.double() * d).sum()) for q, d in zip(params, prev_d, strict=True)]
            )
        if clip:
            torch.nn.utils.clip_grad_norm_(params, 0.1)
        before = [q.detach().double().clone() for q in params]
        opt.step()
        monitor.step()
        sampled_ms += time.perf_counter() - start
        if t > 0:
            agent += torch.from_numpy(monitor.latest().layer_work)
        if t == steps:
            break
        d = [q.detach().double() - b for q, b in zip(params, before, strict=True)]
        g1 = held_grad()
        if not rank:
            truth += torch.tensor(
                [float(((a + b).double() / 2 * di).sum()) for a, b, di in zip(g0, g1, d, strict=True)]
            )
        g0, prev_d = g1, d
    monitor.close()
    if rank:
        return {}
    err = float((agent - truth).abs().sum() / truth.abs().sum())
    return {
        "ratio": float(agent.sum() / truth.sum()),
        "layer_err": err,
        "plus": float(plus.sum() / truth.sum()),
        "plus_err": float((plus - truth).abs().sum() / truth.abs().sum()),
        "work": float(agent.sum()),
        "scale": float(truth.abs().sum()) / steps,  # the size of the truth per step: the noise's scale
        "plus_sum": float(plus.sum()),
        "truth": float(truth.sum()),
        "dL": held_loss[-1] - held_loss[0],  # the held-out loss's change over the run
        "per_dL": float(agent.sum()) / (held_loss[-1] - held_loss[0]),
        "ms": 1000 * sampled_ms / (steps + 1),
        "names": names,
        "agent_layers": agent.tolist(),
        "truth_layers": truth.tolist(),
    }


def _rank(
    rank: int, port: int, wide: bool, optim: str, steps: int, held: int, stationary: bool, out: str
) -> None:
    """One process of `run_ddp`: rank 0 saves the result to `out`."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        result = run(wide, optim, "ddp 2", steps, held, rank=rank, stationary=stationary)
        if rank == 0:
            torch.save(result, out)
    finally:
        dist.destroy_process_group()


def run_ddp(wide: bool, optim: str, steps: int, held: int = HELD, stationary: bool = False) -> dict:
    """`run` on two data-parallel ranks: real processes in a gloo group on 127.0.0.1."""
    import socket
    import tempfile

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as folder:
        out = f"{folder}/result.pt"
        mp.spawn(_rank, args=(port, wide, optim, steps, held, stationary, out), nprocs=2)
        return torch.load(out)


def cost(wide: bool, steps: int = 12) -> dict:
    """Median ms of a training step (one backward of 8 sequences, SGD momentum) unmonitored, with a
    sampled step of the monitor (w+ alone, one rank) and with its closure (on another 8): three
    copies of the model stepped in turn, so that the machine's load falls on each alike."""
    p = chain(1)
    gen = torch.Generator().manual_seed(2)
    runs = {}
    for name in ("plain", "sampled", "closure"):
        model = qwen(wide)
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        closure = (lambda m=model: loss_of(m, sequences(p, BATCH, gen))) if name == "closure" else None
        monitor = None if name == "plain" else Monitor(model, opt, every=1, work_closure=closure)
        runs[name] = (model, opt, monitor, [])
    for _ in range(steps):
        ids = sequences(p, BATCH, gen)
        for model, opt, monitor, times in runs.values():
            start = time.perf_counter()
            loss_of(model, ids).backward()
            opt.step()
            opt.zero_grad()
            if monitor is not None:
                monitor.step()
            times.append(time.perf_counter() - start)
    for _, _, monitor, _ in runs.values():
        if monitor is not None:
            monitor.close()
    return {name: 1000 * sorted(t[2:])[len(t[2:]) // 2] for name, (_, _, _, t) in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--held", type=int, default=HELD)
    parser.add_argument("--only", default="", help="a substring of the runs to keep")
    parser.add_argument("--cost", action="store_true", help="only the closure's cost")
    args = parser.parse_args()
    if args.cost:
        print("| model | training step ms | with a sampled step | with the closure's |")
        print("|---|---|---|---|")
        for wide in (False, True):
            c = cost(wide)
            label = "wide" if wide else "narrow"
            print(f"| {label} | {c['plain']:.1f} | {c['sampled']:.1f} | {c['closure']:.1f} |")
        return
    print("| model | optimizer | mode | Σw/truth | Σw/ΔL | per-layer error | old w+/truth | old w+ per-layer"
          " | truth ΔL | step ms |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for wide in (False, True):
        for optim in ("adamw", "sgd", "adamw+clip"):
            for mode in ("one rank", "accum 4", "ddp 2", "closure"):
                label = f"{'wide' if wide else 'narrow'} {optim} {mode} learning"
                if args.only not in label:
                    continue
                if mode == "ddp 2":
                    r = run_ddp(wide, optim, args.steps, args.held)
                else:
                    r = run(wide, optim, mode, args.steps, args.held)
                print(
                    f"| {'wide' if wide else 'narrow'} | {optim} | {mode} | {r['ratio']:.3f}"
                    f" | {r['per_dL']:.3f} | {r['layer_err']:.3f} | {r['plus']:.3f} | {r['plus_err']:.3f}"
                    f" | {r['truth']:+.3f} | {r['ms']:.0f} |",
                    flush=True,
                )
    print()
    print("Stationary (nothing to learn): sums over the run")
    print()
    print("| model | optimizer | mode | Σw | old Σw+ | truth | held-out ΔL | per-step |truth| |")
    print("|---|---|---|---|---|---|---|---|")
    for wide in (False, True):
        for optim in ("adamw", "sgd", "adamw+clip"):
            for mode in ("one rank", "accum 4", "ddp 2"):
                label = f"{'wide' if wide else 'narrow'} {optim} {mode} stationary"
                if args.only not in label:
                    continue
                if mode == "ddp 2":
                    r = run_ddp(wide, optim, args.steps, args.held, stationary=True)
                else:
                    r = run(wide, optim, mode, args.steps, args.held, stationary=True)
                print(
                    f"| {'wide' if wide else 'narrow'} | {optim} | {mode} | {r['work']:+.4f}"
                    f" | {r['plus_sum']:+.4f} | {r['truth']:+.4f} | {r['dL']:+.4f}"
                    f" | {r['scale']:.4f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
