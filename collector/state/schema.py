"""The job state a checkpoint writes, as an explicit, versioned file format (format `FORMAT`).

A restarted collector resumes each run from what its last checkpoint wrote (checkpoint.py), so
this state is a file format that must outlive the classes that hold it: the pickles of earlier
releases named private attributes of live classes, and a rename made a database "start
afresh", dropping the no-loss guarantee across an upgrade. Here every value is written by name,
as plain data (numbers, strings, numpy arrays of numbers or strings). Each stateful object gives
its own and is made again from it (`to_state`, `from_state`: the thermometer, the phase detector,
the findings, a reading, a sample), under names that are the format's, not its attribute names: renaming an
attribute changes those two methods, never the format. This module adds the run's counters,
marks, pending samples and tables, and keeps what is the file's alone: its version, the
migrations from earlier formats, the archive. A state is a flat `.npz` archive (numpy's zip of
`.npy` arrays, read with `allow_pickle=False`: nothing in it can run code), one array per dotted
name (the thermometer's "energy" is "thermometer.energy"; "pending.layers.m2"), holding `format`
too. Values are bit-exact, NaN payloads included, so a resumed run reads exactly what it would
have read.

Reading: `FORMAT` directly; a state of a newer format, or one that cannot be decoded, raises
`StateError` (never "start afresh": the caller refuses the run, see checkpoint.py). The pickle
format of the releases before format 1 is converted once, when a database of theirs is opened
(legacy.py).

How the format evolves. A new field is an addition, not a new format: its object writes it in
`to_state`, and its `from_state` gives a state saved before it, which lacks it, a default (a new
thermometer's or detector's value, a reading's default or NaN); a new name of the run's own is
read here with a default when absent (as `first` is). A field a reader does not know is ignored,
not refused: additions keep `FORMAT`, so it is a later release's addition, met after a
rollback; everything this release keeps is in that state and resumes exactly, and what the
addition kept this release never had. Refusing would make every addition break a rollback
(which is what a new format is for). A change of meaning (a unit, a layout, a field that must
not be read without another) is no addition: a new `FORMAT`, which an older release refuses,
and a migration from the one before.
"""

from __future__ import annotations

import io
import zipfile
from collections import Counter
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

import numpy as np

from thermoscope.science import saved as checked
from thermoscope.science.derive import Reading, Thermometer
from thermoscope.science.detect import PhaseDetector
from thermoscope.science.findings import Findings
from thermoscope.science.stats import (
    OPTIONAL_LAYER_COLUMNS,
    LayerInfo,
    LayerStats,
    Sample,
    SiteInfo,
    SiteStats,
)

#: The version of the state this release writes, and the newest it reads.
FORMAT = 1
#: The most bytes a state's arrays may take, decompressed, all together (a collector's largest
#: run state, 10,000 layers with 64 ranks' samples pending, is under a tenth of it).
MAX_STATE_BYTES = 1 << 30
#: The names of a run's state (`Pipeline`, `Job`), written at every checkpoint ...
STATE = (
    "reading",
    "detector",
    "transitions",
    "last_transition_time",
    "frames_received",
    "frames_late",
    "frames_duplicate",
    "pending",
    "merged_step",
    "thermometer",
    "first",
    "findings",
)
#: ... and of its tables (`Declared`), written when an agent's first frame changed them.
TABLES = ("layers", "sites", "bins", "by_rank")

#: What `first` holds of each agent process (`job.Marks.first`): its frame 1.
FIRST = ("run", "rank", "step", "wall_time")

Plain = dict[str, np.ndarray]


class StateError(ValueError):
    """A stored state this collector cannot read: of a newer format, or damaged."""


# -- the archive ----------------------------------------------------------------------------------


def pack(values: Mapping[str, Any]) -> bytes:
    """One archive of `values` (nested dicts of plain data, None for absent) and `format`."""
    flat: Plain = {"format": np.asarray(FORMAT)}
    _flatten("", values, flat)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **flat)  # (the many small arrays' headers compress well)
    return buffer.getvalue()


def unpack(data: bytes) -> dict[str, Any]:
    """The nested values of an archive of format `FORMAT` (StateError otherwise)."""
    try:
        flat = _members(data)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise StateError(f"not a state archive ({exc})") from None
    version = int(flat.pop("format", -1))
    if version > FORMAT:
        raise StateError(f"written by a newer release (format {version}; this one reads up to {FORMAT})")
    if version < 1:
        raise StateError(f"no format version this release knows ({version})")
    nested: dict[str, Any] = {}
    for name, value in flat.items():
        *path, leaf = name.split(".")
        node = nested
        for part in path:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise StateError(f"not a state archive ({name} is below an array)")
        node[leaf] = value
    return nested


