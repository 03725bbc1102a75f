"""Pictures of a run's thermodynamics (matplotlib, the `plot` extra).

`phase_figure` draws a live run from its readings (`thermoscope demo --figure`): the phase
diagram (energy against entropy, whose slope is the temperature), each layer's temperature
over the steps with its +-1 standard error band, what is measurable of each layer where its
temperature is not (its share of the work against its entropy change), and each activation
site's efficiency with its engine type. `history_figure` draws a run from the collector's
database (`thermoscope plot`): the phase diagram, the energy over the steps shaded by the job's
phase, each layer's temperature (the history keeps no standard errors: no band), with the job's
transitions marked on all three, and what is measurable of each layer at the last row. An
undefined temperature is a gap in its line.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from thermoscope.collector.state.store import Event, EventStore, History
from thermoscope.science.derive import Reading
from thermoscope.wire.codec import WALL_TIME_AHEAD

#: Colors of the job's phases (docs/science.md section 6), shared by the bands and the markers.
PHASE_COLORS = {
    "type_i": "#9e9e9e",
    "transition": "#1f77b4",
    "type_ii": "#2ca02c",
    "refresh": "#ff7f0e",
    "unstable": "#d62728",
}


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise RuntimeError("plotting needs matplotlib: pip install 'thermoscope[plot]'") from exc
    return plt


def _plt_ticker():
    import matplotlib.ticker

    return matplotlib.ticker


def _phase_legend(ax, phases: Sequence[str]) -> None:
    """Which color is which phase, once each (a label at every transition overlapped the next one's
    when two came close: 300 -> refresh, 330 -> transition in the demo)."""
    from matplotlib.patches import Patch

    seen = list(dict.fromkeys(phases))
    handles = [Patch(color=PHASE_COLORS.get(p, "0.3"), label=p) for p in seen]
    ax.legend(handles=handles, fontsize=7, loc="best", title="phase entered", title_fontsize=7)


def _phase_diagram(ax, fig, steps: np.ndarray, entropy: np.ndarray, energy: np.ndarray, ylabel: str) -> None:
    points = ax.scatter(entropy, energy, c=steps, cmap="viridis", s=12)
    ax.plot(entropy, energy, color="0.7", lw=0.6, zorder=0)
    ax.set(xlabel="entropy S (nats)", ylabel=ylabel, title="phase diagram: slope dE/dS = T")
    fig.colorbar(points, ax=ax, label="step")
    ax.tick_params(axis="x", labelrotation=30)


def _layer_temperatures(
    ax, steps: np.ndarray, names: Sequence[str], layer_t: np.ndarray, layer_err: np.ndarray | None = None
) -> None:
    """Each layer's T over the steps: an undefined T (NaN) is a gap in its line; with standard
    errors, a +-1 standard error band where it is defined."""
    for j, name in enumerate(names):
        t = layer_t[:, j]
        if not np.isfinite(t).any():
            continue
        (line,) = ax.plot(steps, t, lw=1, label=name)
        if layer_err is not None:
            err = layer_err[:, j]
            band = np.isfinite(t) & np.isfinite(err)
            ax.fill_between(steps, t - err, t + err, where=band, color=line.get_color(), alpha=0.2, lw=0)
    ax.axhline(0, color="0.5", lw=0.6)
    ax.set_yscale("symlog", linthresh=1e-4)
    title = "layer temperatures " + ("+- 1 s.e. " if layer_err is not None else "") + "(gaps: undefined)"
    ax.set(xlabel="step", ylabel="T_l (loss per nat)", title=title)
    if len(names) <= 20:
        ax.legend(fontsize=7, loc="best")


def _measurable(
    ax,
    step: int,
    names: Sequence[str],
    temperature: np.ndarray,
    share: np.ndarray | None,
    change: np.ndarray | None,
) -> None:
    """What is measurable of each layer at `step`, where its T is not: its share of the window's
    work against its entropy change. Filled: T defined; hollow: undefined, which a layer doing a
    small share of the work is (its work is lost in its noise)."""
    if share is None or change is None or not np.isfinite(share).any():  # kept by no release before
        ax.set_title("what is measurable: not kept for this run")
        return
    defined = np.isfinite(temperature)
    for mask, style in ((defined, {"color": "C3"}), (~defined, {"facecolors": "none", "edgecolors": "0.4"})):
        label = "T defined" if mask is defined else "T undefined"
        ax.scatter(np.maximum(share[mask], 1e-6), change[mask], s=18, label=label, **style)
    for k, j in enumerate(np.argsort(-np.nan_to_num(share))[:5]):  # the layers doing the most work,
        # named in the legend (a name written at its point ran off the axes and over its neighbours')
        ax.scatter(max(share[j], 1e-6), change[j], s=60, marker="+x*^v"[k], color="k", lw=0.8, label=names[j])
    ax.axhline(0, color="0.5", lw=0.6)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(_plt_ticker().NullFormatter())  # a narrow log range labelled them all
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set(xlabel="share of the window's |work|", ylabel="ΔS_l over the window (nats)")
    ax.set_title(f"what is measurable, step {step}")
    ax.margins(x=0.1, y=0.1)  # a point at the edge is drawn whole
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside the points, not on them


def _save(fig, plt, path: str | Path, title: str) -> Path:
    if title:
        fig.suptitle(title)
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def phase_figure(readings: Sequence[Reading], path: str | Path, title: str = "") -> Path:
    """Write the figure to `path` (PNG or SVG by its suffix) and return the path."""
    plt = _pyplot()
    if len(readings) < 2:
        raise ValueError("a figure needs at least two readings")
    steps = np.array([r.step for r in readings])
    fig, (phase, temps, measurable, sites) = plt.subplots(1, 4, figsize=(20, 4.4), constrained_layout=True)
    energy = np.array([r.energy for r in readings])
    _phase_diagram(phase, fig, steps, np.array([r.entropy for r in readings]), energy, "energy E (loss)")
    _layer_temperatures(
        temps,
        steps,
        readings[-1].layer_names,
        np.array([r.layer_temperature for r in readings]),
        np.array([r.layer_temperature_stderr for r in readings]),
    )

    last = readings[-1]
    _measurable(
        measurable,
        last.step,
        last.layer_names,
        last.layer_temperature,
        last.layer_work_share,
        last.layer_entropy_change,
    )

    eta = np.array([r.site_efficiency for r in readings])
    for j, name in enumerate(last.site_names):
        engine = {"A": "type A", "B": "type B"}.get(str(last.site_engine[j]), "type ?")
        sites.plot(steps, eta[:, j], lw=1.2, label=f"{name}: {engine}")
    sites.axhline(0.5 + 1 / (2 * np.pi), color="0.5", lw=0.6, ls="--", label="ReLU on Gaussian z")
    sites.set(
        xlabel="step", ylabel="eta = 1 - Var(a)/Var(z)", title="activation-site efficiency", ylim=(0, 1)
    )
    sites.legend(fontsize=7, loc="best")
    return _save(fig, plt, path, title)


def history_figure(history: History, events: Sequence[Event], path: str | Path) -> Path:
    """The run of one job from its stored history and job-scope transitions (see module docstring)."""
    plt = _pyplot()
    fig = history_drawing(history, events)
    return _save(fig, plt, path, "")


def history_drawing(history: History, events: Sequence[Event]):
    """`history_figure`'s matplotlib figure, before it is written (what its labels are is testable)."""
    plt = _pyplot()
    if len(history.step) < 2:
        raise ValueError(f"job {history.job!r} has {len(history.step)} history row(s); a figure needs two")
    steps = history.step
    ylabel = "energy: cumulative work (loss)" if history.energy_from_work else "energy E (loss)"
    fig, (phase, energy, temps, measurable) = plt.subplots(1, 4, figsize=(21, 4.6), constrained_layout=True)
    _phase_diagram(phase, fig, steps, history.entropy, history.energy, ylabel)
    _layer_temperatures(temps, steps, history.layer_names, history.layer_temperature)
    share, change = history.layer_work_share, history.layer_entropy_change
    _measurable(
        measurable,
        int(steps[-1]),
        history.layer_names,
        history.layer_temperature[-1],
        None if share is None else share[-1],
        None if change is None else change[-1],
    )

    energy.plot(steps, history.energy, color="k", lw=0.9)
    energy.set(xlabel="step", ylabel=ylabel, title="energy, shaded by the job's phase")
    changes = [e for e in events if e.scope == "job"]
    bounds = [steps[0], *(e.step for e in changes), steps[-1]]
    phases = ["type_i", *(e.to for e in changes)]
    for (start, end), phase_name in zip(itertools.pairwise(bounds), phases, strict=True):
        energy.axvspan(start, end, color=PHASE_COLORS.get(phase_name, "0.8"), alpha=0.18, lw=0)
    for e in changes:
        color = PHASE_COLORS.get(e.to, "0.3")
        i = min(int(np.searchsorted(steps, e.step)), len(steps) - 1)  # the first row at or after it
        phase.scatter(
            history.entropy[i], history.energy[i], s=90, facecolors="none", edgecolors=color, lw=1.8
        )
        for ax in (energy, temps):
            ax.axvline(e.step, color=color, lw=1, ls="--")
    if changes:
        _phase_legend(phase, [e.to for e in changes])
        _phase_legend(energy, phases)
    fig.suptitle(f"thermoscope: job {history.job}, steps {steps[0]}-{steps[-1]}")
    return fig


def plot_job(db: str | Path, job: str | None, out: str | Path) -> Path:
    """`thermoscope plot`: draw `job` (default: the newest) from the database at `db`.

    The newest job is the one with the newest history row stamped no later than the collector
    would accept now (`codec.WALL_TIME_AHEAD`): an older collector stored agents' wall times as
    sent, and a job stamped 1e300 by a broken clock is not the newest unless it is the only one
    (`--job` draws it anyway).
    """
    store = EventStore(db, create=False)
    try:
        job = job or store.latest_job(before=time.time() + WALL_TIME_AHEAD) or store.latest_job()
        if job is None:
            raise ValueError(f"{db} holds no job history yet")
        return history_figure(store.history(job), store.query(job=job), out)
    finally:
        store.close()
