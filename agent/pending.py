"""A sampled step on its way to the host, and its unpacking into a `Sample`.

The sampler packs a sampled step into one float64 tensor, in this order: per layer its sum, sum of
squares, the two work dots and its update's sum of squares (`LAYER_COLUMNS` rows), per site the
mean and M2 of its input and its output and its probe spread (`SITE_COLUMNS` rows), the histograms
when the step counted any, and the loss when it is a tensor; the copy to the host runs while
training goes on, and `Pending.to_sample` (on the sender thread, or in-process at `latest()`) waits
for it and turns it into the wire's `Sample`."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from thermoscope.science.stats import LayerStats, Sample, SiteStats

LAYER_COLUMNS = 5  # sum, sum of squares, <g, theta_t>, <g, theta_{t+1}>, sum (theta_{t+1} - theta_t)^2
SITE_COLUMNS = 5  # mean z, M2 z, mean a, M2 a, probe spread (the counts stay on the host)


@dataclass
class Pending:
    """A sampled step on its way to the host: read it with `to_sample` (may wait for the copy)."""

    step: int
    wall_time: float
    packed: torch.Tensor
    ready: torch.cuda.Event | None
    layer_count: np.ndarray
    site_count: np.ndarray
    bins: int
    has_histogram: bool
    energy: float | None  # known on the host already, else the last packed value

    def to_sample(self) -> Sample:
        if self.ready is not None:
            self.ready.synchronize()
        values = self.packed.numpy()
        n_layers, n_sites = len(self.layer_count), len(self.site_count)
        hist_size = n_layers * (self.bins + 2) if self.has_histogram else 0
        layer, site, hist = np.split(
            values[: n_layers * LAYER_COLUMNS + n_sites * SITE_COLUMNS + hist_size],
            [n_layers * LAYER_COLUMNS, n_layers * LAYER_COLUMNS + n_sites * SITE_COLUMNS],
        )
        layer = layer.reshape(LAYER_COLUMNS, n_layers)
        site = site.reshape(SITE_COLUMNS, n_sites)
        count = self.layer_count.astype(np.float64)
        mean = layer[0] / np.maximum(count, 1)
        with np.errstate(
            divide="ignore", invalid="ignore"
        ):  # a diverged run has inf here: the wire refuses it
            m2 = np.maximum(layer[1] - count * mean * mean, 0.0)
        return Sample(
            step=self.step,
            wall_time=self.wall_time,
            energy=float(values[-1]) if self.energy is None else self.energy,
            layers=LayerStats(
                count=self.layer_count,
                mean=mean,
                m2=m2,
                dot_before=layer[2].copy(),
                dot_after=layer[3].copy(),
                histogram=hist.reshape(n_layers, self.bins + 2).astype(np.int64) if hist_size else None,
                update_sq=layer[4].copy(),
            ),
            sites=SiteStats(
                count=self.site_count,
                in_mean=site[0].copy(),
                in_m2=site[1].copy(),
                out_mean=site[2].copy(),
                out_m2=site[3].copy(),
                probe_spread=site[4].copy(),
            ),
        )
