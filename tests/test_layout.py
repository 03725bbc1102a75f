"""docs/layout.md stays the map of the tree: every module of the package's folders (pyproject's
package-dir) and of the tests' helpers has its row in the table of folders and modules, and every
path a row names exists. Both sides are read, so a module added, moved or removed on any branch
is caught wherever the page is not changed with it."""

from __future__ import annotations

import re
from fnmatch import fnmatch
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
LAYOUT = ROOT / "docs" / "layout.md"


def table() -> dict[str, str]:
    """The page's rows by the path their first cell names (its first `code` span)."""
    rows = {}
    for line in LAYOUT.read_text().splitlines():
        if match := re.match(r"\| `([^`]+)`", line):
            rows[match[1]] = line
    return rows


def modules() -> list[str]:
    """Every module (but `__init__.py`) of the folders pyproject maps to packages, and of tests/helpers."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    folders = [*project["tool"]["setuptools"]["package-dir"].values(), "tests/helpers"]
    return sorted(
        path.relative_to(ROOT).as_posix()
        for folder in folders
        for path in (ROOT / folder).rglob("*.py")
        if path.name != "__init__.py" and "__pycache__" not in path.parts
    )


def named(module: str, rows: dict[str, str]) -> bool:
    """A row of its own, or a pattern in its folder's row that names a group (`telemetry_pb2*`: the
    generated stubs)."""
    if module in rows:
        return True
    folder, name = module.rsplit("/", 1)
    groups = re.findall(r"`([^`]*\*[^`]*)`", rows.get(f"{folder}/", ""))
    return any(fnmatch(name, pattern) for pattern in groups)


def test_every_module_of_the_packages_and_helpers_has_its_row() -> None:
    rows = table()
    assert "cli/main.py" in rows and "proto/wire/" in rows  # the table was read
    assert [module for module in modules() if not named(module, rows)] == []


def test_every_path_the_table_names_exists() -> None:
    assert [path for path in table() if not (ROOT / path).exists()] == []


def test_a_folder_row_names_its_generated_stubs_as_a_group_and_nothing_else() -> None:
    rows = table()
    assert named("proto/thermoscope/v1/telemetry_pb2_grpc.py", rows)
    assert not named("proto/thermoscope/v1/other_pb2.py", rows)
    assert not named("cli/no_such_verb.py", rows)