#: The `.npy` header readers, by the format versions numpy writes.
_HEADERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def _members(data: bytes) -> Plain:
    """The arrays of an archive, each read within `MAX_STATE_BYTES` in all: the zip's header
    says how large each member is decompressed, the `.npy` header how large its array is, and
    neither may be past what is left (zipfile reads no more of a member than its header says).
    Before, np.load decompressed whatever a member held: a 3.1 MB state took 3.1 GB."""
    flat: Plain = {}
    left = MAX_STATE_BYTES
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        for info in archive.infolist():
            if info.file_size > left:
                raise ValueError(f"{info.filename} is {info.file_size} bytes decompressed: over the bound")
            left -= info.file_size
            with archive.open(info) as member:
                version = np.lib.format.read_magic(member)
                if version not in _HEADERS:
                    raise ValueError(f"{info.filename}: .npy format {version}, not one numpy writes here")
                shape, fortran, dtype = _HEADERS[version](member)
                if dtype.hasobject:
                    raise ValueError(f"{info.filename} holds objects, not plain values")
                size = int(np.prod(shape, dtype=object)) * dtype.itemsize
                if size > info.file_size - member.tell():
                    raise ValueError(f"{info.filename}: its array ({size} bytes) is larger than the member")
                raw = member.read(size)
            if len(raw) != size:
                raise ValueError(f"{info.filename}: {len(raw)} bytes of an array of {size}")
            array = np.frombuffer(bytearray(raw), dtype=dtype)  # (writable, as np.load's)
            flat[info.filename.removesuffix(".npy")] = array.reshape(shape, order="F" if fortran else "C")
    return flat


def _flatten(prefix: str, values: Mapping[str, Any], out: Plain) -> None:
    for name, value in values.items():
        key = f"{prefix}{name}"
        if value is None:
            continue
        if isinstance(value, Mapping):
            _flatten(key + ".", value, out)
        else:
            out[key] = np.asarray(value)


def _strings(values: Any) -> np.ndarray:
    return np.array(list(values), dtype=np.str_)


# -- the run's state ------------------------------------------------------------------------------


def encode_state(values: Mapping[str, Any]) -> bytes:
    """The archive of a run's `STATE` (the live values, by name)."""
    transitions: Counter[tuple[str, str]] = values["transitions"]
    pending: dict[int, dict[int, Sample]] = values["pending"]
    return pack(
        {
            "reading": _state(values["reading"]),
            "detector": _state(values["detector"]),
            "transitions": {
                "from": _strings(a for a, _ in transitions),
                "to": _strings(b for _, b in transitions),
                "count": np.array(list(transitions.values()), dtype=np.int64),
            },
            "last_transition_time": values["last_transition_time"],
            "frames_received": values["frames_received"],
            "frames_late": values["frames_late"],
            "frames_duplicate": values["frames_duplicate"],
            "pending": _pending(pending),
            "merged_step": values["merged_step"],
            "thermometer": _state(values["thermometer"]),
            "findings": _state(values["findings"]),
            "first": {
                "run": _strings(run for run, _ in values["first"]),
                "rank": np.array([rank for _, rank in values["first"]], dtype=np.int64),
                "step": np.array([step for step, _ in values["first"].values()], dtype=np.int64),
                "wall_time": np.array([t for _, t in values["first"].values()], dtype=np.float64),
            },
        }
    )


def decode_state(data: bytes) -> dict[str, Any]:
    """The live values of `STATE` from an archive (StateError if it cannot be read)."""
    v = unpack(data)
    try:
        t = v.get("transitions", {})
        transitions = Counter(
            {
                (str(a), str(b)): int(n)
                for a, b, n in zip(t.get("from", ()), t.get("to", ()), t.get("count", ()), strict=True)
            }
        )
        last = v.get("last_transition_time")
        f = v.get("first", {})  # (absent from the states of format 1 written before it was added)
        return {
            "reading": _restored(Reading, v.get("reading")),
            "detector": _restored(PhaseDetector, v.get("detector")),
            "transitions": transitions,
            "last_transition_time": None if last is None else float(last),
            "frames_received": int(v["frames_received"]),
            "frames_late": int(v["frames_late"]),
            "frames_duplicate": int(v["frames_duplicate"]),
            "pending": _from_pending(v.get("pending", {})),
            "merged_step": int(v["merged_step"]),
            "thermometer": _restored(Thermometer, v.get("thermometer")),
            "findings": _restored(Findings, v.get("findings")),  # (absent before findings were added)
            "first": {
                (str(run), int(rank)): (int(step), float(t))
                for run, rank, step, t in zip(*(f.get(k, ()) for k in FIRST), strict=True)
            },
        }
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise StateError(f"a damaged state ({type(exc).__name__}: {exc})") from None


