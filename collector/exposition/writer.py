"""The text exposition format 0.0.4, written as bytes: headers, escaped label sets, and a
family's lines for one job filled into a template in one C-level `%`.

Why not prometheus_client's per-sample objects: at 250 jobs x 200 layers (1,000 agents in jobs
of 4 ranks) a body holds about 420,000 samples, and building a `Metric` and a `Sample` per
series, then formatting each one in Python, took 1.7-2.8 s per scrape on the HTTP thread,
holding the GIL while the gRPC event loop waited. Here a job's label sets are escaped once into
a byte template (`template`: one `%s{labels} %a` line per series; export.py rebuilds it only
when the job's layer or site names change), and a family's lines for one job are one `%` of
that template with the metric name and the values (floats' reprs; NaN, +Inf and -Inf as
Prometheus spells them): the reprs are most of what is left. The samples are those
prometheus_client wrote: the same names, label sets (labels sorted by name), HELP, TYPE,
family order and values; only the spelling of positive values >= 1e6 differs (its
`floatToGoString` writes 1.5e+06, here 1500000.0: the same float). The cost:
tests/bench/bench_scrape.py, docs/benchmarks.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from .catalogue import Family

#: What `/metrics` serves.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Verbatim:
    """A sample value that `%a` writes as is (a float's repr says nan, inf, -inf)."""

    __slots__ = ("_text",)

    def __init__(self, text: str) -> None:
        self._text = text

    def __repr__(self) -> str:
        return self._text


_NAN, _POS_INF, _NEG_INF = _Verbatim("NaN"), _Verbatim("+Inf"), _Verbatim("-Inf")

Value = float | _Verbatim


def header(family: Family) -> bytes:
    """A family's `# HELP` and `# TYPE` lines."""
    text = family.help.replace("\\", r"\\").replace("\n", r"\n")
    return f"# HELP {family.name} {text}\n# TYPE {family.name} {family.type}\n".encode()


def escape(value: str) -> str:
    """A label value as prometheus_client escapes it: backslash, newline, double quote."""
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def label_set(*pairs: tuple[str, str]) -> bytes:
    """`{name="value",...}`, names sorted as prometheus_client sorts them, `%` doubled for `fill`."""
    text = "{" + ",".join(f'{k}="{escape(v)}"' for k, v in sorted(pairs)) + "}"
    return text.encode().replace(b"%", b"%%")


def template(label_sets: Iterable[bytes]) -> bytes:
    """One `%s{labels} %a` line per label set, for `fill` to put a family's name and values in."""
    return b"".join(b"%s" + labels + b" %a\n" for labels in label_sets)


def values(numbers: Any) -> list[Value]:
    """Sample values for `fill`: floats, whose repr Go parses, or NaN, +Inf, -Inf as spelled
    in the text format."""
    array = np.asarray(numbers, dtype=np.float64)
    out: list[Value] = array.tolist()
    for i in np.flatnonzero(~np.isfinite(array)).tolist():
        out[i] = _NAN if math.isnan(array[i]) else _POS_INF if array[i] > 0 else _NEG_INF
    return out


def fill(name: bytes, lines: bytes, numbers: list[Value]) -> bytes:
    """The lines of a `template` with the family's name and `numbers` in them: one C-level `%`,
    of which the floats' reprs are most of what a large scrape costs."""
    args: list[Any] = [name] * (2 * len(numbers))
    args[1::2] = numbers
    return lines % tuple(args)


def rows(name: bytes, samples: list[tuple[bytes, float]]) -> bytes:
    """A few samples, (label set, value) each, their template built on the spot."""
    return fill(name, template(labels for labels, _ in samples), values([value for _, value in samples]))
