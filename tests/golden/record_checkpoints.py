"""Record tests/golden/pickle_format.sqlite3 and pickle_format.json, and previous_release.json.

    python tests/golden/record_checkpoints.py [--against REV | --keep-databases]

pickle_format.sqlite3 is a database as the collector of commit b8825b8 left it (checkpoints
pickled the job state: the last release of that format): a real `thermoscope collector --db`
process fed a seeded run of three ranks, killed -9 once a checkpoint held its last frames
(tests/helpers/checkpoint_cases.py says what the run holds). pickle_format.json is what that
same code made of the database when the run carried on (`checkpoint_cases.carry_on`), and
previous_release.json the same for tests/golden/previous_release.sqlite3: the counters,
phases, readings and events a later collector must reproduce from these files. The readings
are kept split (helpers.golden: the digest of their exact part, and their float values), the
events as they are; the tests hold their floats to helpers.golden.RTOL, the rest bit for bit.

Running this script records what the CURRENT code does: it was run once, with the code of
b8825b8; the files are the reference for every later format, not to be recorded again. Until
commit 6eed04e the JSON files held each reading as a bit-exact fingerprint, which only the
OpenBLAS kernel they were recorded on reproduced (Haswell: AVX2; the AVX-512 kernel sums a dot
product in another order). They were re-stored with the readings' values by
`OPENBLAS_CORETYPE=Haswell python tests/golden/record_checkpoints.py --against 6eed04e`, which
keeps the databases as they are and writes nothing unless carrying them on gives, bit for bit,
the counters, phases, reading fingerprints and events that REV's JSON files hold: the values
stored are those of the code of b8825b8.

Issue 24 changed the readings on purpose (temperatures by Newey-West variances and Fieller
intervals, the job's over a longer window; new per-layer fields). `--readings` re-stores only the
readings of the current code: it keeps the databases, and writes nothing unless carrying them on
gives the counters, phases and events the committed JSON files hold, bit for bit, so what resumes
is still what b8825b8 resumed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers

from helpers import checkpoint_cases
from helpers.golden import GOLDEN, fingerprint, from_json, split, to_json

CARRY_ON = {
    "pickle_format": checkpoint_cases.carry_on,
    "previous_release": checkpoint_cases.carry_on_previous_release,
}


def differences_from(rev: str, name: str, carried: dict) -> list[str]:
    """Where `carried` is not, bit for bit, what tests/golden/<name>.json held at git revision `rev`
    (readings as fingerprints: the form of 6eed04e and before). Empty: the same, to the bit."""
    then = json.loads(
        subprocess.run(
            ["git", "show", f"{rev}:tests/golden/{name}.json"], capture_output=True, check=True, cwd=GOLDEN
        ).stdout
    )
    found = [key for key in ("resumed", "after", "events") if carried[key] != then[key]]
    if [fingerprint(reading).hex() for reading in carried["readings"]] != then["readings"]:
        found.append("readings")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--against",
        metavar="REV",
        help="keep the databases, and write nothing unless the runs carry on, bit for bit, as the JSON "
        "files of git revision REV (readings as fingerprints: 6eed04e and before) say",
    )
    parser.add_argument(
        "--readings",
        action="store_true",
        help="keep the databases and re-store the readings only, writing nothing unless the counters, "
        "phases and events are, bit for bit, those of the committed JSON files",
    )
    args = parser.parse_args()
    if not args.against and not args.readings:
        db = GOLDEN / "pickle_format.sqlite3"
        db.unlink(missing_ok=True)
        checkpoint_cases.record_database(db)
    carried = {}
    for name, carry_on in CARRY_ON.items():
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "events.db"
            shutil.copyfile(GOLDEN / f"{name}.sqlite3", copy)
            carried[name] = carry_on(copy)
    if args.against:
        for name, data in carried.items():
            if found := differences_from(args.against, name, data):
                sys.exit(f"{name}: not what {args.against} recorded ({', '.join(found)}), nothing written")
            print(f"{name}: carries on, bit for bit, as {args.against} recorded", file=sys.stderr)
    if args.readings:
        for name, data in carried.items():
            now = json.loads((GOLDEN / f"{name}.json").read_text())
            if found := [key for key in ("resumed", "after", "events") if data[key] != now[key]]:
                sys.exit(f"{name}: not what the committed file holds ({', '.join(found)}), nothing written")
    for name, data in carried.items():
        readings = [split(reading) for reading in data["readings"]]
        text = json.dumps(data | {"readings": [to_json(r) for r in readings]}, indent=1, allow_nan=False)
        (GOLDEN / f"{name}.json").write_text(text + "\n")
        kept = [from_json(r) for r in json.loads((GOLDEN / f"{name}.json").read_text())["readings"]]
        for now, back in zip(readings, kept, strict=True):  # the file gives every float back to the bit
            finite = np.isfinite(now.floats)
            assert back.exact == now.exact and back.floats[finite].tobytes() == now.floats[finite].tobytes()
        print(f"recorded tests/golden/{name}", file=sys.stderr)


if __name__ == "__main__":
    main()
