"""Agents joining: a valid hello's bounds and names checked, its job's run found or created
(resumed from its checkpoint, held among the runs, within their bounds), and its `Stream`.

A hello that breaks a bound raises `WireError` with its reason before the collector holds
anything for it; the cheap bounds come first (counts, ranks, names), so an absurd hello is
refused before anything walks its tables.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from thermoscope.science.derive import Reading
from thermoscope.v1 import telemetry_pb2 as pb
from thermoscope.wire import codec
from thermoscope.wire.node import decode_node_hello

from ..settings import CollectorSettings
from ..state.checkpoint import Checkpointer
from ..state.job import Job
from ..state.runs import Runs
from ..state.store import EventStore
from ..state.stream import Stream
from .admission import Admission
from .nonfinite import NonFinite

log = logging.getLogger("thermoscope.collector")


class Intake:
    """Registers the agent of each valid hello with its job's run."""

    def __init__(
        self,
        settings: CollectorSettings,
        runs: Runs,
        checkpointer: Checkpointer,
        admission: Admission,
        nonfinite: NonFinite,
        *,
        store: EventStore | None = None,
        on_reading: Callable[[str, Reading], None] | None = None,
    ) -> None:
        """`settings`: the bounds (`limits`), and a new job's window and `stale_after`; `runs`:
        the runs held, where a new one goes; `checkpointer`: resumes a new run from its stored
        state; `admission`: whether a new job starts paused; `nonfinite`: forgets the jobs let
        go to make room; `store`: which readings a job's history keeps; `on_reading`: told
        (job_id, reading) at each merged step."""
        self.settings = settings
        self.runs = runs
        self.checkpointer = checkpointer
        self.admission = admission
        self.nonfinite = nonfinite
        self.store = store
        self.on_reading = on_reading

    def open(self, hello: pb.Hello, tenant: str) -> tuple[Job, Stream]:
        """Register the agent of a valid hello with its job's run (raises WireError otherwise).

        The cheap bounds come first (counts, ranks, names), so an absurd hello is refused
        before anything walks its tables."""
        limits = self.settings.limits
        for table, n in (("layers", len(hello.layers)), ("sites", len(hello.sites))):
            if n > limits.max_layers:
                raise codec.WireError(
                    "too_many_layers", f"a hello of {n} {table}; the limit is {limits.max_layers}"
                )
        if hello.world_size > limits.max_ranks:
            raise codec.WireError(
                "too_many_ranks", f"a world of {hello.world_size} ranks; the limit is {limits.max_ranks}"
            )
        self._check_names(hello)
        node_ranks, spans = (), ()
        if hello.ranks:  # a node aggregator's stream: its ranks and its table's runs of shards
            node_ranks, table = decode_node_hello(hello)
            layers, sites, spans = list(table.layers), list(table.sites), table.spans
        else:
            layers, sites = codec.decode_hello(hello)
        job = self.runs.get((hello.job_id, hello.run_id))
        for table, names, known in (
            ("layers", {layer.name for layer in layers}, job.layers if job else {}),
            ("sites", {site.name for site in sites}, job.sites if job else {}),
        ):
            total = len(names | known.keys())
            if total > limits.max_layers:
                raise codec.WireError(
                    "too_many_layers",
                    f"job {hello.job_id!r} would have {total} {table}; the limit is {limits.max_layers}",
                )
        if job is None:
            self.runs.check_room(hello.job_id, tenant)
            job = Job(
                hello.job_id,
                window=self.settings.window,
                run_id=hello.run_id,
                on_reading=self.on_reading,
                history_due=None if self.store is None else self.store.due,
                stale_after=self.settings.stale_after,
                paused=not self.admission.active(hello.job_id),
            )
            self.checkpointer.resume(job)
            if not job.pipeline.pending:  # no stream of it is open: its ranks bind anew (`Job.close`)
                job.pipeline.release()
            self.nonfinite.forget(self.runs.hold(job, tenant))
        stream = Stream(
            job_id=hello.job_id,
            run_id=hello.run_id,
            rank=hello.rank,
            world_size=hello.world_size,
            host=hello.host,
            local_rank=hello.local_rank,
            node=hello.node,
            pod=hello.pod,
            gpu=hello.gpu,
            layers=layers,
            sites=sites,
            bins=hello.histogram_bins,
            ranks=node_ranks,
            spans=spans,
        )
        job.open(stream, tenant)  # (WireError `rank_owned`: another identity's rank)
        log.info(
            "agent joined: job %s run %s rank %d/%d on %s",
            hello.job_id,
            hello.run_id,
            hello.rank,
            hello.world_size,
            hello.host,
        )
        return job, stream

    def _check_names(self, hello: pb.Hello) -> None:
        """Every name a hello carries is at most `max_name_length` characters (WireError)."""
        limit = self.settings.limits.max_name_length
        fields = ("job_id", "run_id", "host", "agent_version", "node", "pod", "gpu")
        named = [(f, getattr(hello, f)) for f in fields]
        for i, layer in enumerate(hello.layers):  # (the common case: one pass, no labels built)
            name, dtype = layer.name, layer.dtype
            if len(name) > limit or len(dtype) > limit:
                named += [(f"layer {i}", name), (f"layer {i} dtype", dtype)]
        for i, site in enumerate(hello.sites):
            name, kind, function = site.name, site.kind, site.function
            if len(name) > limit or len(kind) > limit or len(function) > limit:
                named += [(f"site {i}", name), (f"site {i} kind", kind), (f"site {i} function", function)]
        for what, name in named:
            if len(name) > limit:
                raise codec.WireError(
                    "name_too_long", f"{what}: a name of {len(name)} characters; the limit is {limit}"
                )
