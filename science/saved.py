"""Checks on the plain values a saved state holds, before an object is made from them.

A state is data read from a file (collector/state/schema.py), so each `from_state` checks what
it is given against what the object needs, and a state that does not fit raises ValueError
(which the reader reports as an unreadable state) instead of making an object that fails later:
a detector whose ring had the wrong shape failed every frame of its job, and one whose settings
said a window of 10^10 samples asked for 80 GB at its hello.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: The most elements of any one saved array, and the largest count or window a state may name:
#: far above what a collector within its bounds saves, far below what exhausts its memory.
MOST = 1 << 26


def array(value: Any, shape: tuple[int, ...], name: str, kind: str = "fiub") -> np.ndarray:
    """`value` as an array of `shape` (-1: any length up to `MOST`) of numbers (its dtype's kind
    in `kind`), else ValueError naming it."""
    a = np.asarray(value)
    if a.dtype.kind not in kind:
        raise ValueError(f"{name}: an array of {a.dtype}, not of numbers")
    if a.ndim != len(shape) or any(want not in (-1, got) for want, got in zip(shape, a.shape, strict=True)):
        raise ValueError(f"{name}: an array of shape {a.shape}, not {shape}")
    if a.size > MOST:
        raise ValueError(f"{name}: {a.size} values, more than a state holds ({MOST})")
    return a


def rows(value: Any, columns: int, name: str, most: int = MOST) -> np.ndarray:
    """`value` as a 2-D float array of `columns` columns and at most `most` rows (ValueError)."""
    a = array(value, (-1, columns), name)
    if len(a) > most:
        raise ValueError(f"{name}: {len(a)} rows, more than {most}")
    return a


def count(value: Any, name: str, least: int = 0, most: int = MOST) -> int:
    """`value` as an integer in [least, most], else ValueError naming it."""
    n = int(value)
    if not least <= n <= most:
        raise ValueError(f"{name}: {n}, not in [{least}, {most}]")
    return n


def names(value: Any, name: str) -> tuple[str, ...]:
    """`value` (a 1-D array or sequence of strings) as a tuple of str, else ValueError."""
    a = np.asarray(value)
    if a.ndim != 1 or (a.size and a.dtype.kind != "U"):
        raise ValueError(f"{name}: not a list of names ({a.dtype}, shape {a.shape})")
    if a.size > MOST:
        raise ValueError(f"{name}: {a.size} names, more than a state holds ({MOST})")
    return tuple(str(x) for x in a)
