"""The gRPC server's HTTP/2 policy on its connections: its keepalive pings, and the pings it allows.

A stream holds a run (and a tenant's quota) from its hello until it ends. A client that stops
answering without closing its connection (frozen with SIGSTOP, its host gone without a FIN, a
partition) would hold it for ever: TCP itself says nothing while the kernel of a stopped process
still acknowledges. So the server pings each connection every `keepalive` s and closes it when a
ping is not answered within `keepalive_timeout` s: its calls are cancelled, their ranks count as
lost, and their runs are let go like any that ended. "Idle" is a missed ping, never silence:
grpc answers pings on its own threads (an agent's relay process, not its training loop), so an
agent that samples once every few minutes, or is paused, keeps its stream.

Agents ping too (`agent.link.CHANNEL_OPTIONS`: every `PING_INTERVAL_MS`, also while they send
nothing), to find a dead collector. The server allows a ping every
`MIN_PING_INTERVAL_MS` without data; a client that pings faster gets `MAX_PING_STRIKES` strikes,
then GOAWAY `too_many_pings` and its connection closed.
"""

from __future__ import annotations

from ..settings import CollectorSettings

#: The least interval between two client pings when no data flows: below the agents' interval.
MIN_PING_INTERVAL_MS = 20_000
#: Pings too early before GOAWAY (ENHANCE_YOUR_CALM, "too_many_pings").
MAX_PING_STRIKES = 2


def server_options(settings: CollectorSettings) -> list[tuple[str, int]]:
    """The grpc server options of this policy, for `settings`' `keepalive` and `keepalive_timeout`."""
    return [
        ("grpc.keepalive_time_ms", round(settings.keepalive * 1000)),
        ("grpc.keepalive_timeout_ms", round(settings.keepalive_timeout * 1000)),
        # what the timeout of a keepalive ping is in grpc 1.6x+ (its default, 60 s, overrides the above)
        ("grpc.http2.ping_timeout_ms", round(settings.keepalive_timeout * 1000)),
        ("grpc.http2.min_ping_interval_without_data_ms", MIN_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", MAX_PING_STRIKES),
    ]
