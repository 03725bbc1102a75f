"""The JSON API the page reads, `/api/v1/jobs` and `/api/v1/jobs/<job>` (docs/web.md is its
contract): plain dicts of numbers and strings, undefined numbers as null, every list bounded."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from ..state.job import Job
from .recorder import Recorder, number

#: Layers and sites a job's answer lists (the first ones, in the job's order), and its events (the last).
MAX_ROWS = 256
MAX_EVENTS = 200


def visible(job_id: str, prefixes: tuple[str, ...] | None) -> bool:
    """Whether a reader bound to `prefixes` (None: every job) may see the job."""
    return prefixes is None or job_id.startswith(prefixes)


def summary(job: Job) -> dict[str, object]:
    """One row of the jobs list."""
    live, phases = job.liveness(), job.phases()
    stale = sum(is_stale for _, is_stale in live.ranks.values())
    layer_phases = Counter(phases.layers) if phases is not None else Counter()
    return {
        "job": job.job_id,
        "run": job.run_id,
        "phase": phases.job if phases is not None else None,
        "step": job.merged_step if job.merged_step >= 0 else None,
        "ranks": {"live": live.connected, "stale": stale, "finished": len(live.finished)},
        "paused": live.paused,
        "layer_phases": dict(sorted(layer_phases.items())),
        "transitions": sum(phases.transitions.values()) if phases is not None else 0,
    }


def jobs(table: Mapping[str, Job], prefixes: tuple[str, ...] | None) -> dict[str, object]:
    """`/api/v1/jobs`: the jobs the reader may see, by id."""
    rows = [summary(job) for job_id, job in sorted(dict(table).items()) if visible(job_id, prefixes)]
    return {"jobs": rows}


def job(table: Mapping[str, Job], recorder: Recorder, job_id: str) -> dict[str, object] | None:
    """`/api/v1/jobs/<job>`: its summary, latest reading, history and events (None: no such job)."""
    found = table.get(job_id)
    if found is None:
        return None
    reading, phases = found.reading, found.phases()
    latest = None
    if reading is not None:
        layer_phases = phases.layers if phases is not None else []
        latest = {
            "step": reading.step,
            "time": reading.wall_time,
            "energy": number(reading.energy),
            "energy_from_work": reading.energy_from_work,
            "temperature": number(reading.temperature),
            "temperature_low": number(reading.temperature_low),
            "temperature_high": number(reading.temperature_high),
            "engine": reading.engine,
            "efficiency": number(reading.efficiency),
            "layers": [
                {
                    "name": name,
                    "phase": layer_phases[i] if i < len(layer_phases) else None,
                    "temperature": number(reading.layer_temperature[i]),
                }
                for i, name in enumerate(reading.layer_names[:MAX_ROWS])
            ],
            "sites": [
                {
                    "name": name,
                    "function": reading.site_function[i] if i < len(reading.site_function) else "",
                    "efficiency": number(reading.site_efficiency[i]),
                    "engine": str(reading.site_engine[i]),
                }
                for i, name in enumerate(reading.site_names[:MAX_ROWS])
            ],
        }
    events = [e.as_dict() for e in found.pipeline.recent_events[-MAX_EVENTS:]]
    for e in events:
        e["confidence"] = number(e["confidence"])
    return {
        "summary": summary(found),
        "latest": latest,
        "history": recorder.history(job_id),
        "events": events,
    }
