"""Where a sample reads a large layer: blocks of neighbouring values, not scattered ones.

A layer of more than `subset` values is read on `subset` of them: the histogram counts them, and
the work (w+ = <g_{t+1}, d_t>) is estimated on them. Taken one by one, a subset of a sixteenth of a
layer touches every 64-byte cache line of it, so gathering it from memory costs as much as reading
the whole layer, three times per sample. Taken in blocks of WORK_BLOCK neighbouring values (one
cache line of float32), it reads only what it keeps (`bench_work_blocks.py` measures both: the
cost, and the estimate's spread, a little wider in blocks).

A large layer of n values is cut into nb = n // WORK_BLOCK blocks from its start; the n mod
WORK_BLOCK values after the last whole block are its tail.

* The histogram counts a fixed, seeded set of kb = subset // WORK_BLOCK blocks, the same values at
  every sample (so that changes are paired, not resampled noise), seeded by the layer's name (so
  that every replica of the layer counts the same values).
* The work takes those blocks shifted by a fresh random number of blocks (drawn per layer and per
  sample on the device, from a generator of its own: the user's random stream is untouched), and
  the tail. Each block is then taken with probability kb/nb, so nb/kb times the blocks' dot plus
  the tail's dot is an unbiased estimate of the layer's dot (`scale`, `weight`).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import torch

#: Values per block: one 64-byte cache line of float32.
WORK_BLOCK = 16


class Coordinates:
    """The blocks of every layer (`None` for a layer read whole: at most `subset` values)."""

    def __init__(
        self, names: Sequence[str], sizes: Sequence[int], subset: int, seed: int, device: torch.device
    ) -> None:
        if subset < WORK_BLOCK:
            raise ValueError(f"subset must be at least {WORK_BLOCK} values, got {subset}")
        self._kept = subset // WORK_BLOCK
        self._sizes = list(sizes)
        self._blocks = [n // WORK_BLOCK if n > subset else 0 for n in sizes]
        self._base: list[torch.Tensor | None] = [
            _base(name, nb, self._kept, seed, device) if nb else None
            for name, nb in zip(names, self._blocks, strict=True)
        ]
        self._tails = [n - nb * WORK_BLOCK if nb else 0 for n, nb in zip(sizes, self._blocks, strict=True)]
        self._weights = [
            self._weight(n, nb, device) if tail else None
            for n, nb, tail in zip(sizes, self._blocks, self._tails, strict=True)
        ]
        self._drawn = [i for i, nb in enumerate(self._blocks) if nb]
        if self._drawn:  # one draw for every layer at once: a few ops per sample, not per layer
            counts = torch.full((len(self._drawn),), self._kept, dtype=torch.long)
            self._all_base = torch.cat([self._base[i] for i in self._drawn])  # type: ignore[misc]
            for i, part in zip(self._drawn, self._all_base.split(self._kept), strict=True):
                self._base[i] = part  # held once: the layers' blocks are views of the whole
            blocks = torch.tensor([self._blocks[i] for i in self._drawn], dtype=torch.long)
            self._modulus = blocks.repeat_interleave(counts).to(device=device, dtype=torch.int32)
            self._range = blocks.double().to(device)
            self._generator = torch.Generator(device=device).manual_seed(seed)

    def _weight(self, n: int, nb: int, device: torch.device) -> torch.Tensor:
        """nb/kb on the taken blocks, 1 on the tail."""
        blocks = torch.full((self._kept * WORK_BLOCK,), nb / self._kept)
        return torch.cat([blocks, torch.ones(n - nb * WORK_BLOCK)]).to(device)

    def counted(self, i: int) -> int:
        """How many of layer i's values its histogram counts."""
        return self._kept * WORK_BLOCK if self._blocks[i] else self._sizes[i]

    def fixed(self, flat: torch.Tensor, i: int) -> torch.Tensor:
        """Layer i's histogram values (a view of the whole layer when it is read whole)."""
        base = self._base[i]
        return flat if base is None else self._rows(flat, i, base)

    def draw(self) -> list[torch.Tensor | None]:
        """This sample's work blocks per layer (None: the whole layer), drawn on the device."""
        rows: list[torch.Tensor | None] = [None] * len(self._blocks)
        if not self._drawn:
            return rows
        device = self._range.device
        u = torch.rand(len(self._drawn), generator=self._generator, device=device, dtype=torch.float64)
        shift = (u * self._range).long().repeat_interleave(self._kept, output_size=len(self._all_base))
        shifted = torch.remainder(self._all_base + shift, self._modulus)
        for i, part in zip(self._drawn, shifted.split(self._kept), strict=True):
            rows[i] = part
        return rows

    def take(self, flat: torch.Tensor, i: int, rows: torch.Tensor | None) -> torch.Tensor:
        """Layer i's values at the work blocks `rows`, then its tail (None: the layer, a view)."""
        if rows is None:
            return flat
        blocks = self._rows(flat, i, rows)
        end = self._blocks[i] * WORK_BLOCK
        return blocks if end == self._sizes[i] else torch.cat([blocks, flat[end:]])

    def scale(self, i: int) -> float:
        """What layer i's dot on the values `take` returns is multiplied by where it has no tail
        (nb/kb; 1 for a layer read whole or with a tail, which `weight` weighs value by value)."""
        return self._blocks[i] / self._kept if self._blocks[i] and not self._tails[i] else 1.0

    def weight(self, i: int) -> torch.Tensor | None:
        """Per value taken by `take`, what it stands for in layer i's dot, where the layer has a
        tail (nb/kb on the blocks, 1 on the tail); None where `scale` says it."""
        return self._weights[i]

    def nbytes(self) -> int:
        """Bytes held on the device: the fixed blocks and the weights of the layers with a tail."""
        held = [w for w in self._weights if isinstance(w, torch.Tensor)]
        if self._drawn:
            held += [self._all_base, self._modulus, self._range]
        return sum(t.numel() * t.element_size() for t in held)

    def _rows(self, flat: torch.Tensor, i: int, rows: torch.Tensor) -> torch.Tensor:
        nb = self._blocks[i]
        return flat[: nb * WORK_BLOCK].view(nb, WORK_BLOCK).index_select(0, rows).view(-1)


def _base(name: str, blocks: int, kept: int, seed: int, device: torch.device) -> torch.Tensor:
    """A layer's fixed, seeded blocks (sorted block numbers, int32), seeded by its name."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    return torch.randperm(blocks, generator=gen)[:kept].sort().values.to(device=device, dtype=torch.int32)
