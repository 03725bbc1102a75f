"""Pictures of a run's thermodynamics (matplotlib, the `plot` extra).

`phase_figure` draws, from a series of readings: the phase diagram (energy against entropy,
whose slope is the temperature), each layer's temperature over the steps, and each activation
site's efficiency with its engine type.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from thermoscope.agent.derive import Reading


def phase_figure(readings: Sequence[Reading], path: str | Path, title: str = "") -> Path:
    """Write the figure to `path` (PNG or SVG by its suffix) and return the path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise RuntimeError("plotting needs matplotlib: pip install 'thermoscope[plot]'") from exc
    if len(readings) < 2:
        raise ValueError("a figure needs at least two readings")
    steps = np.array([r.step for r in readings])
    fig, (phase, temps, sites) = plt.subplots(1, 3, figsize=(15, 4.4), constrained_layout=True)

    entropy = np.array([r.entropy for r in readings])
    energy = np.array([r.energy for r in readings])
    points = phase.scatter(entropy, energy, c=steps, cmap="viridis", s=12)
    phase.plot(entropy, energy, color="0.7", lw=0.6, zorder=0)
    phase.set(xlabel="entropy S (nats)", ylabel="energy E (loss)", title="phase diagram: slope dE/dS = T")
    fig.colorbar(points, ax=phase, label="step")
    phase.tick_params(axis="x", labelrotation=30)

    layer_t = np.array([r.layer_temperature for r in readings])
    for j, name in enumerate(readings[-1].layer_names):
        if np.isfinite(layer_t[:, j]).any():
            temps.plot(steps, layer_t[:, j], lw=1, label=name)
    temps.axhline(0, color="0.5", lw=0.6)
    temps.set_yscale("symlog", linthresh=1e-4)
    temps.set(xlabel="step", ylabel="T_l (loss per nat)", title="layer temperatures (gaps: undefined)")
    temps.legend(fontsize=7, loc="best")

    eta = np.array([r.site_efficiency for r in readings])
    last = readings[-1]
    for j, name in enumerate(last.site_names):
        engine = {"A": "type A", "B": "type B"}.get(str(last.site_engine[j]), "type ?")
        sites.plot(steps, eta[:, j], lw=1.2, label=f"{name}: {engine}")
    sites.axhline(0.5 + 1 / (2 * np.pi), color="0.5", lw=0.6, ls="--", label="ReLU on Gaussian z")
    sites.set(
        xlabel="step", ylabel="eta = 1 - Var(a)/Var(z)", title="activation-site efficiency", ylim=(0, 1)
    )
    sites.legend(fontsize=7, loc="best")

    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
