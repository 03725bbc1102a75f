"""Record the golden files in tests/golden/ from the code as it is now.

    python tests/golden/record.py [--against REV] [decode merge thermometer detector metrics]

What the files hold, and how the ones in git were made: the outputs of the code that the
collector's fast paths replaced, on the seeded inputs of tests/helpers/ingest_cases.py and
tests/helpers/exporter_jobs.py. That code (the column-by-column `codec.decode`, the from-scratch
`merge_step`, the thermometer that recomputed every value at every sample and its tensordot
slope, the phase detector that took both medians over every layer, and the prometheus_client
exporter of c6482c8) was kept verbatim in tests/test_ingest_equivalence.py and
tests/test_export.py until issue 12; the files were recorded by passing it to the `record_*`
functions below, and the code of that day reproduced them bit for bit.

- decode.npz: per frame, the refusal reason and message, the non-finite counts, and a
  fingerprint of the decoded sample (helpers.golden: bit-exact, NaN payloads and signed zeros;
  decoding copies floats, it computes none).
- merge.npz: per seed, the fingerprint of every merged sample (sums in a fixed order, no BLAS:
  the same bits on every CPU).
- thermometer.npz: every reading (the runs of all seeds one after the other) and every slope,
  split (helpers.golden.pack): the digest of their exact part and their float values, which the
  tests compare within helpers.golden.RTOL, since a dot product's OpenBLAS kernel depends on the
  CPU.
- detector.npz: the runs the detector was fed (recorded here, so the test needs no training),
  and per sample its changes (JSON, its confidences as exact decimals), its phases and its
  state, split.
- metrics.json: the parsed /metrics body (families in order, HELP, TYPE, samples) per max_series.
- Every file also holds a fingerprint of its inputs, so that a changed random stream (numpy)
  reads as such, not as a difference of outputs.

Until commit 6eed04e the readings, slopes and detector states were kept as bit-exact
fingerprints, which only the OpenBLAS kernel they were recorded on reproduced (Haswell: AVX2;
the AVX-512 kernel sums in another order). thermometer.npz and detector.npz were re-recorded in
the split form by `OPENBLAS_CORETYPE=Haswell python tests/golden/record.py --against 6eed04e
thermometer detector`: `--against` feeds the detector the runs REV's file holds, and refuses to
write unless every value reproduces, bit for bit, the fingerprint (and every other array) that
REV's file holds, so the stored floats are the values of the replaced code, not new ones.

Running this script records what the CURRENT code does and makes it the reference that the tests
hold later code to: that is a decision, not a chore. Do it only for an intended change of these
outputs (say so in the commit, with what changed and why), or when the tests report that the
inputs changed; never to make a failing test pass.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import subprocess
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers

from thermoscope.collector.exposition.export import MetricsExporter
from thermoscope.collector.merge import JobMerge
from thermoscope.science import physics
from thermoscope.science.derive import Thermometer
from thermoscope.science.detect import PHASES, PhaseDetector
from thermoscope.wire import codec

from helpers import exporter_jobs, golden, ingest_cases, scenarios
from helpers.golden import GOLDEN, digests, fingerprint, state

METRICS_MAX_SERIES = (4, 2, 2_000)
METRICS_ARGS = dict(rejected=Counter({"too_large": 2, 'odd "reason"\\': 1}), version="0.1.0", phase_layers=3)


def metrics_nonfinite() -> dict[tuple[str, str], int]:
    return {(exporter_jobs.WEIRD, "layer"): 4, ("merged", "energy"): 1}


def record_decode(decode: Callable = codec.decode) -> dict[str, np.ndarray]:
    cases = ingest_cases.decode_cases()
    outcomes = [ingest_cases.decode_outcome(decode, *case) for case in cases]
    return {
        "inputs": np.frombuffer(
            fingerprint([(f.SerializeToString(), *rest) for f, *rest in cases]), np.uint8
        ),
        "reason": np.array([o[0] for o in outcomes]),
        "message": np.array([o[1] for o in outcomes]),
        "nonfinite": np.array([json.dumps(o[2], sort_keys=True) for o in outcomes]),
        "sample": digests([o[3] or bytes(16) for o in outcomes]),
    }


def record_merge(merge: Callable | None = None) -> dict[str, np.ndarray]:
    """`merge(step, parts, tables, layer_names, site_names)`: one flat step's merge (default: the
    job's, `JobMerge.merge`)."""
    merge = merge or JobMerge().merge
    inputs, merged = [], []
    for seed in ingest_cases.MERGE_SEEDS:
        cases = list(ingest_cases.merge_cases(seed))
        inputs.append(fingerprint(cases))
        with np.errstate(all="ignore"):  # the extreme values overflow
            merged.append(
                digests(
                    [
                        fingerprint(merge(c.step, c.parts, c.tables, c.layer_names, c.site_names))
                        for c in cases
                    ]
                )
            )
    return {"inputs": digests(inputs), "merged": np.stack(merged)}