def encode_tables(values: Mapping[str, Any]) -> bytes:
    """The archive of a run's `TABLES` (`Declared`: by name, and each rank's)."""
    return pack(
        {
            "layers": _layers(values["layers"].values()),
            "sites": _sites(values["sites"].values()),
            "bins": values["bins"],
            "by_rank": {
                str(rank): {"layers": _layers(layers), "sites": _sites(sites)}
                for rank, (layers, sites) in values["by_rank"].items()
            },
        }
    )


def decode_tables(data: bytes) -> dict[str, Any]:
    """The live values of `TABLES` from an archive (StateError if it cannot be read)."""
    v = unpack(data)
    try:
        layers, sites = _from_layers(v.get("layers", {})), _from_sites(v.get("sites", {}))
        by_rank = {
            int(rank): (_from_layers(t.get("layers", {})), _from_sites(t.get("sites", {})))
            for rank, t in sorted(v.get("by_rank", {}).items(), key=lambda item: int(item[0]))
        }
        return {
            "layers": {layer.name: layer for layer in layers},
            "sites": {site.name: site for site in sites},
            "bins": int(v["bins"]),
            "by_rank": by_rank,
        }
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise StateError(f"damaged tables ({type(exc).__name__}: {exc})") from None


# -- the tables, the pending samples, and the objects that save their own state --------------------


def _layers(layers: Any) -> dict[str, np.ndarray]:
    layers = list(layers)
    return {
        "name": _strings(x.name for x in layers),
        "ndim": np.array([len(x.shape) for x in layers], dtype=np.int64),
        "dims": np.array([d for x in layers for d in x.shape], dtype=np.int64),
        "numel": np.array([x.numel for x in layers], dtype=np.int64),
        "dtype": _strings(x.dtype for x in layers),
        "shard_index": np.array([x.shard_index for x in layers], dtype=np.int64),
        "shard_count": np.array([x.shard_count for x in layers], dtype=np.int64),
        "hist_lo": np.array([x.hist_lo for x in layers], dtype=np.float64),
        "hist_hi": np.array([x.hist_hi for x in layers], dtype=np.float64),
    }


def _from_layers(v: Mapping[str, np.ndarray]) -> list[LayerInfo]:
    if "name" not in v:
        return []
    ends = np.cumsum(v["ndim"]).tolist()
    dims = v["dims"].tolist()
    shapes = [tuple(dims[end - n : end]) for n, end in zip(v["ndim"].tolist(), ends, strict=True)]
    return [
        LayerInfo(str(name), shape, int(numel), str(dtype), int(index), int(count), float(lo), float(hi))
        for name, shape, numel, dtype, index, count, lo, hi in zip(
            v["name"], shapes, v["numel"], v["dtype"], v["shard_index"], v["shard_count"],
            v["hist_lo"], v["hist_hi"], strict=True,
        )
    ]  # fmt: skip


def _sites(sites: Any) -> dict[str, np.ndarray]:
    sites = list(sites)
    return {
        "name": _strings(x.name for x in sites),
        "kind": _strings(x.kind for x in sites),
        "function": _strings(x.function for x in sites),
    }


def _from_sites(v: Mapping[str, np.ndarray]) -> list[SiteInfo]:
    if "name" not in v:
        return []
    functions = v.get("function", [""] * len(v["name"]))  # saved before sites said their function
    return [
        SiteInfo(str(name), str(kind), str(function))
        for name, kind, function in zip(v["name"], v["kind"], functions, strict=True)
    ]


#: The per-row columns of a sample, by the part of it that holds them.
_COLUMNS = {
    "layers": [f.name for f in fields(LayerStats) if f.name not in OPTIONAL_LAYER_COLUMNS],
    "sites": [f.name for f in fields(SiteStats)],
}


