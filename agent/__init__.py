"""Thermoscope agent: measures a PyTorch model's thermodynamics from inside its training loop.

Everything here runs in the training process (and imports torch), except the relay process
(`relay_process`), which is why the names below load when first used: the relay imports this
package and must not pay for torch. `Monitor` watches a model and its optimizer; `watch` is
`Monitor` for Ray Train workers (see `raytrain`); `Reading` is what an in-process monitor reports
(defined with the science, in `thermoscope.science.derive`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from thermoscope.science.derive import Reading

    from .monitor import Monitor
    from .raytrain import watch

__all__ = ["Monitor", "Reading", "watch"]
_HOMES = {"Monitor": ".monitor", "watch": ".raytrain", "Reading": "thermoscope.science.derive"}


def __getattr__(name: str) -> object:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOMES[name], __name__), name)
