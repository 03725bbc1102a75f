"""Thermoscope in training frameworks: a callback each, built on `thermoscope.agent.watch`.

`hf.ThermoscopeCallback` for the Hugging Face `transformers.Trainer`, `lightning.ThermoscopeCallback`
for the Lightning `Trainer` (docs/integrations.md). Each module imports its framework, so this package
imports neither.
"""
