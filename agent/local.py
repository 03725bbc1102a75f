"""The in-process sink: a monitor without a collector keeps its sampled steps here and derives
them with its own thermometer when asked (`Monitor.latest()`).

It answers what the streaming sink (`sender.Sender`) answers, so the monitor holds one sink and
never asks which: nothing is delivered, spooled or replayed here, and a step is dropped (the
oldest first, and counted) only when more than `max_queue` wait for a `latest()` that never comes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from thermoscope.science.derive import Reading, Thermometer
from thermoscope.science.findings import Finding, Findings
from thermoscope.science.stats import LayerInfo, SiteInfo
from thermoscope.v1 import telemetry_pb2 as pb

from .pending import Pending


class Local:
    """Sampled steps waiting to be derived in-process (see the module docstring)."""

    delivered = undurable = spooled = replayed = 0
    spool_error: str | None = None
    last_error: str | None = None
    connected = dormant = False

    def __init__(
        self, layers: Sequence[LayerInfo], sites: Sequence[SiteInfo], window: int, max_queue: int
    ) -> None:
        """`layers`, `sites`: the monitor's tables (the site table grows as sites are first applied:
        a sample taken before reads 0 values at the sites that joined after it)."""
        self._layers, self._sites, self._window = layers, sites, window
        self.pending: deque[Pending] = deque(maxlen=max_queue)
        self._thermometer: Thermometer | None = None
        self._findings = Findings()  # fed each derived sample, as a collector's pipeline feeds its own
        self._retabled = False  # the next sample starts a thermometer over the new tables
        self.submitted = 0
        self.dropped = 0

    def submit(self, item: Pending) -> None:
        if len(self.pending) == self.pending.maxlen:
            self.dropped += 1
        self.pending.append(item)
        self.submitted += 1

    def retable(self, hello: pb.AgentMessage, layers: Sequence[LayerInfo], sites: Sequence[SiteInfo]) -> None:
        """The model's tables changed (a module replaced): the steps waiting are derived with the
        old tables now, and the next one starts a thermometer over the new tables (a new run, as
        a collector would hold it); until then `latest` stays the old run's last reading."""
        self.latest()
        self._layers, self._sites, self._retabled = layers, sites, True

    def latest(self) -> Reading | None:
        """Derive what waits; the newest reading (None before the first sample)."""
        if self.pending and (self._thermometer is None or self._retabled):
            self._thermometer = Thermometer(list(self._layers), list(self._sites), window=self._window)
            self._retabled = False
        th, n_sites = self._thermometer, len(self._sites)
        if th is not None and len(th.site_names) < n_sites:
            th.grow_sites(list(self._sites))
        while self.pending:
            sample = self.pending.popleft().to_sample().with_sites(n_sites)
            r = th.update(sample)  # type: ignore[union-attr]
            self._findings.update(sample, r.layer_names, r.site_names, r.site_function)
        return None if self._thermometer is None else self._thermometer.latest

    def findings(self) -> list[Finding]:
        """The findings that hold after deriving what waits (`latest`), oldest first."""
        self.latest()
        return sorted(self._findings.active.values(), key=lambda f: (f.step, f.layer))

    @property
    def thermometer(self) -> Thermometer | None:
        """The thermometer `latest` feeds (None before the first sample is derived)."""
        return self._thermometer

    def flush(self, timeout: float = 5.0) -> bool:
        return True

    def grow(self, hello: pb.AgentMessage) -> None:
        """The site table grew: `latest` reads it from the monitor's table itself."""

    def shutdown(self, timeout: float = 5.0) -> bool:
        """True unless steps were dropped before a `latest()` came for them."""
        return self.dropped == 0
