"""Float64 truths computed directly from a model's tensors, against which the agent's readings are checked."""

from __future__ import annotations

import math

import torch

from thermoscope.science import physics


def entropy64(t: torch.Tensor) -> float:
    """n/2 ln(2 pi e var), var floored as physics documents (a 1-value bias has var 0): what the
    job's entropy sums (a layer's own reading is `layer_entropy64`)."""
    v = t.detach().double().reshape(-1)
    var = max(
        float(v.var(unbiased=False)), physics.VAR_FLOOR_REL * float(v.mean()) ** 2, physics.VAR_FLOOR_ABS
    )
    return v.numel() * 0.5 * math.log(2 * math.pi * math.e * var)


def layer_entropy64(t: torch.Tensor) -> float:
    """A layer's entropy reading: `entropy64`, and NaN where its variance is at the floor (a
    constant tensor: a 1-value bias, a zero-initialized one, a unit gain)."""
    v = t.detach().double().reshape(-1)
    floor = max(physics.VAR_FLOOR_REL * float(v.mean()) ** 2, physics.VAR_FLOOR_ABS)
    return math.nan if float(v.var(unbiased=False)) <= floor else entropy64(t)


def work64(grads: list[torch.Tensor], after: list[torch.Tensor], before: list[torch.Tensor]) -> list[float]:
    """<g, theta_after - theta_before> per tensor, in float64 from copies: the truth for the work."""
    return [
        float(torch.dot(g.double().flatten(), (a.detach().double() - b.double()).flatten()))
        for g, a, b in zip(grads, after, before, strict=True)
    ]


def efficiency64(z: torch.Tensor, a: torch.Tensor) -> float:
    """1 - var(a) / var(z): an activation's efficiency from its input `z` and output `a`, in float64."""
    return 1.0 - float(a.double().var(unbiased=False)) / float(z.double().var(unbiased=False))
