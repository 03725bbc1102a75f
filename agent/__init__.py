"""Thermoscope agent: measures a PyTorch model's thermodynamics from inside its training loop.

Everything here runs in the training process (and imports torch). `Monitor` watches a model
and its optimizer; `watch` is `Monitor` for Ray Train workers (see `raytrain`); `Reading` is
what an in-process monitor reports (defined with the science, in `thermoscope.science.derive`).
"""

from thermoscope.science.derive import Reading

from .monitor import Monitor
from .raytrain import watch

__all__ = ["Monitor", "Reading", "watch"]
