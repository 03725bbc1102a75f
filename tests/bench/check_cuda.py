"""On a CUDA machine: the agent's numbers are right and its hooks never make the host wait.

    python tests/bench/check_cuda.py

1. Correctness: a CUDA MLP (one 9 M-value weight, so the blocked float64 dot path runs)
   trains with an in-process `Monitor(every=1)`; at one step its entropy, work and ReLU
   efficiency are compared with a float64 computation from copies of the parameters.
2. No synchronization: after a warm-up, sampled and unsampled steps run under
   `torch.cuda.set_sync_debug_mode("error")`, which raises on any operation that blocks the
   host on the device (`.item()`, a device-to-host copy into pageable memory, ...).

Prints one line per check and exits 1 if any fails. Not a pytest test: CI has no GPU.
"""

from __future__ import annotations

import math
import sys
import traceback

import torch
from torch import nn

from thermoscope.agent import Monitor
from thermoscope.science import physics


def entropy64(t: torch.Tensor) -> float:
    v = t.detach().double().flatten()
    floor = max(physics.VAR_FLOOR_REL * float(v.mean()) ** 2, physics.VAR_FLOOR_ABS)
    var = max(float(v.var(unbiased=False)), floor)
    return v.numel() * 0.5 * math.log(2 * math.pi * math.e * var)


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-300)


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    dev = torch.device("cuda")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3000, 3000), nn.ReLU(), nn.Linear(3000, 10)).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    # a subset above the 9 M-value layer: its work is exact (not subsampled), comparable with float64
    monitor = Monitor(model, opt, every=1, subset=1 << 24)
    x, y = torch.randn(256, 3000, device=dev), torch.randn(256, 10, device=dev)
    failures = []

    for _ in range(3):  # warm-up: allocator, pinned host buffers, cached segment indices
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        previous = [p.detach().clone() for p in model.parameters()]  # the last warm-up's update ...
        opt.step()
        monitor.step(loss)

    # 1. correctness against float64
    loss = nn.functional.mse_loss(model(x), y)
    opt.zero_grad()
    loss.backward()
    before = [p.detach().clone() for p in model.parameters()]
    grads = [p.grad.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        z = model[0](x).double()
        eta = 1 - float(torch.relu(z).var(unbiased=False)) / float(z.var(unbiased=False))
    opt.step()
    monitor.step(loss)
    truth_loss = loss.item()
    # ... is the work the checked sample carries, w+, with this step's gradient
    work = [
        float(torch.dot(g.double().flatten(), (b.double() - p.double()).flatten()))
        for g, p, b in zip(grads, previous, before, strict=True)
    ]
    r = monitor.latest()
    checks = [("energy", r.energy, truth_loss, 1e-6)]
    checks += [
        (f"entropy {n}", s, entropy64(b), 1e-6)
        for n, s, b in zip(r.layer_names, r.layer_entropy, before, strict=True)
    ]
    checks += [(f"work {n}", w, t, 1e-4) for n, w, t in zip(r.layer_names, r.layer_work, work, strict=True)]
    checks += [("ReLU efficiency", r.site_efficiency[0], eta, 1e-5)]
    for name, got, want, tol in checks:
        ok = rel(got, want) <= tol
        print(f"{'ok ' if ok else 'BAD'} {name}: {got:.9g} vs float64 {want:.9g} (rel {rel(got, want):.1e})")
        if not ok:
            failures.append(name)

    # 2. no host-device synchronization on any step, sampled or not (None: the bare loop)
    monitor.close()
    for every in (None, 1, 4):
        monitor = Monitor(model, opt, every=every) if every else None
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(8):
                loss = nn.functional.mse_loss(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if monitor is not None:
                    monitor.step(loss)
            print(f"ok  every={every}: 8 steps under sync_debug_mode('error'), no synchronization")
        except RuntimeError as exc:
            where = [
                f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} {f.line}"
                for f in traceback.extract_tb(exc.__traceback__)
            ]
            print(f"BAD every={every}: a step synchronized ({exc}) at:\n    " + "\n    ".join(where[-4:]))
            failures.append(f"sync every={every}")
        finally:
            torch.cuda.set_sync_debug_mode("default")
            if monitor is not None:
                monitor.close()
    print("FAILED: " + ", ".join(failures) if failures else "all CUDA checks passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
