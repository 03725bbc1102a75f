"""`thermoscope plot`: a job's run drawn from the history its collector kept."""

from __future__ import annotations

import itertools
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from thermoscope.agent import Monitor
from thermoscope.collector.service import Collector
from thermoscope.collector.state.store import EventStore
from thermoscope.science.derive import Reading

from helpers.processes import thermoscope
from helpers.training import train_steps


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk (and proof that it is a PNG)."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def stream_run(db: Path, steps: int, history_interval: float) -> Reading:
    """A real monitored run streamed to a real collector that keeps its history in `db`."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with Collector("127.0.0.1:0", "127.0.0.1:0", db=db, history_interval=history_interval).running() as c:
        monitor = Monitor(model, opt, collector=c.grpc_target, job="hist", every=2)
        train_steps(monitor, model, opt, steps)
        assert monitor.flush(10)
        monitor.close()
        expected = c.jobs["hist"].reading
    return expected


def test_the_collector_keeps_every_merged_reading_in_its_history(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    last = stream_run(db, 40, history_interval=0)
    store = EventStore(db, create=False)
    history = store.history("hist")
    store.close()
    assert history.step.tolist() == list(range(0, 40, 2))
    assert history.layer_names == ("0.weight", "0.bias", "2.weight", "2.bias")
    assert history.energy[-1] == last.energy and history.entropy[-1] == last.entropy
    # undefined temperatures come back as NaN, the rest bit for bit
    assert np.array_equal(history.layer_temperature[-1], last.layer_temperature, equal_nan=True)
    assert math.isnan(history.temperature[0]) and not history.energy_from_work
    # what is measurable where a temperature is not: each layer's work share and entropy change
    assert np.array_equal(history.layer_work_share[-1], last.layer_work_share, equal_nan=True)
    assert np.array_equal(history.layer_entropy_change[-1], last.layer_entropy_change, equal_nan=True)
    # "2.bias" holds one value: no spread, so no entropy reading (the variance floor), nor a change
    assert np.isfinite(history.layer_entropy_change[1:, :3]).all()
    assert np.isnan(history.layer_entropy_change[:, 3]).all()


def test_the_history_keeps_one_row_per_interval(tmp_path: Path) -> None:
    db = tmp_path / "t.db"
    stream_run(db, 40, history_interval=3600)
    store = EventStore(db, create=False)
    assert store.history("hist").step.tolist() == [0]  # the run took far less than an hour
    store.close()


@pytest.mark.slow
def test_plot_draws_a_demo_run_with_its_transitions(tmp_path: Path) -> None:
    db, figure = tmp_path / "demo.db", tmp_path / "run.png"
    assert thermoscope("demo", "--steps", "400", "--db", str(db)).returncode == 0
    result = thermoscope("plot", "--db", str(db), "--out", str(figure))
    assert result.returncode == 0, result.stderr
    assert f"figure written to {figure}" in result.stdout
    width, height = png_size(figure)
    assert width > 1000 and height > 300


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--db", "{tmp}/none.db"], "plot: no event database at"),
        (["--db", "{tmp}/t.db", "--job", "nobody"], "plot: no history of job 'nobody'"),
        (["--db", "{tmp}/junk.db"], "is not a Thermoscope database"),
    ],
)
def test_plot_says_what_is_wrong_with_its_input(tmp_path: Path, args: list[str], message: str) -> None:
    EventStore(tmp_path / "t.db").close()
    (tmp_path / "junk.db").write_bytes(b"not sqlite at all" * 100)
    result = thermoscope("plot", *(a.format(tmp=tmp_path) for a in args), "--out", str(tmp_path / "x.png"))
    assert result.returncode == 2 and message in result.stderr
    assert not (tmp_path / "x.png").exists()


def texts_shown(fig) -> dict[str, list]:
    """Each group of a drawn figure's texts that must not overlap among themselves, with their
    extents in pixels: each axis's tick labels, each axes' notes (titles, annotations, legends)."""
    fig.draw_without_rendering()  # (constrained layout places everything at a draw)
    renderer = fig.canvas.get_renderer()
    groups: dict[str, list] = {}
    for i, ax in enumerate(fig.axes):
        for which, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            lo, hi = sorted(axis.get_view_interval())
            ticks = [
                label
                for locs, labels in (
                    (axis.get_majorticklocs(), axis.get_majorticklabels()),
                    (axis.get_minorticklocs(), axis.get_minorticklabels()),
                )
                for loc, label in zip(locs, labels, strict=False)
                if lo <= loc <= hi  # (ticks beyond the view are kept, not drawn)
            ]
            groups[f"axes {i} {which} ticks"] = [t for t in ticks if t.get_visible() and t.get_text()]
        legend = ax.get_legend()
        notes = [ax.title, *ax.texts, *(legend.get_texts() if legend is not None else [])]
        groups[f"axes {i} notes"] = [t for t in notes if t.get_visible() and t.get_text()]
    return {
        name: [(t.get_text(), t.get_window_extent(renderer)) for t in texts] for name, texts in groups.items()
    }


@pytest.mark.slow
def test_plot_of_a_600_step_run_writes_every_label_whole_and_apart(tmp_path: Path) -> None:
    """At step 600 the demo's transitions came close (300 -> refresh, 330 -> transition): their
    labels overlapped, a layer's name ran off the figure, a log axis's minor labels piled up."""
    from thermoscope.cli.plot import history_drawing

    db = tmp_path / "demo.db"
    assert thermoscope("demo", "--steps", "600", "--db", str(db)).returncode == 0
    store = EventStore(db, create=False)
    try:
        fig = history_drawing(store.history("demo"), store.query(job="demo"))
    finally:
        store.close()
    page = fig.bbox
    for group, texts in texts_shown(fig).items():
        for text, box in texts:
            assert page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1, (
                f"{group}: {text!r} is cut at the figure's edge"
            )
        for (a, box_a), (b, box_b) in itertools.combinations(texts, 2):
            assert not box_a.overlaps(box_b), f"{group}: {a!r} overlaps {b!r}"
