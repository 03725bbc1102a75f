"""Long fuzz run: the strategies of tests/test_fuzz.py against a `thermoscope collector` process.

    python tests/bench/fuzz_long.py [--cases 200000] [--seed 0] 2>fuzz.log  # the collector logs each refusal

Half the cases are raw bytes, half hostile messages (tests/helpers/fuzzing.py), sent over one real
channel to a collector started as a user would (its limits set by flags). Every call must end
with a defined status, the collector must still be serving at the end, and its resident
memory (/proc/<pid>/status) is sampled every 1,000 cases. Prints one table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from hypothesis import HealthCheck, given, settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers

from helpers import fuzzing
from helpers.processes import start_collector_process, wait_serving

FLAGS = {
    "max_layers": "--max-layers",
    "max_jobs": "--max-jobs",
    "max_name_length": "--max-name-length",
    "max_frame_rate": "--max-frame-rate",
    "max_message_bytes": "--max-message-bytes",
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", type=int, default=200_000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    options = [arg for key, flag in FLAGS.items() for arg in (flag, str(fuzzing.COLLECTOR_SETTINGS[key]))]
    with tempfile.TemporaryDirectory() as tmp:
        collector = start_collector_process(Path(tmp) / "events.db", None, *options)
        pid = collector.proc.pid
        client = fuzzing.Client(collector.grpc_target)
        rss = [fuzzing.rss_bytes(pid)]
        done = [0]

        def sample() -> None:
            done[0] += 1
            if done[0] % 1000 == 0:
                rss.append(fuzzing.rss_bytes(pid))

        start = time.monotonic()
        try:
            for strategy, n in (
                (fuzzing.raw_streams(), args.cases // 2),
                (fuzzing.hostile_streams(), args.cases - args.cases // 2),
            ):

                @settings(
                    max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck)
                )
                @given(strategy)
                def case(requests: list[bytes]) -> None:
                    client.send(requests)
                    sample()

                case._hypothesis_internal_use_seed = args.seed  # reproducible, like @seed
                case()
            elapsed = time.monotonic() - start
            wait_serving(collector.grpc_target, timeout=10)
            rss.append(fuzzing.rss_bytes(pid))
        finally:
            client.close()
            collector.stop()
    mib = 1 << 20
    total = sum(client.statuses.values())
    print(
        "| cases | "
        + " | ".join(code.name for code in sorted(client.statuses, key=lambda c: c.value[0]))
        + " | RSS start / end / max (MiB) | cases/s |"
    )
    print("|---" * (len(client.statuses) + 3) + "|")
    print(
        f"| {total} | "
        + " | ".join(str(client.statuses[c]) for c in sorted(client.statuses, key=lambda c: c.value[0]))
        + f" | {rss[0] / mib:.0f} / {rss[-1] / mib:.0f} / {max(rss) / mib:.0f} | {total / elapsed:.0f} |"
    )
    print("still serving after the run: yes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
