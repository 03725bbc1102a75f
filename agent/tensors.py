"""Small tensor helpers a sample is made of: sums of squares and sums in a precision that keeps
the small means of weights, a float32 view of narrower values, one float64 copy of many small
tensors, segment sums, and the power sums of an activation read where it lies."""

from __future__ import annotations

import torch


def sumsq(t: torch.Tensor) -> torch.Tensor:
    if t.dtype in (torch.float32, torch.float64):
        return torch.dot(t, t)
    return torch.linalg.vector_norm(t, dtype=torch.float32).square()


def sum_dtype(t: torch.Tensor) -> torch.dtype:
    """Accumulate a float64 tensor's sum in float64 (its own precision), any other in float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def wide(t: torch.Tensor) -> torch.Tensor:
    """t itself in float32/float64, else a float32 copy (bf16 products would round away the work)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def power_sums(t: torch.Tensor) -> torch.Tensor:
    """(sum t, sum t^2) of an activation in float32 (float64 for float64), read where it lies: no
    contiguous copy of it (a BLAS dot where it is contiguous, else a norm over its strides), and no
    float32 copy of a narrower one on an accelerator, whose reductions widen as they load. A CPU
    reduction given dtype= copies a narrower input to it first (torch 2.13), so there it is
    widened once, explicitly, rather than once per reduction."""
    if t.dtype not in (torch.float32, torch.float64):
        if t.device.type == "cpu":
            t = t.float()
        else:
            square = torch.linalg.vector_norm(t, dtype=torch.float32).square()
            return torch.stack([t.sum(dtype=torch.float32), square])
    if t.is_contiguous():
        flat = t.view(-1)
        return torch.stack([flat.sum(), torch.dot(flat, flat)])
    return torch.stack([t.sum(), torch.linalg.vector_norm(t).square()])


def flat64(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One float64 copy of many small tensors, end to end (one cat and one cast)."""
    return torch.cat([t.detach().reshape(-1) for t in tensors]).double()


def segment_sum(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Sums of consecutive segments of these lengths (0 for an empty one)."""
    return torch.segment_reduce(values, "sum", lengths=lengths)
