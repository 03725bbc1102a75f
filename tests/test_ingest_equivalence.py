"""The collector's fast ingest paths give what the straightforward code gave.

Rewritten for speed (tests/bench/bench_ingest.py): `codec.decode` (one buffer, three vectorized
checks), the job's merge (`JobMerge`: a cached plan, histograms added per rank), the thermometer (entropy sums
and engine types kept, cheaper slopes) and the phase detector (medians by a sort, and only for
the layers that read them). What the code they replaced gave is recorded in tests/golden/
(tests/golden/record.py says how). Random frames, rank tables (replicas, shards, missing and
inconsistent shards), samples (histograms on and off, non-finite, negative and oversized values,
bad lengths) and real monitored runs must come out identical: the same errors with the same
messages, the same counts, phases, changes and state, the decoded and merged arrays to the bit
(NaN payloads and signed zeros included). Where a value is computed with a dot product (the
thermometer's readings and slopes, the detector's fits), its floats may differ from the recording
by rounding, within helpers.golden.RTOL (which says why: the OpenBLAS kernel depends on the CPU);
everything else about it, its NaN and infinite values included, is exact.
"""

from __future__ import annotations

import json
import pickle
import warnings

import numpy as np
import pytest

from thermoscope.collector.merge import JobMerge
from thermoscope.science import physics
from thermoscope.science.derive import Thermometer
from thermoscope.science.detect import PHASES, PhaseDetector, _mean, _median
from thermoscope.wire import codec

from helpers import golden, ingest_cases
from helpers.golden import fingerprint

INPUTS_CHANGED = (
    "the seeded inputs are not the ones the golden file was recorded on (did numpy change a random "
    "stream?): see tests/golden/record.py before regenerating"
)


def recorded_inputs(recorded: np.ndarray, inputs: object) -> bool:
    return bytes(recorded) == fingerprint(inputs)


# -- decode ----------------------------------------------------------------------------------------


def test_decode_gives_the_recorded_sample_or_refusal_for_every_random_frame() -> None:
    cases = ingest_cases.decode_cases()
    recorded = golden.load("decode")
    assert recorded_inputs(recorded["inputs"], [(f.SerializeToString(), *rest) for f, *rest in cases]), (
        INPUTS_CHANGED
    )
    kinds = set()
    for i, case in enumerate(cases):
        reason, message, counts, sample = ingest_cases.decode_outcome(codec.decode, *case)
        assert counts == json.loads(recorded["nonfinite"][i]), (i, counts)
        assert (reason, message) == (recorded["reason"][i], recorded["message"][i]), i
        assert sample == (bytes(recorded["sample"][i]) if not reason else b""), (
            i,
            "the decoded sample differs",
        )
        if reason:
            kinds.add(next((w for w in ("negative", "seq", "values") if w in message.split()), reason))
        else:
            kinds.add("ok" if not counts else "nonfinite")
    # the cases reached every outcome: accepted, non-finite, each refusal
    assert kinds == {"ok", "nonfinite", "length_mismatch", "negative", "values", "seq"}, kinds


# -- merge -----------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the extreme values overflow
@pytest.mark.parametrize("seed", ingest_cases.MERGE_SEEDS)
def test_the_job_merge_with_or_without_cached_plans_gives_the_recorded_samples(seed: int) -> None:
    cases = list(ingest_cases.merge_cases(seed))
    recorded = golden.load("merge")
    assert recorded_inputs(recorded["inputs"][seed], cases), INPUTS_CHANGED
    job = JobMerge()
    for i, c in enumerate(cases):
        expected = bytes(recorded["merged"][seed, i])
        cached = job.merge(c.step, c.parts, c.tables, c.layer_names, c.site_names)
        assert fingerprint(cached) == expected, (i, "merged with the job's plans")
        fresh = JobMerge().merge(c.step, c.parts, c.tables, c.layer_names, c.site_names)
        assert fingerprint(fresh) == expected, (i, "merged from scratch")


# -- thermometer -------------------------------------------------------------------------------


def test_slope_gives_the_recorded_slopes_and_errors() -> None:
    cases = ingest_cases.slope_cases()
    recorded = golden.load("thermometer")
    assert recorded_inputs(recorded["slope_inputs"], cases), INPUTS_CHANGED
    slopes = golden.unpack(recorded, "slopes")
    assert len(slopes) == len(cases)
    for (x, y), expected in zip(cases, slopes, strict=True):
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # n = 0: the mean of nothing
            golden.assert_matches(physics.slope(x, y), expected, (len(x), y.shape))


