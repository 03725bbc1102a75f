"""Golden files: outputs of replaced code, recorded once, that the current code must reproduce.

The files live in tests/golden/ (tests/golden/record.py says how they were made). A recorded
value is kept in two parts (`split`): its exact part, a 16-byte BLAKE2b digest of a canonical
encoding of everything but the float values (structure, types, dtypes, shapes, integers, strings,
bytes, and which floats are NaN, +inf or -inf; not a NaN's payload and sign, which CPUs set
differently: 0/0 is a negative NaN on x86, a positive one on ARM), and its float values
themselves, one float64 vector. `assert_matches` holds a value to the exact part bit for bit
and to the floats within RTOL/ATOL: the float results depend on which OpenBLAS kernel numpy
picked for the CPU (it sums a dot product in another order on AVX-512 than on AVX2), so a
digest of their IEEE bytes would fail on one machine what passes on another. `fingerprint` is
the bit-exact digest of the whole value, for comparisons made within one process (one kernel)
and for the inputs, which are exact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
DIGEST_BYTES = 16

#: How far a recorded float may be from the value computed now, relative to it. Why not 0: numpy's
#: OpenBLAS picks its kernel by CPU (OPENBLAS_CORETYPE overrides it), and the kernels sum a dot
#: product in different orders (the slopes of physics.slope and science/detect.py), so a
#: result moves by an ulp or two, which the computation after it amplifies. Measured over every
#: float of the goldens against the recording (Haswell, AVX2): SkylakeX (AVX-512) differs by at
#: most 4.3e-13 relative (the detector's CUSUM, a sum that partly cancels: 0.0067 off by 2.9e-15),
#: Nehalem by 6.2e-14, Sandybridge by 1.1e-13, Katmai (OPENBLAS_CORETYPE=Prescott) by 1.2e-13; the
#: readings by at most 5e-16. RTOL is the largest with a margin of about 100: values agree to 10
#: significant digits, which rounding keeps to and a changed formula, window or input does not.
RTOL = 5e-11
#: No absolute slack: every difference measured above is within RTOL of the value itself (the
#: smallest value that differs at all is 4e-7), and the goldens hold values down to 1e-301 (inputs
#: passed through) that an absolute tolerance would stop checking.
ATOL = 0.0


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
        _encode(_recorded_fields(value), out)
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


#: The kind of a float, part of a value's exact part: which values are NaN or infinite is exact.
_FINITE, _NAN, _POSINF, _NEGINF = 0, 1, 2, 3


def _kinds(values: np.ndarray) -> np.ndarray:
    kinds = np.full(values.shape, _FINITE, dtype=np.uint8)
    kinds[np.isnan(values)] = _NAN
    kinds[np.isposinf(values)] = _POSINF
    kinds[np.isneginf(values)] = _NEGINF
    return kinds


#: Fields added to a dataclass after the golden files were recorded, each with what says it holds
#: its default: at their default a value encodes as it did before they existed, so that the files'
#: inputs (a site table is one) keep their fingerprints. A value that sets one is another input, and
#: reads as such. (A layer's `update_sq` defaults to NaN on every layer: "not sent".)
ADDED_LATER: dict[tuple[str, str], Callable[[object], bool]] = {
    ("SiteInfo", "function"): lambda v: v == "",
    ("LayerStats", "update_sq"): lambda v: bool(np.isnan(v).all()),  # type: ignore[call-overload]
}


def _recorded_fields(value: object) -> dict[str, object]:
    """A dataclass's fields by name, less those `ADDED_LATER` that hold their default."""
    name = type(value).__name__
    return {
        f.name: getattr(value, f.name)
        for f in dataclasses.fields(value)  # type: ignore[arg-type]
        if (name, f.name) not in ADDED_LATER or not ADDED_LATER[name, f.name](getattr(value, f.name))
    }