#: What a recorder returns: arrays, stored as they are, and lists of values, stored split
#: (`write`: golden.pack).
Recorded = dict[str, "np.ndarray | list"]


def record_thermometer(thermometer: Callable = Thermometer, slope: Callable = physics.slope) -> Recorded:
    """readings: every reading of every seed's run (THERMOMETER_SAMPLES a seed, seeds in order);
    slopes: (slope, standard error) of every slope case."""
    inputs, readings = [], []
    for seed in ingest_cases.THERMOMETER_SEEDS:
        run = ingest_cases.thermometer_run(seed)
        inputs.append(fingerprint([run.layers, run.sites, run.samples]))
        t = thermometer(run.layers, run.sites, window=ingest_cases.THERMOMETER_WINDOW)
        with np.errstate(all="ignore"):
            readings += [t.update(s) for s in run.samples]
    slopes = ingest_cases.slope_cases()
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # n = 0: the mean of nothing
        slope_values = [slope(x, y) for x, y in slopes]
    return {
        "inputs": digests(inputs),
        "readings": readings,
        "slope_inputs": np.frombuffer(fingerprint(slopes), np.uint8),
        "slopes": slope_values,
    }


def detector_trace(kind: str, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps, energy, entropy) of a real monitored run, with non-finite entropies and energies
    strewn in (seeded)."""
    trace = scenarios.generate(kind, seed)
    rng = np.random.default_rng(seed)
    entropy = trace.entropy.copy()
    entropy[rng.random(entropy.shape) < 0.01] = np.nan
    entropy[rng.random(entropy.shape) < 0.002] = np.inf
    energy = np.where(rng.random(len(trace.energy)) < 0.02, np.nan, trace.energy)
    return trace.steps, energy, entropy


def record_detector(
    detector: Callable = PhaseDetector, traces: Iterable[tuple[np.ndarray, ...]] | None = None
) -> Recorded:
    """Per run i: steps_i, energy_i, entropy_i (the inputs), changes_i (JSON per sample: series,
    step, before, after, statistic, confidence), phases_i (PHASES indices: job, then layers) and
    state_i (the detector's state after each sample)."""
    runs = ingest_cases.DETECTOR_RUNS
    traces = traces or [detector_trace(kind, seed) for kind, seed, _ in runs]
    out: Recorded = {}
    for i, ((_, _, settings), (steps, energy, entropy)) in enumerate(zip(runs, traces, strict=True)):
        d = detector(entropy.shape[1], settings)
        changes, phases, states = [], [], []
        for step, e, h in zip(steps, energy, entropy, strict=True):
            with np.errstate(all="ignore"):
                found = d.update(int(step), float(e), h)
            changes.append(json.dumps([[getattr(c, f) for f in CHANGE_FIELDS] for c in found]))
            phases.append([PHASES.index(p) for p in (d.job_phase, *d.layer_phases())])
            states.append(copy.deepcopy(state(d)))  # the detector changes it in place
        out |= {f"steps_{i}": steps, f"energy_{i}": energy, f"entropy_{i}": entropy}
        out |= {f"changes_{i}": np.array(changes), f"phases_{i}": np.array(phases, dtype=np.int8)}
        out[f"state_{i}"] = states
    return out


CHANGE_FIELDS = ("series", "step", "before", "after", "statistic", "confidence")


def record_metrics(body: Callable[[int], bytes] | None = None) -> dict[str, list]:
    """{max_series: parsed body} for the jobs of helpers.exporter_jobs; `body(max_series)` renders
    one (default: the current MetricsExporter)."""

    def current(max_series: int) -> bytes:
        jobs = exporter_jobs.jobs_of_every_kind()
        exporter = MetricsExporter(
            jobs, *METRICS_ARGS.values(), max_series=max_series, nonfinite=metrics_nonfinite()
        )
        return b"".join(exporter.render())

    render = body or current
    return {str(n): exporter_jobs.parsed(render(n)) for n in METRICS_MAX_SERIES}


def write(name: str, data) -> None:
    """Store what RECORDERS[name] returned: lists of values split (golden.pack), and check that
    the file gives back every value's exact part and floats to the bit."""
    if name == "metrics":
        text = json.dumps(data, indent=1, ensure_ascii=False, allow_nan=False) + "\n"
        (GOLDEN / "metrics.json").write_text(text)
        return
    lists = {key: values for key, values in data.items() if isinstance(values, list)}
    arrays = {key: values for key, values in data.items() if key not in lists}
    for key, values in lists.items():
        arrays |= golden.pack(key, values)
    np.savez_compressed(GOLDEN / f"{name}.npz", **arrays)
    stored = golden.load(name)
    for key, values in lists.items():
        for value, kept in zip(values, golden.unpack(stored, key), strict=True):
            now = golden.split(value)
            assert kept.exact == now.exact and kept.floats.tobytes() == now.floats.tobytes(), key


def at_revision(rev: str, name: str) -> dict:
    """tests/golden/<name>.npz (or metrics.json) as git revision `rev` holds it."""
    suffix = ".json" if name == "metrics" else ".npz"
    blob = subprocess.run(
        ["git", "show", f"{rev}:tests/golden/{name}{suffix}"], capture_output=True, check=True, cwd=GOLDEN
    ).stdout
    if name == "metrics":
        return json.loads(blob)
    with np.load(io.BytesIO(blob), allow_pickle=False) as data:
        return dict(data)


def recorded_traces(rev: str) -> list[tuple[np.ndarray, ...]]:
    """The runs detector.npz of `rev` fed the detector (today's trainings may not reproduce them:
    they are its inputs, kept with it)."""
    then = at_revision(rev, "detector")
    runs = range(len(ingest_cases.DETECTOR_RUNS))
    return [tuple(then[f"{what}_{i}"] for what in ("steps", "energy", "entropy")) for i in runs]


def differences_from(rev: str, name: str, data) -> list[str]:
    """Where `data` (RECORDERS[name]'s) is not, bit for bit, what tests/golden/<name> held at git
    revision `rev` in the fingerprint form: each list of values against the fingerprints stored
    under its key (flattened: thermometer's readings were (seed, sample, 16)), every array
    against the array, metrics against the JSON. Empty: the same outputs, to the bit."""
    then = at_revision(rev, name)
    if name == "metrics":
        return [] if then == json.loads(json.dumps(data)) else ["metrics"]
    found = [f"{key}: not in {rev}" for key in data.keys() - then.keys()]
    found += [f"{key}: not recorded now" for key in then.keys() - data.keys()]
    for key in data.keys() & then.keys():
        now, before = data[key], then[key]
        if isinstance(now, list):
            expected = before.reshape(-1, golden.DIGEST_BYTES)
            if len(expected) != len(now):
                found.append(f"{key}: {len(now)} values, {len(expected)} fingerprints")
            else:
                found += [f"{key}[{i}]" for i, v in enumerate(now) if fingerprint(v) != bytes(expected[i])]
        elif not (
            now.dtype == before.dtype and now.shape == before.shape and now.tobytes() == before.tobytes()
        ):
            found.append(f"{key}: the array differs")
    return found


RECORDERS = {
    "decode": record_decode,
    "merge": record_merge,
    "thermometer": record_thermometer,
    "detector": record_detector,
    "metrics": record_metrics,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", metavar="name", help=f"of {', '.join(RECORDERS)} (default: all)")
    parser.add_argument(
        "--against",
        metavar="REV",
        help="write nothing unless every output is, bit for bit, what the files held at git revision "
        "REV in the fingerprint form (6eed04e and before), the detector fed REV's runs: to store the same "
        "outputs in the current form",
    )
    args = parser.parse_args()
    names = args.names or list(RECORDERS)
    if unknown := set(names) - set(RECORDERS):
        parser.error(f"no golden file named {', '.join(sorted(unknown))}")
    recorded = {
        name: record_detector(traces=recorded_traces(args.against))
        if name == "detector" and args.against
        else RECORDERS[name]()
        for name in names
    }
    if args.against:
        for name, data in recorded.items():
            if found := differences_from(args.against, name, data):
                sys.exit(
                    f"{name}: not what {args.against} recorded, nothing written: {', '.join(found[:20])}"
                )
            print(f"{name}: every output is, bit for bit, the one {args.against} recorded", file=sys.stderr)
    for name, data in recorded.items():
        write(name, data)
        print(f"recorded tests/golden/{name}: read the diff before committing it", file=sys.stderr)


if __name__ == "__main__":
    main()
