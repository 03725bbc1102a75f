"""A request refused before the servicer handles it.

The request deserializer (`server.deserializer`: too large, not a protobuf) and a bearer
token's job binding (`grpc_auth`: a hello for a job outside the token's prefix) both turn a bad
message into a `BadBytes` instead of raising; the servicer ends the stream with the status of
its reason and counts it in `thermoscope_frames_rejected_total{reason}`. It has a module of its
own so that the security side needs nothing of the servicer.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BadBytes:
    """A request the deserializer refused; the handler turns it into a status."""

    reason: str
    message: str
