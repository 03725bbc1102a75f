"""The golden files' comparison (helpers/golden.py) lets a recorded value's floats differ by rounding,
within RTOL, and nothing else: its structure, types, dtypes, shapes, integers, strings, which floats
are NaN or infinite and the sign of its zeros are held to the bit; the stored forms give every
value back to the bit."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from helpers import golden
from helpers.golden import RTOL, assert_matches, split

VALUE = {
    "step": 7,
    "name": "layer0",
    "energy": 0.25,
    "entropy": np.array([[1.5, -0.0], [np.nan, np.inf]]),
    "counts": np.array([3, 4], dtype=np.int64),
    "engine": np.array(["A", ""]),
    "steps": [1.0, 2.0, 3.0],
}


def changed(key: str, new: object) -> dict:
    return VALUE | {key: new}


def entropy_with(index: tuple[int, int], x: float) -> np.ndarray:
    entropy = VALUE["entropy"].copy()
    entropy[index] = x
    return entropy


def test_a_value_matches_its_recording() -> None:
    assert_matches(VALUE, split(VALUE))
    assert_matches({k: VALUE[k] for k in reversed(VALUE)}, split(VALUE))  # a mapping's order is not


@pytest.mark.parametrize("sign", [1, -1])
def test_floats_one_ulp_away_match(sign: int) -> None:
    """What a kernel that sums in another order gives: the last bits differ."""
    assert_matches(changed("energy", np.nextafter(0.25, sign * np.inf)), split(VALUE))
    assert_matches(changed("entropy", entropy_with((0, 0), np.nextafter(1.5, sign * np.inf))), split(VALUE))
    assert_matches(changed("steps", [1.0, 2.0, np.nextafter(3.0, sign * np.inf)]), split(VALUE))


@pytest.mark.parametrize("sign", [1, -1])
def test_floats_within_the_tolerance_match(sign: int) -> None:
    assert_matches(changed("energy", 0.25 * (1 + sign * RTOL / 2)), split(VALUE))
    assert_matches(changed("steps", [1.0, 2.0 * (1 + sign * RTOL / 2), 3.0]), split(VALUE))


@pytest.mark.parametrize(
    "value",
    [
        changed("energy", 0.25 * (1 + 3 * RTOL)),
        changed("energy", 0.25 * (1 - 3 * RTOL)),
        changed("entropy", entropy_with((0, 0), 1.5 * (1 + 1e-6))),
        changed("steps", [1.0, 2.0, 3.5]),
    ],
    ids=["energy up", "energy down", "an array's float", "a list's float"],
)
def test_a_float_further_away_than_the_tolerance_does_not_match(value: dict) -> None:
    with pytest.raises(AssertionError, match="Not equal to tolerance"):
        assert_matches(value, split(VALUE))


@pytest.mark.parametrize(
    "value",
    [
        changed("step", 8),
        changed("step", 7.0),  # an integer became a float of the same value
        changed("name", "layer1"),
        changed("counts", np.array([3, 5], dtype=np.int64)),
        changed("counts", np.array([3, 4], dtype=np.int32)),
        changed("engine", np.array(["B", ""])),
        changed("entropy", VALUE["entropy"].reshape(4)),
        changed("entropy", VALUE["entropy"].astype(np.float32)),  # every value exactly the same
        changed("entropy", entropy_with((1, 0), 2.0)),  # a NaN became a number
        changed("entropy", entropy_with((0, 0), np.nan)),  # a number became a NaN
        changed("entropy", entropy_with((1, 1), -np.inf)),
        changed("entropy", entropy_with((1, 1), 1e308)),
        changed("energy", None),
        changed("steps", [1.0, 2.0]),
        changed("steps", (1.0, 2.0, 3.0, 4.0)),
        VALUE | {"extra": 0},
    ],
    ids=[
        "an integer",
        "an integer's type",
        "a string",
        "an integer array's value",
        "an integer array's dtype",
        "a string array's value",
        "a shape",
        "a float array's dtype",
        "a NaN's position (gone)",
        "a NaN's position (new)",
        "an infinity's sign",
        "an infinity gone",
        "a float gone",
        "a list's length",
        "a list's length (longer)",
        "a key added",
    ],
)
def test_anything_else_changed_does_not_match(value: dict) -> None:
    with pytest.raises(AssertionError, match="differs beyond float rounding"):
        assert_matches(value, split(VALUE))


def test_a_zero_keeps_its_sign() -> None:
    with pytest.raises(AssertionError, match="a zero changed its sign"):
        assert_matches(changed("entropy", entropy_with((0, 1), 0.0)), split(VALUE))


def test_a_nans_payload_and_sign_are_not_part_of_the_value() -> None:
    """0/0 gives a negative NaN on x86, a positive one on ARM: only where the NaNs are is exact."""
    other = np.array([0x7FF8_0000_0000_0001], dtype=np.uint64).view(np.float64)[0]
    assert_matches(changed("entropy", entropy_with((1, 0), -other)), split(VALUE))


def test_values_packed_into_a_golden_file_come_back_to_the_bit() -> None:
    values = [VALUE, changed("energy", 5e-324), changed("steps", []), 1.0, [np.nan, -0.0]]
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **golden.pack("values", values))
    buffer.seek(0)
    with np.load(buffer, allow_pickle=False) as data:
        stored = golden.unpack(dict(data), "values")
    for value, kept in zip(values, stored, strict=True):
        now = split(value)
        assert kept.exact == now.exact and kept.floats.tobytes() == now.floats.tobytes()
        assert_matches(value, kept)


def test_the_json_form_gives_every_float_back_to_the_bit_and_names_the_non_finite_ones() -> None:
    value = changed("energy", 0.1 + 0.2) | {"tiny": 5e-324, "big": -1.7976931348623157e308}
    text = json.dumps(golden.to_json(split(value)), allow_nan=False)
    assert '"nan"' in text and '"inf"' in text
    kept = golden.from_json(json.loads(text))
    now = split(value)
    finite = np.isfinite(now.floats)
    assert kept.exact == now.exact and kept.floats[finite].tobytes() == now.floats[finite].tobytes()
    assert_matches(value, kept)
