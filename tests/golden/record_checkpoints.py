"""Record tests/golden/pickle_format.sqlite3 and pickle_format.json, and previous_release.json.

    python tests/golden/record_checkpoints.py

pickle_format.sqlite3 is a database as the collector of commit b8825b8 left it (checkpoints
pickled the job state: the last release of that format): a real `thermoscope collector --db`
process fed a seeded run of three ranks, killed -9 once a checkpoint held its last frames
(tests/helpers/checkpoint_cases.py says what the run holds). pickle_format.json is what that
same code made of the database when the run carried on (`checkpoint_cases.carry_on`), and
previous_release.json the same for tests/golden/previous_release.sqlite3: the counters,
phases, readings and events a later collector must reproduce from these files, bit for bit.

Running this script records what the CURRENT code does: it was run once, with the code of
b8825b8; the files are the reference for every later format, not to be recorded again.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for helpers

from helpers import checkpoint_cases
from helpers.golden import GOLDEN


def main() -> None:
    db = GOLDEN / "pickle_format.sqlite3"
    db.unlink(missing_ok=True)
    checkpoint_cases.record_database(db)
    for name, source in (("pickle_format", db), ("previous_release", GOLDEN / "previous_release.sqlite3")):
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "events.db"
            shutil.copyfile(source, copy)
            carry_on = checkpoint_cases.carry_on if name == "pickle_format" else None
            carried = (carry_on or checkpoint_cases.carry_on_previous_release)(copy)
        text = json.dumps(carried, indent=1, allow_nan=False) + "\n"
        (GOLDEN / f"{name}.json").write_text(text)
        print(f"recorded tests/golden/{name}", file=sys.stderr)


if __name__ == "__main__":
    main()
