"""A collector's thermometer derives the costly part of a reading (temperatures, efficiencies,
histogram entropies) when the reading is first read, not at every merged step
(`Thermometer.add`): whenever and on whichever thread it is read, a reading has, to the bit,
the values `Thermometer.update` gives at its step."""

from __future__ import annotations

import dataclasses
import pickle
import threading

import numpy as np
import pytest

from thermoscope.science import physics
from thermoscope.science.derive import Reading, Thermometer

from helpers import ingest_cases
from helpers.golden import fingerprint


@pytest.mark.parametrize("seed", ingest_cases.THERMOMETER_SEEDS)
def test_readings_read_late_and_on_another_thread_have_the_values_of_their_step(seed: int) -> None:
    """Random merged samples (energies missing at times, histograms every few steps, probes now
    and then, NaN layers): every reading of `add`, read only after the run ended (some of them
    on another thread), equals `update`'s at its step; pickled, it is a plain `Reading`."""
    run = ingest_cases.thermometer_run(seed)
    eager = Thermometer(run.layers, run.sites, window=ingest_cases.THERMOMETER_WINDOW)
    lazy = Thermometer(run.layers, run.sites, window=ingest_cases.THERMOMETER_WINDOW)
    with np.errstate(all="ignore"):
        expected = [fingerprint(eager.update(sample)) for sample in run.samples]
        readings = [lazy.add(sample) for sample in run.samples]
        # what the phase detector reads at each step is there at once; the rest when read
        assert [r.step for r in readings] == [s.step for s in run.samples]
        got: dict[int, bytes] = {}

        def read(first: int) -> None:
            with np.errstate(all="ignore"):  # (numpy's error state is per thread)
                got.update((i, fingerprint(readings[i])) for i in range(first, len(readings), 2))

        odd = threading.Thread(target=read, args=(1,))
        odd.start()
        read(0)
        odd.join()
        assert [got[i] for i in range(len(readings))] == expected
        assert fingerprint(lazy.latest) == expected[-1]
        copy = pickle.loads(pickle.dumps(readings[40]))
    assert type(copy) is Reading and fingerprint(copy) == expected[40]


def test_histograms_of_other_bins_after_unread_ones_give_their_own_shape() -> None:
    """A job whose ranks all left and whose next ranks take histograms of other bins: the shape
    of a layer is that of its last histogram, read or not before the bins changed."""
    run = ingest_cases.thermometer_run(0)
    thermometer = Thermometer(run.layers, run.sites, window=ingest_cases.THERMOMETER_WINDOW)
    with np.errstate(all="ignore"):
        for sample in run.samples[:20]:  # histograms of 5 bins, none of the readings read
            thermometer.add(sample)
        wide = run.samples[20]
        counts = np.arange(len(run.layers) * 5, dtype=np.int64).reshape(len(run.layers), 5) + 40
        counts[0] = 0  # the first layer's histogram not taken at this step
        narrow = dataclasses.replace(wide, layers=dataclasses.replace(wide.layers, histogram=counts))
        reading = thermometer.add(narrow)
        lo, hi = thermometer._lo[1:], thermometer._hi[1:]
        h_hist = physics.histogram_entropy(counts[1:], lo, hi)
        variance = physics.variance(wide.layers.count, wide.layers.mean, wide.layers.m2)
        h_gauss = physics.gaussian_entropy(variance)[1:]
        assert fingerprint(reading.layer_negentropy[1:]) == fingerprint(h_gauss - h_hist)
        assert fingerprint(reading.layer_outside[1:]) == fingerprint(physics.outside_fraction(counts[1:]))
        eager = Thermometer(run.layers, run.sites, window=ingest_cases.THERMOMETER_WINDOW)
        for sample in run.samples[:20]:
            eager.update(sample)
        assert fingerprint(reading.layer_negentropy[0]) == fingerprint(eager.latest.layer_negentropy[0])
