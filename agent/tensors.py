"""Small tensor helpers a sample is made of: sums of squares and sums in a precision that keeps
the small means of weights, a float32 view of narrower values, one float64 copy of many small
tensors, segment sums, the power sums of an activation read where it lies, and its shifted
power sums (about a reference near its mean, so that its variance survives float32)."""

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


#: Values per dimension the shift's reference is the mean of (a strided view: no copy of the tensor).
REFERENCE_STRIDES = 8


def shifted_sums(t: torch.Tensor) -> torch.Tensor:
    """(c, sum (t - c), sum (t - c)^2) in float32 (float64 for float64), c a reference near t's
    mean: the mean of a strided view of at most REFERENCE_STRIDES values per dimension (so
    that c + sum/n is the mean, and the second sum the M2 to float32's precision).

    Why: sum t^2 - (sum t)^2 / n cancels catastrophically when t's mean is large against its
    spread (a saturated tanh's input 3 + 0.01 N read eta 0.602 for 0.9999; a squeeze-excite
    sigmoid -21.3). About a reference within a few spreads of the mean, float32 sums keep the
    variance. Both sums are reductions (pairwise on a CPU, a tree on an accelerator: a BLAS dot
    accumulates sequentially, 1e-6 off over 2e4 values). Costs one temporary of t's size
    (t - c, squared in place), on sampled steps; a narrower t on an accelerator is shifted in
    its own dtype (c is one of its values' neighbours: the difference is exact or nearly) and
    summed in float32 as the reductions load it."""
    wide = torch.float64 if t.dtype == torch.float64 else torch.float32
    view = t[tuple(slice(None, None, max(1, size // REFERENCE_STRIDES)) for size in t.shape)]
    reference = torch.nan_to_num(view.mean(dtype=wide), nan=0.0, posinf=0.0, neginf=0.0)  # empty, diverged
    if t.dtype in (torch.float32, torch.float64) or t.device.type == "cpu":
        shifted = t.to(wide) - reference
        first = shifted.sum()
        return torch.stack([reference, first, shifted.square_().sum()])
    reference = reference.to(t.dtype)
    shifted = t - reference
    square = torch.linalg.vector_norm(shifted, dtype=torch.float32).square()
    return torch.stack([reference.float(), shifted.sum(dtype=torch.float32), square])


def flat64(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One float64 copy of many small tensors, end to end (one cat and one cast)."""
    return torch.cat([t.detach().reshape(-1) for t in tensors]).double()


def segment_sum(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Sums of consecutive segments of these lengths (0 for an empty one)."""
    return torch.segment_reduce(values, "sum", lengths=lengths)
