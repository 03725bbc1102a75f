"""Which layers a sample counts histograms of, and the device-side plans that count them.

Each sample counts the histograms of one share of the layers (`shares`: a deterministic split of
the layer table into SHAPE_EVERY shares of about equal size, the same on every rank), so that no
sample costs much more than another; a share is counted in groups of at most HISTOGRAM_GROUP
values (`HistogramShare`), so that the per-value temporaries stay small.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from thermoscope.science.stats import LayerInfo


def shares(sizes: Sequence[int], count: int) -> list[list[int]]:
    """The layers (indices into sizes) split into `count` shares of about equal total size
    (largest first, each to the lightest share so far), each share in layer order.

    A deterministic function of the layer table (full sizes, not a rank's shard), so that every
    rank of a job counts the same layers' histograms on the same sample, and the collector adds
    whole histograms."""
    load = [0] * count
    members: list[list[int]] = [[] for _ in range(count)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        k = min(range(count), key=lambda k: (load[k], k))
        load[k] += sizes[i]
        members[k].append(i)
    return [sorted(m) for m in members]


#: The most values a histogram counts in one go (`Sampler._histogram`).
HISTOGRAM_GROUP = 1 << 18


class HistogramShare:
    """One share of the layers, in groups of layers counted together (at most HISTOGRAM_GROUP
    values each, or one layer), and what counting them needs on the device, made once: a
    host-to-device copy during a step would make CUDA wait. `counted`: per layer of the table."""

    def __init__(
        self, layers: list[int], counted: list[int], table: list[LayerInfo], bins: int, device: torch.device
    ) -> None:
        self.layers = layers
        self.groups: list[HistogramGroup] = []
        members: list[int] = []
        for i in layers:
            if members and sum(counted[j] for j in members) + counted[i] > HISTOGRAM_GROUP:
                self.groups.append(HistogramGroup(members, counted, table, bins, device))
                members = []
            members.append(i)
        if members:
            self.groups.append(HistogramGroup(members, counted, table, bins, device))

    def nbytes(self) -> int:
        return sum(g.nbytes() for g in self.groups)


class HistogramGroup:
    """Layers counted together, per layer: how many values it counts, its slot offset (its row in
    the full histogram), lo and bins per unit."""

    def __init__(
        self, layers: list[int], counted: list[int], table: list[LayerInfo], bins: int, device: torch.device
    ) -> None:
        self.layers = layers
        self.total = sum(counted[i] for i in layers)
        self.counted = torch.tensor([counted[i] for i in layers], dtype=torch.long).to(device)
        self.offset = torch.tensor(layers, dtype=torch.long).to(device) * (bins + 2) + 1
        self.lo = torch.tensor([table[i].hist_lo for i in layers], device=device)
        self.scale = torch.tensor(
            [bins / (table[i].hist_hi - table[i].hist_lo) for i in layers], device=device
        )

    def per_value(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(lo, bins per unit, slot offset) of each counted value, the layers end to end: made at
        each count rather than held (they would hold 16 bytes per counted value)."""
        lo, scale, offset = (
            t.repeat_interleave(self.counted, output_size=self.total)
            for t in (self.lo, self.scale, self.offset)
        )
        return lo, scale, offset

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.counted, self.offset, self.lo, self.scale))
