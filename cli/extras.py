"""The optional packages a command needs (the package's extras), checked before it does any work.

A missing one is said one way everywhere, in one line with the extra that brings it: `demo
--figure` without matplotlib once trained the whole run and then printed a 22-line traceback,
`demo --workers 2` without Ray a `ModuleNotFoundError`. The check finds the module without
importing it: each command imports what it needs only when it runs (docs/layout.md), and Ray
reads its environment at import (`demo` sets it first).
"""

from __future__ import annotations

import importlib.util
import sys

#: The extra of `pyproject.toml` that installs each optional module a command imports.
EXTRAS = {"torch": "agent", "matplotlib": "plot", "ray": "ray"}


def need(what: str, *modules: str) -> None:
    """Exit with one line naming the extra if one of `modules` is not installed.

    `what`: the command and flag that needs them, as the user typed it (`demo --figure`)."""
    for module in modules:
        if importlib.util.find_spec(module) is None:
            print(
                f"thermoscope {what}: needs {module}, which is not installed here: "
                f"pip install 'thermoscope[{EXTRAS[module]}]'",
                file=sys.stderr,
            )
            raise SystemExit(1)
