"""Thermoscope agent: measures a PyTorch model's thermodynamics from inside its training loop.

`Monitor` (and torch) load on first use, so that the collector, which shares the physics
and the wire code of this package, does not import torch. `watch` is `Monitor` for Ray
Train workers (see `raytrain`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .derive import Reading
    from .monitor import Monitor
    from .raytrain import watch

__all__ = ["Monitor", "Reading", "watch"]


def __getattr__(name: str) -> Any:
    if name == "Monitor":
        from .monitor import Monitor

        return Monitor
    if name == "Reading":
        from .derive import Reading

        return Reading
    if name == "watch":
        from .raytrain import watch

        return watch
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
