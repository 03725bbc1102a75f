"""The agent's work against a per-layer truth on a tiny Qwen2 learning a Markov chain (real Monitor).

    python tests/bench/bench_work_qwen.py [--steps 50]

Per run: a Qwen2 from a config (narrow: hidden 32, MLP 64; wide: hidden 128, MLP 1024), trained
on sequences of a fixed random Markov chain, with one of: AdamW 1e-3, SGD momentum 0.9 lr 0.1,
AdamW with clip_grad_norm_ 0.1. Modes: `one rank` (one backward per step), `accum 4` (four
micro-batches, (loss / 4).backward() each), `closure` (Monitor(work_closure=...) on an independent
batch). Every step is sampled. The truth per layer is the trapezoid with a large held-out batch's
gradients at theta_t and theta_{t+1}, <(G_H(t) + G_H(t+1)) / 2, d_l>, summed over the run.
Columns: sum of the agent's work / sum of the truth; the per-layer error, sum_l |W_l - T_l| /
sum_l |T_l| over the run; the old estimator w+ (the next step's gradient) / truth; and the
agent's sampled-step time over an unsampled one's (ms).
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


def run(wide: bool, optim: str, mode: str, steps: int) -> dict:
    model = qwen(wide)
    params = [p for p in model.parameters()]
    p = chain(1)
    gen = torch.Generator().manual_seed(2)
    held = sequences(p, HELD, gen)
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

    def held_grad() -> list[torch.Tensor]:
        return list(torch.autograd.grad(loss_of(model, held), params))

    names = [n for n, _ in model.named_parameters()]
    truth = torch.zeros(len(params), dtype=torch.float64)
    agent = torch.zeros(len(params), dtype=torch.float64)
    plus = 0.0
    g0 = held_grad()
    prev_d = None
    sampled_ms = 0.0
    for t in range(steps + 1):
        ids = sequences(p, BATCH * micro, gen)
        start = time.perf_counter()
        opt.zero_grad()
        for chunk in ids.chunk(micro):
            (loss_of(model, chunk) / micro).backward()
        if prev_d is not None:
            plus += sum(float((q.grad.double() * d).sum()) for q, d in zip(params, prev_d, strict=True))
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
        truth += torch.tensor(
            [float(((a + b).double() / 2 * di).sum()) for a, b, di in zip(g0, g1, d, strict=True)]
        )
        g0, prev_d = g1, d
    monitor.close()
    err = float((agent - truth).abs().sum() / truth.abs().sum())
    return {
        "ratio": float(agent.sum() / truth.sum()),
        "layer_err": err,
        "plus": float("nan") if clip else plus / float(truth.sum()),
        "truth": float(truth.sum()),
        "ms": 1000 * sampled_ms / (steps + 1),
        "names": names,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--only", default="", help="a substring of the runs to keep")
    args = parser.parse_args()
    print("| model | optimizer | mode | Σw/truth | per-layer error | old w+/truth | truth ΔL | step ms |")
    print("|---|---|---|---|---|---|---|---|")
    for wide in (False, True):
        for optim in ("adamw", "sgd", "adamw+clip"):
            for mode in ("one rank", "accum 4", "closure"):
                label = f"{'wide' if wide else 'narrow'} {optim} {mode}"
                if args.only not in label:
                    continue
                r = run(wide, optim, mode, args.steps)
                print(
                    f"| {'wide' if wide else 'narrow'} | {optim} | {mode} | {r['ratio']:.3f}"
                    f" | {r['layer_err']:.3f}"
                    f" | {r['plus']:.3f} | {r['truth']:+.3f} | {r['ms']:.0f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
