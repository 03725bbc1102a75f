"""Per-tensor sums and sums of squares of many tensors in a number of device ops that does not
grow with the number of tensors (issue 15: a sampled step's kernel launches are bounded).

torch has no fused signed sum: `_foreach_norm` and `_foreach_powsum` reduce |x|, and a signed sum
from them (from (x + c)^2, say) cancels away the small means of weights. So the tensors of one
dtype are copied, in buckets of at most BUCKET values, into slots of whole blocks of BLOCK values
(`_foreach_copy_`, a multi-tensor launch; each slot's tail zeroed by one `_foreach_zero_`), each
block is reduced in float32 (float64 for float64 tensors: one launch for the sums, one for the
sums of squares), and the blocks are added per tensor in float64 (one `index_add_` each). The
float32 block sums over BLOCK values, added in float64, are at least as exact as the one float32
sum per tensor they replace.

The copy costs a write and a read of the values on top of the read itself: cheap on an
accelerator, where one launch costs as much as reading ~2^20 values, and dearer than per-tensor
ops on a CPU, where an op costs ~10 us and `_foreach_*` loop over the tensors anyway; the
sampler fuses on CUDA only (`Sampler(fused=...)`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

#: Values per block: reduced in float32, then added in float64 (as the work dots' DOT_BLOCK).
BLOCK = 1 << 12
#: The most values one bucket copies: a sampled step's extra memory, and launches per byte read.
BUCKET = 1 << 26


class Buckets:
    """The plan (made once) for the moments of tensors of the given sizes and dtypes."""

    def __init__(self, sizes: Sequence[int], dtypes: Sequence[torch.dtype], device: torch.device) -> None:
        if any(n > BUCKET for n in sizes):
            raise ValueError(f"a tensor of more than {BUCKET} values is reduced on its own")
        self.count = len(sizes)
        self._buckets: list[_Bucket] = []
        by_dtype: dict[torch.dtype, list[int]] = {}
        for k, dtype in enumerate(dtypes):
            by_dtype.setdefault(dtype, []).append(k)
        for dtype, members in by_dtype.items():
            bucket: list[int] = []
            filled = 0  # padded values of the tensors in `bucket`
            for k in members:
                if bucket and filled + _padded(sizes[k]) > BUCKET:
                    self._buckets.append(_Bucket(bucket, sizes, dtype, device))
                    bucket, filled = [], 0
                bucket.append(k)
                filled += _padded(sizes[k])
            self._buckets.append(_Bucket(bucket, sizes, dtype, device))
        placed = [k for b in self._buckets for k in b.members]  # the buckets' results end to end
        self._order = torch.tensor(placed, dtype=torch.long).argsort().to(device)

    def moments(self, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(sum, sum of squares) of each flat tensor, in float64, in the order given."""
        sums: list[torch.Tensor] = []
        sumsqs: list[torch.Tensor] = []
        for bucket in self._buckets:
            s, q = bucket.moments([tensors[k] for k in bucket.members])
            sums.append(s)
            sumsqs.append(q)
        return torch.cat(sums)[self._order], torch.cat(sumsqs)[self._order]


def _padded(n: int) -> int:
    return -(-n // BLOCK) * BLOCK


class _Bucket:
    """Tensors of one dtype copied into one buffer of whole blocks, and what maps them back."""

    def __init__(
        self, members: list[int], sizes: Sequence[int], dtype: torch.dtype, device: torch.device
    ) -> None:
        self.members = members
        self.sizes = [sizes[k] for k in members]
        self.offsets = [0]
        for n in self.sizes:
            self.offsets.append(self.offsets[-1] + _padded(n))
        self.dtype = dtype
        self.acc = torch.float64 if dtype == torch.float64 else torch.float32
        # each block's tensor (its place in the bucket), and where the bucket's results go
        blocks = torch.tensor([_padded(n) // BLOCK for n in self.sizes], dtype=torch.long)
        self.owner = torch.repeat_interleave(torch.arange(len(members)), blocks).to(device)
        self.device = device

    def moments(self, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        buf = torch.empty(self.offsets[-1], dtype=self.dtype, device=self.device)
        slots = [buf[o : o + n] for o, n in zip(self.offsets, self.sizes, strict=False)]
        torch._foreach_copy_(slots, tensors)
        tails = [
            buf[o + n : end]
            for o, n, end in zip(self.offsets, self.sizes, self.offsets[1:], strict=False)
            if o + n < end
        ]
        if tails:
            torch._foreach_zero_(tails)
        blocks = buf.view(-1, BLOCK)
        block_sums = blocks.sum(1, dtype=self.acc).double()
        block_sumsqs = torch.linalg.vector_norm(blocks, dim=1, dtype=self.acc).double().square()
        n = len(self.members)
        sums = torch.zeros(n, dtype=torch.float64, device=self.device).index_add_(0, self.owner, block_sums)
        sumsqs = torch.zeros(n, dtype=torch.float64, device=self.device).index_add_(
            0, self.owner, block_sumsqs
        )
        return sums, sumsqs
