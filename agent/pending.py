"""A sampled step on its way to the host, and its unpacking into a `Sample`.

The sampler packs a sampled step into one float64 tensor, in this order: per layer its sum, sum
of squares and the two work dots (`LAYER_COLUMNS` rows), per site its power sums and probe spread
(`SITE_COLUMNS` rows), the histograms when the step counted any, and the loss when it is a
tensor; the copy to the host runs while training goes on, and `Pending.to_sample` (on the sender
thread, or in-process at `latest()`) waits for it and turns it into the wire's `Sample`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from thermoscope.science.stats import LayerStats, Sample, SiteStats

LAYER_COLUMNS = 4  # sum, sum of squares, <g, theta_t>, <g, theta_{t+1}>
SITE_COLUMNS = 5  # sum z, sum z^2, sum a, sum a^2, probe spread (the counts stay on the host)


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
        n_site = self.site_count.astype(np.float64)
        with np.errstate(
            divide="ignore", invalid="ignore"
        ):  # a diverged run has inf here: the wire refuses it
            in_mean = np.where(n_site > 0, site[0] / n_site, 0.0)
            out_mean = np.where(n_site > 0, site[2] / n_site, 0.0)
            in_m2 = np.maximum(site[1] - n_site * in_mean * in_mean, 0.0)
            out_m2 = np.maximum(site[3] - n_site * out_mean * out_mean, 0.0)
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
            ),
            sites=SiteStats(
                count=self.site_count,
                in_mean=in_mean,
                in_m2=in_m2,
                out_mean=out_mean,
                out_m2=out_m2,
                probe_spread=site[4].copy(),
            ),
        )
