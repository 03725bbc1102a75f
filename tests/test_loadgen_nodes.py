"""`thermoscope loadgen --nodes`: one job streamed flat and through simulated node aggregators,
each arm merging the same steps with no error, and the table that compares them."""

from __future__ import annotations

import math

import pytest

from helpers.processes import thermoscope


@pytest.mark.slow
def test_the_node_arm_and_the_flat_arm_merge_the_same_job_and_are_compared() -> None:
    run = thermoscope(
        *("loadgen", "--nodes", "3", "--node-ranks", "4", "--layers", "20"),
        *("--rate", "2", "--duration", "6", "--warmup", "2"),
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    rows = {
        line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:-1]]
        for line in run.stdout.splitlines()
        if line.startswith(("| flat |", "| node |"))
    }
    assert rows["flat"][0] == "12" and rows["node"][0] == "3"  # streams: ranks, then nodes
    for _, steps, cpu, p50, p99, errors in rows.values():
        assert int(steps) >= 4 and errors == "0"
        assert math.isfinite(float(cpu)) and 0 <= float(p50) <= float(p99)


def test_loadgen_refuses_a_node_run_without_a_rate() -> None:
    run = thermoscope("loadgen", "--nodes", "2", "--rate", "0")
    assert run.returncode == 2 and "--rate > 0" in run.stderr