def _split(value: object, exact: list[bytes], floats: list[np.ndarray]) -> None:
    """`_encode`, with each float value's bits replaced by its kind and the value appended to
    `floats` (in the order of the walk; arrays in C order)."""
    if isinstance(value, (float, np.floating)):
        number = np.array([value], dtype=np.float64)
        exact.append(b"f" + _kinds(number).tobytes())
        floats.append(number)
    elif isinstance(value, np.ndarray) and value.dtype.kind == "f":
        number = np.ascontiguousarray(value, dtype=np.float64).ravel()  # float32 and 16: exactly
        exact.append(b"a%s;%s;" % (value.dtype.str.encode(), repr(value.shape).encode()))
        exact.append(_kinds(number).tobytes())
        floats.append(number)
    elif isinstance(value, np.ndarray) and value.dtype.kind not in "biuSU":
        raise TypeError(f"no canonical split of an array of {value.dtype}")
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        _split(_recorded_fields(value), exact, floats)
    elif isinstance(value, Mapping):
        exact.append(b"d%d;" % len(value))
        for key in sorted(value):
            _split(key, exact, floats)
            _split(value[key], exact, floats)
    elif isinstance(value, (list, tuple, deque)):
        exact.append(b"l%d;" % len(value))
        for item in value:
            _split(item, exact, floats)
    else:  # None, bools, integers, bytes, strings, arrays of those: exact, as `_encode` has them
        _encode(value, exact)


@dataclasses.dataclass(frozen=True)
class Split:
    """A value as the goldens keep it: `exact`, the digest of everything but its float values,
    and `floats`, those values (float64, in the order `_split` walks them)."""

    exact: bytes
    floats: np.ndarray


def split(value: object) -> Split:
    exact: list[bytes] = []
    floats: list[np.ndarray] = [np.empty(0)]
    _split(value, exact, floats)
    digest = hashlib.blake2b(b"".join(exact), digest_size=DIGEST_BYTES).digest()
    return Split(digest, np.concatenate(floats))


def assert_matches(value: object, recorded: Split, what: object = "") -> None:
    """`value` is the recorded one: bit for bit but for its finite float values, and those within
    RTOL/ATOL (see there why); a zero recorded as a zero keeps its sign."""
    now = split(value)
    assert now.exact == recorded.exact, (
        what,
        "differs beyond float rounding: in its structure, a type, dtype, shape, integer, string, "
        "or which floats are NaN or infinite",
    )
    finite = np.isfinite(recorded.floats)  # the rest, NaN and infinities, are in the exact part
    np.testing.assert_allclose(
        now.floats[finite], recorded.floats[finite], rtol=RTOL, atol=ATOL, err_msg=str(what)
    )
    zeros = (now.floats == 0) & (recorded.floats == 0)
    assert (np.signbit(now.floats[zeros]) == np.signbit(recorded.floats[zeros])).all(), (
        what,
        "a zero changed its sign",
    )


def pack(name: str, values: list) -> dict[str, np.ndarray]:
    """`values`, split, as the arrays a golden .npz keeps them in: `name` the exact parts
    (n, DIGEST_BYTES), `name`_floats all their floats one after the other, `name`_ends where each
    value's floats end."""
    parts = [split(v) for v in values]
    return {
        name: digests([p.exact for p in parts]),
        f"{name}_floats": np.concatenate([np.empty(0), *(p.floats for p in parts)]),
        f"{name}_ends": np.cumsum([len(p.floats) for p in parts], dtype=np.int64),
    }


def unpack(data: Mapping[str, np.ndarray], name: str) -> list[Split]:
    """The values `pack(name, ...)` put in `data`, as `Split`s for `assert_matches`."""
    floats, ends = data[f"{name}_floats"], data[f"{name}_ends"]
    starts = np.concatenate([[0], ends[:-1]])
    return [Split(bytes(d), floats[a:b]) for d, a, b in zip(data[name], starts, ends, strict=True)]


def to_json(part: Split) -> dict:
    """A `Split` as the JSON goldens keep it: floats as their shortest exact decimals, non-finite
    ones as "nan", "inf" or "-inf" (JSON has no such numbers)."""
    return {
        "exact": part.exact.hex(),
        "floats": [float(x) if np.isfinite(x) else str(float(x)) for x in part.floats],
    }


def from_json(data: dict) -> Split:
    return Split(bytes.fromhex(data["exact"]), np.array([float(x) for x in data["floats"]], dtype=np.float64))


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
