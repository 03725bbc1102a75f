"""`Recorder`: each job's recent readings, in memory and bounded, for the web page.

The page must draw a job's energy and temperature from its first step, with or without a
database, and the HTTP threads must not share the store's one connection with the event loop.
So the collector hands every merged reading here too (on its event loop), and a job keeps at
most `MAX_POINTS` points: when full, every other point is dropped and only every other later
step is kept (its stride doubles), so a long run is drawn whole at a coarser step. Per-layer
values are kept for the first `MAX_LAYERS` layers (the heatmap's rows); a job whose steps start
over (a new run under its id) starts a new trace; jobs the collector let go are forgotten when a
new one comes.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from thermoscope.science.derive import Reading

#: Points a job keeps (beyond it, every other is dropped and the stride doubles).
MAX_POINTS = 600
#: Layers whose per-layer values a point keeps (the heatmap's rows).
MAX_LAYERS = 64


def number(x: float) -> float | None:
    """A float for JSON: None where it is undefined (NaN, infinite)."""
    x = float(x)
    return x if math.isfinite(x) else None


@dataclass
class Trace:
    """One job's kept points, columns side by side (`columns` copies them for a reader)."""

    layer_names: tuple[str, ...] = ()
    stride: int = 1
    seen: int = 0  # readings offered, kept or not
    step: list[int] = field(default_factory=list)
    time: list[float] = field(default_factory=list)
    energy: list[float | None] = field(default_factory=list)
    temperature: list[float | None] = field(default_factory=list)
    temperature_low: list[float | None] = field(default_factory=list)
    temperature_high: list[float | None] = field(default_factory=list)
    layer_entropy_change: list[list[float | None]] = field(default_factory=list)

    def add(self, reading: Reading) -> None:
        self.seen += 1
        if (self.seen - 1) % self.stride:
            return
        names = reading.layer_names[:MAX_LAYERS]
        if names != self.layer_names:  # a new layer table: its rows start over
            self.layer_names = names
            self.layer_entropy_change = [[None] * len(names) for _ in self.step]
        change = reading.layer_entropy_change
        row = [None] * len(names) if change is None else [number(x) for x in np.asarray(change)[: len(names)]]
        self.step.append(int(reading.step))
        self.time.append(float(reading.wall_time))
        self.energy.append(number(reading.energy))
        self.temperature.append(number(reading.temperature))
        self.temperature_low.append(number(reading.temperature_low))
        self.temperature_high.append(number(reading.temperature_high))
        self.layer_entropy_change.append(row)
        if len(self.step) >= MAX_POINTS:
            for column in self._columns():
                del column[1::2]
            self.stride *= 2

    def _columns(self) -> tuple[list, ...]:
        return (
            self.step,
            self.time,
            self.energy,
            self.temperature,
            self.temperature_low,
            self.temperature_high,
            self.layer_entropy_change,
        )

    def columns(self) -> dict[str, object]:
        """A copy, as the API sends it."""
        return {
            "step": list(self.step),
            "time": list(self.time),
            "energy": list(self.energy),
            "temperature": list(self.temperature),
            "temperature_low": list(self.temperature_low),
            "temperature_high": list(self.temperature_high),
            "layer_names": list(self.layer_names),
            "layer_entropy_change": [list(row) for row in self.layer_entropy_change],
        }


class Recorder:
    """Every job's `Trace`, written on the event loop (`record`), read by the HTTP threads."""

    def __init__(self, jobs: Mapping[str, object]) -> None:
        """`jobs`: the collector's job table, to forget the traces of jobs it let go."""
        self._jobs = jobs
        self._traces: dict[str, Trace] = {}
        self._lock = threading.Lock()

    def record(self, job_id: str, reading: Reading) -> None:
        """Keep the reading (an `on_reading` callback)."""
        with self._lock:
            trace = self._traces.get(job_id)
            if trace is not None and trace.step and reading.step <= trace.step[-1]:
                trace = None  # a new run of the job (or its steps started over): drawn from its start
            if trace is None:
                for gone in [j for j in self._traces if j not in self._jobs]:
                    del self._traces[gone]
                trace = self._traces[job_id] = Trace()
            trace.add(reading)

    def history(self, job_id: str) -> dict[str, object] | None:
        """The job's kept points (None: none yet)."""
        with self._lock:
            trace = self._traces.get(job_id)
            return None if trace is None else trace.columns()
