"""Golden files: outputs of replaced code, recorded once, that the current code must reproduce.

The files live in tests/golden/ (tests/golden/record.py says how they were made). Large outputs
are kept as fingerprints: a 16-byte BLAKE2b digest of a canonical, bit-exact encoding of the
value (array dtype, shape and raw bytes, so NaN payloads and signed zeros count; floats by their
IEEE bytes), which keeps the files small while a single flipped bit still fails the comparison.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from collections import deque
from collections.abc import Mapping
from pathlib import Path

import numpy as np

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
DIGEST_BYTES = 16


def _encode(value: object, out: list[bytes]) -> None:
    """Append the canonical bytes of `value`: the numeric kind and bits, never the Python type
    (a float and a numpy float64 of the same bits encode alike, as `==` would find them)."""
    if value is None:
        out.append(b"N")
    elif isinstance(value, (bool, np.bool_)):
        out.append(b"b1" if value else b"b0")
    elif isinstance(value, (int, np.integer)):
        out.append(b"i%d;" % int(value))
    elif isinstance(value, (float, np.floating)):
        out.append(b"f" + struct.pack("<d", float(value)))
    elif isinstance(value, bytes):
        out.append(b"y%d;" % len(value) + value)
    elif isinstance(value, str):
        data = value.encode()
        out.append(b"s%d;" % len(data) + data)
    elif isinstance(value, np.ndarray):
        out.append(b"a%s;%s;" % (value.dtype.str.encode(), repr(value.shape).encode()))
        out.append(np.ascontiguousarray(value).tobytes())
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        _encode({f.name: getattr(value, f.name) for f in dataclasses.fields(value)}, out)
    elif isinstance(value, Mapping):
        out.append(b"d%d;" % len(value))
        for key in sorted(value):
            _encode(key, out)
            _encode(value[key], out)
    elif isinstance(value, (list, tuple, deque)):
        out.append(b"l%d;" % len(value))
        for item in value:
            _encode(item, out)
    else:
        raise TypeError(f"no canonical encoding for {type(value).__name__}")


def fingerprint(value: object) -> bytes:
    """The digest of `value`'s canonical encoding: equal for bit-identical values only."""
    out: list[bytes] = []
    _encode(value, out)
    return hashlib.blake2b(b"".join(out), digest_size=DIGEST_BYTES).digest()


def state(obj: object) -> dict:
    """Everything an object carries from one call to the next (what pickling it would save)."""
    return dict(vars(obj))


def load(name: str) -> dict[str, np.ndarray]:
    """The arrays of tests/golden/<name>.npz."""
    with np.load(GOLDEN / f"{name}.npz", allow_pickle=False) as data:
        return dict(data)


def load_json(name: str) -> object:
    """The contents of tests/golden/<name>.json."""
    return json.loads((GOLDEN / f"{name}.json").read_text())


def digests(values: list[bytes]) -> np.ndarray:
    """Fingerprints as one (n, DIGEST_BYTES) uint8 array, the form they are stored in."""
    return np.frombuffer(b"".join(values), dtype=np.uint8).reshape(len(values), DIGEST_BYTES)
