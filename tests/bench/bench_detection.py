"""How well the phase detector (`science/detect.py`) finds known events, and what it costs.

Run it as a script (pytest does not collect it):

    python tests/bench/bench_detection.py            # the full suite, ~2-3 minutes on 2 cores
    python tests/bench/bench_detection.py --quick    # 2 runs per kind, shorter stationary runs

Each run is a real, seeded torch training of a small MLP with a real in-process `Monitor`
(`tests/helpers/scenarios.py` says what each kind trains and why); every sampled reading goes, as the
collector will feed it, into a fresh `PhaseDetector`: job energy = `reading.energy`, each
layer's entropy per value. Progress goes to stderr, a line per run; the table to stdout.

What the columns count, per scenario kind:

* `recall`: runs whose event was detected. For `shift` and `shift_learning` (the data change
  while the job is still in transition) a detection is the job's first `refresh`
  event at or after the first sample that can show the shift, for `divergence` its first
  `unstable` event (a `refresh` first does not count, and does not stop the run from counting);
  a miss if none comes within `HORIZON` samples (divergence runs end earlier, when the loss
  overflows: then within the run). For `convergence`, the job going `transition` then
  `type_ii` and every weight matrix ending in `type_ii`; for `frozen`, the frozen layers
  staying `type_i` throughout while the job goes `transition` then `type_ii` and every other
  weight matrix ends in `type_ii`. (Weights, not biases: a bias of this student can keep
  drifting one way, at 10-40 % of its learning rate, for hundreds of samples after the loss
  has settled; the detector then rightly keeps it in `transition`.) `stationary` runs have
  nothing to detect (`-`).
* `median` / `p90 delay`: samples from the first sample that can show the event to the
  detection (0: that very sample); p90 is the delay of a run (the order statistic at or above
  the 90th percentile), not an interpolation between two. For `convergence` and `frozen`, the
  samples until the job's `transition` (learning starts at sample 0).
* `false alarms /1k`: job `refresh` or `unstable` events per 1,000 samples where none is due:
  every sample of `convergence`, `frozen` and `stationary` runs, and the samples before the
  event in `shift`, `shift_learning` and `divergence` runs (after it the job is legitimately in
  a new regime, so those samples are not counted). `layer alarms /1k`: the same for layer
  `refresh` events (any layer), per 1,000 samples.

The cost line times `PhaseDetector.update` at 1,000 layers on synthetic series (a noisy
log-energy and 1,000 random-walk entropies), per layer-sample, and the job part alone.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers

from thermoscope.science.detect import TYPE_II, PhaseDetector

from helpers import scenarios

HORIZON = 20  # samples after the event within which a detection counts (100 optimizer steps)
#: Runs per kind, and each kind's seeds start at its own offset so no two kinds share a run.
FULL = {"convergence": 8, "shift": 12, "shift_learning": 12, "divergence": 12, "frozen": 8, "stationary": 20}
QUICK = {"convergence": 2, "shift": 2, "shift_learning": 2, "divergence": 2, "frozen": 2, "stationary": 2}
QUICK_STATIONARY_SAMPLES = 400
SEED_OFFSET = {
    "convergence": 0,
    "shift": 100,
    "shift_learning": 500,
    "divergence": 200,
    "frozen": 300,
    "stationary": 400,
}


@dataclass
class Outcome:
    """What the detector did on one run."""

    kind: str
    seed: int
    samples: int
    detected: bool | None  # None: nothing to detect
    delay: int | None
    quiet_samples: int  # samples on which no alarm is due
    false_alarms: int
    layer_alarms: int
    note: str


def evaluate(trace: scenarios.Trace) -> Outcome:
    """Replay one trace through a fresh detector and score it against its ground truth."""
    detector = PhaseDetector(trace.entropy.shape[1])
    job: list[tuple[int, str]] = []
    layer_refresh: list[int] = []
    layer_seen: dict[int, list[str]] = {}
    for i in range(trace.samples):
        for change in detector.update(int(trace.steps[i]), float(trace.energy[i]), trace.entropy[i]):
            if change.series == -1:
                job.append((i, change.after))
            else:
                layer_seen.setdefault(change.series, []).append(change.after)
                if change.after == "refresh":
                    layer_refresh.append(i)
    event = trace.event_index
    quiet_end = trace.samples if trace.event_step is None else (event if event is not None else trace.samples)
    false_alarms = sum(1 for i, after in job if i < quiet_end and after in ("refresh", "unstable"))
    layer_alarms = sum(1 for i in layer_refresh if i < quiet_end)
    detected: bool | None = None
    delay: int | None = None
    if trace.kind in ("shift", "shift_learning", "divergence"):
        assert event is not None, f"{trace.kind} run {trace.seed} ended before its event"
        hits = [i - event for i, after in job if after == trace.expected and i >= event]
        detected = bool(hits) and hits[0] <= HORIZON
        delay = hits[0] if detected else None
    elif trace.kind in ("convergence", "frozen"):
        order = [after for _, after in job]
        learned = "transition" in order and "type_ii" in order[order.index("transition") :]
        learning = [
            j for j, n in enumerate(trace.layer_names) if n.endswith("weight") and j not in trace.frozen
        ]
        settled = all(detector.layers[j] == TYPE_II for j in learning)
        frozen_still = all(not layer_seen.get(j) for j in trace.frozen)
        detected = learned and settled and frozen_still
        delay = next((i for i, after in job if after == "transition"), None)
    phases = detector.layer_phases()
    note = f"job {' > '.join(f'{after}@{i}' for i, after in job) or 'type_i'}; layers {','.join(phases)}"
    return Outcome(
        trace.kind, trace.seed, trace.samples, detected, delay, quiet_end, false_alarms, layer_alarms, note
    )


def table(outcomes: list[Outcome]) -> str:
    """The markdown table, one row per kind."""
    columns = ("recall", "median delay", "p90 delay", "false alarms /1k", "layer alarms /1k")
    rows = [
        f"| scenario | runs | samples | {' | '.join(columns)} |",
        "| --- | ---: | ---: | " + " | ".join("---:" for _ in columns) + " |",
    ]
    for kind in scenarios.KINDS:
        mine = [o for o in outcomes if o.kind == kind]
        if not mine:
            continue
        samples = sum(o.samples for o in mine)
        quiet = sum(o.quiet_samples for o in mine)
        scored = [o for o in mine if o.detected is not None]
        recall = f"{sum(bool(o.detected) for o in scored) / len(scored):.2f}" if scored else "-"
        delays = [o.delay for o in scored if o.detected and o.delay is not None]
        median = f"{np.median(delays):g}" if delays else "-"  # 0.5 when half are 0, half 1
        p90 = f"{np.percentile(delays, 90, method='higher'):g}" if delays else "-"  # a run's delay
        fa = 1000 * sum(o.false_alarms for o in mine) / quiet
        la = 1000 * sum(o.layer_alarms for o in mine) / quiet
        rows.append(
            f"| {kind} | {len(mine)} | {samples} | {recall} | {median} | {p90} | {fa:.2f} | {la:.2f} |"
        )
    return "\n".join(rows)


def cost(layers: int = 1000, updates: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Microseconds per layer-sample at `layers` layers, and per update with no layers (the job)."""
    rng = np.random.default_rng(seed)
    energy = np.exp(np.log(0.5) - 0.002 * np.arange(updates) + rng.normal(0, 0.2, updates))
    entropy = np.cumsum(rng.normal(0, 1e-4, (updates, layers)), axis=0) - 3.0

    def timed(n_layers: int) -> float:
        detector = PhaseDetector(n_layers)
        cols = entropy[:, :n_layers]
        for i in range(50):  # warm-up
            detector.update(i, float(energy[i]), cols[i])
        start = time.perf_counter()
        for i in range(50, updates):
            detector.update(i, float(energy[i]), cols[i])
        return (time.perf_counter() - start) / (updates - 50)

    per_update = timed(layers)
    return 1e6 * per_update / layers, 1e6 * timed(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="2 runs per kind, short stationary runs")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else FULL
    outcomes: list[Outcome] = []
    start = time.perf_counter()
    for kind, runs in plan.items():
        samples = QUICK_STATIONARY_SAMPLES if args.quick and kind == "stationary" else None
        for seed in range(SEED_OFFSET[kind], SEED_OFFSET[kind] + runs):
            t0 = time.perf_counter()
            trace = scenarios.generate(kind, seed, samples)
            outcome = evaluate(trace)
            outcomes.append(outcome)
            status = {None: "-", True: "hit", False: "MISS"}[outcome.detected]
            print(
                f"{kind:11s} seed {seed:3d} {trace.info or ''} {trace.samples:4d} samples "
                f"{time.perf_counter() - t0:4.1f}s {status} delay {outcome.delay} "
                f"alarms {outcome.false_alarms}/{outcome.layer_alarms}: {outcome.note}",
                file=sys.stderr,
                flush=True,
            )
    per_layer_us, job_us = cost()
    system = f"{platform.system()} {platform.machine()}"
    print(f"- torch {torch.__version__}, Python {platform.python_version()}, {system}")
    print(f"- CPU: {_cpu()}; {os.cpu_count()} CPUs; scenarios train on 1 torch thread")
    print(f"- scenarios sampled every {scenarios.EVERY} optimizer steps; detection horizon {HORIZON} samples")
    print(f"- wall time {time.perf_counter() - start:.0f} s\n")
    print(table(outcomes))
    per_update_ms = per_layer_us * 1000 / 1000  # us per layer-sample x 1,000 layers, in ms
    print(
        f"\ncost: {per_layer_us:.3f} us per layer-sample at 1,000 layers "
        f"({per_update_ms:.2f} ms per update); the job alone {job_us:.0f} us per update"
    )


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