def _pending(pending: Mapping[int, Mapping[int, Sample]]) -> dict[str, Any]:
    """Every pending sample, stacked: one array per column for all of them, with each sample's
    step, rank and row counts. (One archive member per field, not per sample: a checkpoint with
    30 steps pending would otherwise write ~600 members, and zip's per-member cost dominated the
    collector's CPU at peak ingest.)"""
    samples = [(step, rank, s) for step, parts in pending.items() for rank, s in parts.items()]
    taken = [s for _, _, s in samples if s.layers.histogram is not None]
    out: dict[str, Any] = {
        "step": np.array([step for step, _, _ in samples], dtype=np.int64),
        "rank": np.array([rank for _, rank, _ in samples], dtype=np.int64),
        "wall_time": np.array([s.wall_time for _, _, s in samples], dtype=np.float64),
        "energy": np.array([s.energy for _, _, s in samples], dtype=np.float64),
        "layer_rows": np.array([len(s.layers.count) for _, _, s in samples], dtype=np.int64),
        "site_rows": np.array([len(s.sites.count) for _, _, s in samples], dtype=np.int64),
        "histogram_taken": np.array([s.layers.histogram is not None for _, _, s in samples], dtype=bool),
    }
    for part, columns in _COLUMNS.items():
        for column in columns:
            values = [getattr(getattr(s, part), column) for _, _, s in samples]
            out[f"{part}.{column}"] = np.concatenate(values) if values else np.zeros(0)
    if taken:
        out["layers.histogram"] = np.concatenate([s.layers.histogram for s in taken])
    if samples:
        out["layers.update_sq"] = np.concatenate([s.layers.update_sq for _, _, s in samples])
    return out


def _from_pending(v: Mapping[str, Any]) -> dict[int, dict[int, Sample]]:
    """The pending samples `_pending` stacked (views into its arrays: a sample is never written to)."""
    pending: dict[int, dict[int, Sample]] = {}
    if "step" not in v:
        return pending
    _check_pending(v)
    layer_ends, site_ends = np.cumsum(v["layer_rows"]), np.cumsum(v["site_rows"])
    hist_rows = np.cumsum(np.where(v["histogram_taken"], v["layer_rows"], 0))
    for i, (step, rank) in enumerate(zip(v["step"], v["rank"], strict=True)):
        layers = slice(layer_ends[i] - v["layer_rows"][i], layer_ends[i])
        sites = slice(site_ends[i] - v["site_rows"][i], site_ends[i])
        hist = slice(hist_rows[i] - v["layer_rows"][i], hist_rows[i])
        layer_columns = [v["layers"][c][layers] for c in _COLUMNS["layers"]]
        histogram = v["layers"]["histogram"][hist] if v["histogram_taken"][i] else None
        update_sq = v["layers"]["update_sq"][layers] if "update_sq" in v["layers"] else None
        pending.setdefault(int(step), {})[int(rank)] = Sample(
            step=int(step),
            wall_time=float(v["wall_time"][i]),
            energy=float(v["energy"][i]),
            layers=LayerStats(*layer_columns, histogram, update_sq),
            sites=SiteStats(*(v["sites"][c][sites] for c in _COLUMNS["sites"])),
        )
    return dict(sorted(pending.items()))


def _check_pending(v: Mapping[str, Any]) -> None:
    """ValueError unless the stacked columns of `_pending` fit together: one entry per sample,
    and as many rows in each column as the samples' row counts add up to."""
    k = len(checked.array(v["step"], (-1,), "pending.step", "iu"))
    for name in ("rank", "wall_time", "energy", "layer_rows", "site_rows", "histogram_taken"):
        checked.array(v[name], (k,), f"pending.{name}", "fiub")
    layer_rows, site_rows = v["layer_rows"].astype(np.int64), v["site_rows"].astype(np.int64)
    if k and min(layer_rows.min(), site_rows.min()) < 0:
        raise ValueError("pending: a negative row count")
    for part, total in (("layers", layer_rows.sum()), ("sites", site_rows.sum())):
        for column in _COLUMNS[part]:
            checked.array(v[part][column], (int(total),), f"pending.{part}.{column}")
    if "update_sq" in v["layers"]:  # saved since the agents send it
        checked.array(v["layers"]["update_sq"], (int(layer_rows.sum()),), "pending.layers.update_sq")
    taken = int(layer_rows[v["histogram_taken"].astype(bool)].sum())
    if taken:
        checked.array(v["layers"]["histogram"], (taken, -1), "pending.layers.histogram")


#: The objects that save their own state (`to_state`) and are made again from it (`from_state`).
Stateful = Reading | Thermometer | PhaseDetector | Findings


def _state(obj: Stateful | None) -> dict[str, Any] | None:
    """What an object saves of itself (None: absent from the archive)."""
    return None if obj is None else obj.to_state()


def _restored(kind: type[Stateful], state: Mapping[str, Any] | None) -> Any:
    """The object of `kind` made again from what it saved (None: absent from the archive)."""
    return None if state is None else kind.from_state(state)
