"""Bearer tokens of the tests' tokens files, and a monitored training that says how many frames got
through a collector's security.
"""

from __future__ import annotations

from thermoscope.agent import Monitor

from helpers.training import small_model, train_steps

TOKEN_ANY = "any-job-token-0123456789"
TOKEN_A = "team-a-token-0123456789"


def monitor_delivers(target: str, job: str, **security) -> int:
    """Frames a 5-step monitored training to `target` delivered with `security` (the Monitor's
    token/TLS arguments); fails if the collector did not acknowledge them all."""
    model, opt = small_model()
    monitor = Monitor(model, opt, collector=target, job=job, every=1, **security)
    try:
        train_steps(monitor, model, opt, 5)
        assert monitor.flush(15), "the collector did not acknowledge every frame"
        return monitor.delivered
    finally:
        monitor.close()
