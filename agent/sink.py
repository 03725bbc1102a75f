"""`Sink`: where a monitor's sampled steps go, the one seam between measuring and delivering.

OpenTelemetry's SDK draws the same line between its span processor and its exporter: the training
loop's side (`Monitor`) only hands each sampled step over (`submit`, which never blocks) and, at
the end, waits a bounded time (`flush`, `shutdown`); what happens to the step is the sink's. Two
sinks exist: `local.Local` keeps the steps in-process and derives them at `latest()`, and
`sender.Sender` streams them to a collector from its `processor.Processor` thread through the
relay process. Both answer the same counters, so the monitor reports them without asking which
sink it holds (a sink that never streams reports zero delivered, spooled and replayed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from thermoscope.science.derive import Reading
from thermoscope.science.findings import Finding
from thermoscope.science.stats import LayerInfo, SiteInfo
from thermoscope.v1 import telemetry_pb2 as pb

from .pending import Pending


@runtime_checkable
class Sink(Protocol):
    """What a monitor needs of the place its sampled steps go (see the module docstring)."""

    submitted: int  # steps handed over
    dropped: int  # steps lost: a full queue, or in flight when a stream broke
    delivered: int  # steps the collector accepted (applied)
    undurable: int  # ... and never made durable there
    spooled: int  # steps left on disk at shutdown, for a later replay
    replayed: int  # steps of dead processes' spools the collector made durable
    connected: bool
    dormant: bool  # a lookup found no collector: the monitor samples nothing until one is found
    last_error: str | None
    spool_error: str | None

    def submit(self, item: Pending) -> None:
        """Take one sampled step; never blocks, never raises into training."""

    def retable(self, hello: pb.AgentMessage, layers: Sequence[LayerInfo], sites: Sequence[SiteInfo]) -> None:
        """The model's tables changed (a module replaced): the steps submitted from now on are
        measured over `layers` and `sites`, and stream with `hello` (a new run of the job)."""

    def latest(self) -> Reading | None:
        """The newest reading derived in-process (None where the collector derives them)."""

    def findings(self) -> list[Finding]:
        """The findings that hold after `latest` (in-process); a streaming sink's collector holds them."""

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait at most `timeout` seconds for what was handed over; False if it did not settle."""

    def grow(self, hello: pb.AgentMessage) -> None:
        """The site table grew after the first sampled step: `hello` declares it (an earlier
        step's sample reads 0 values at the sites that joined after it)."""

    def shutdown(self, timeout: float = 5.0) -> bool:
        """Stop (bounded); True only if every step handed over was delivered (and made durable)."""
