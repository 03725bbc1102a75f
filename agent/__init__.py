"""Thermoscope agent: measures a PyTorch model's thermodynamics from inside its training loop.

`Monitor` (and torch) load on first use, so that the collector, which shares the physics
and the wire code of this package, does not import torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .derive import Reading
    from .monitor import Monitor

__all__ = ["Monitor", "Reading"]


def __getattr__(name: str) -> Any:
    if name == "Monitor":
        from .monitor import Monitor

        return Monitor
    if name == "Reading":
        from .derive import Reading

        return Reading
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