@pytest.mark.parametrize("seed", ingest_cases.THERMOMETER_SEEDS)
def test_thermometer_gives_the_recorded_readings_also_after_a_restore(seed: int) -> None:
    """Random merged samples (energies missing at times, histograms every few steps, probes now
    and then, NaN layers); midway the thermometer is pickled as an older collector saved it
    (without the caches) and carries on from the copy."""
    run = ingest_cases.thermometer_run(seed)
    recorded = golden.load("thermometer")
    assert recorded_inputs(recorded["inputs"][seed], [run.layers, run.sites, run.samples]), INPUTS_CHANGED
    n = ingest_cases.THERMOMETER_SAMPLES  # the readings of every seed's run, one run after the other
    readings = golden.unpack(recorded, "readings")[seed * n : (seed + 1) * n]
    thermometer = Thermometer(run.layers, run.sites, window=ingest_cases.THERMOMETER_WINDOW)
    for i, (sample, expected) in enumerate(zip(run.samples, readings, strict=True)):
        with np.errstate(all="ignore"):
            golden.assert_matches(thermometer.update(sample), expected, ("reading", i))
        if i == 40:
            saved = Thermometer.__new__(Thermometer)
            saved.__dict__.update(
                {k: v for k, v in thermometer.__dict__.items() if k not in ("_total", "_engines")}
            )
            thermometer = pickle.loads(pickle.dumps(saved))


# -- detector --------------------------------------------------------------------------------------


def test_median_and_mean_are_numpys() -> None:
    rng = np.random.default_rng(5)
    for n in range(1, 24):
        a = np.abs(rng.standard_t(2, (n, 9)))
        a[rng.random((n, 9)) < 0.05] = rng.choice([np.nan, np.inf, 0.0])
        assert fingerprint(_median(a)) == fingerprint(np.median(a, axis=0)), f"median of {n}"
        x = rng.normal(0, 10.0 ** rng.integers(-3, 4), n)
        assert _mean(x).tobytes() == x.mean().tobytes() and type(_mean(x)) is type(x.mean())


def replay_recorded(run: int, detector: PhaseDetector, recorded: dict) -> set[str]:
    """Feed recorded run `run` to `detector`, checking each sample's changes, phases and state
    against the recorded ones (floats within golden.RTOL); return the phases its layers reached."""
    steps, energy, entropy = (recorded[f"{what}_{run}"] for what in ("steps", "energy", "entropy"))
    states = golden.unpack(recorded, f"state_{run}")
    reached = set()
    for i, (step, e, h) in enumerate(zip(steps, energy, entropy, strict=True)):
        with np.errstate(all="ignore"):
            changes = detector.update(int(step), float(e), h)
        golden.assert_matches(  # series, step, before, after, statistic exact; the confidence within RTOL
            [[c.series, c.step, c.before, c.after, c.statistic, c.confidence] for c in changes],
            golden.split(json.loads(recorded[f"changes_{run}"][i])),
            (i, changes),
        )
        phases = [PHASES[p] for p in recorded[f"phases_{run}"][i]]
        assert [detector.job_phase, *detector.layer_phases()] == phases, i
        golden.assert_matches(golden.state(detector), states[i], (i, "state"))
        reached |= {c.after for c in changes if c.series >= 0}
    return reached


@pytest.mark.parametrize(
    ("run", "reach"),
    [
        (0, {"type_ii", "refresh"}),
        (1, {"type_ii", "refresh"}),
        (2, {"type_ii"}),
        (3, {"type_ii"}),
        (4, {"type_ii"}),
    ],
)
def test_detector_gives_the_recorded_changes_phases_and_state_on_real_runs(run: int, reach: set[str]) -> None:
    """Real monitored runs (helpers/scenarios.py: shifts, a frozen layer, a divergence), recorded
    with non-finite entropies and energies strewn in: the same changes, phases and state after
    every sample; the runs take layers to `reach` (type_ii: the baseline's median; refresh: the
    median of the last three speeds)."""
    _, _, settings = ingest_cases.DETECTOR_RUNS[run]
    recorded = golden.load("detector")
    layers = recorded[f"entropy_{run}"].shape[1]
    assert reach <= replay_recorded(run, PhaseDetector(layers, settings), recorded)
