"""The gRPC side of the collector: one `Telemetry.Stream` per agent, validated frame by frame.

A message that breaks the contract ends *its* stream with a gRPC status saying what was
wrong (the agent reconnects), is counted in `thermoscope_frames_rejected_total{reason}`,
and changes no state; every other stream carries on. Size and decoding are checked in the
request deserializer, before protobuf parses anything, so an oversized or garbled message
costs only its bytes.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from thermoscope.agent import wire
from thermoscope.v1 import telemetry_pb2 as pb

from .merge import Job, Stream
from .store import EventStore

log = logging.getLogger("thermoscope.collector")

SERVICE = "thermoscope.v1.Telemetry"

_STATUS = {
    "unknown_stream": grpc.StatusCode.FAILED_PRECONDITION,
    "duplicate_hello": grpc.StatusCode.FAILED_PRECONDITION,
    "protocol_version": grpc.StatusCode.FAILED_PRECONDITION,
    "edges_mismatch": grpc.StatusCode.FAILED_PRECONDITION,
    "oversized": grpc.StatusCode.RESOURCE_EXHAUSTED,
}


@dataclass(frozen=True)
class BadBytes:
    """A request the deserializer refused; the handler turns it into a status."""

    reason: str
    message: str


def deserializer(max_bytes: int):
    """Request deserializer that refuses oversized or undecodable messages without raising."""

    def decode(data: bytes) -> pb.AgentMessage | BadBytes:
        if len(data) > max_bytes:
            return BadBytes("oversized", f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
        try:
            return pb.AgentMessage.FromString(data)
        except DecodeError as exc:
            return BadBytes("undecodable", f"message is not a thermoscope.v1.AgentMessage: {exc}")

    return decode


class Telemetry:
    """The servicer: hello, then frames; acks each accepted frame."""

    def __init__(
        self, jobs: dict[str, Job], *, window: int = 10, every: int = 0, store: EventStore | None = None
    ) -> None:
        self.jobs = jobs
        self.store = store
        self.window = window
        self.every = every
        self.rejected: Counter[str] = Counter()

    async def Stream(
        self, requests: AsyncIterator[pb.AgentMessage | BadBytes], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.CollectorMessage]:
        stream: Stream | None = None
        try:
            async for msg in requests:
                if isinstance(msg, BadBytes):
                    await self._reject(context, msg.reason, msg.message)
                kind = msg.WhichOneof("body")
                if kind == "hello":
                    if stream is not None:
                        await self._reject(context, "duplicate_hello", "a stream sends one hello, first")
                    try:
                        stream = self._open(msg.hello)
                    except wire.WireError as exc:
                        await self._reject(context, exc.reason, str(exc))
                    yield pb.CollectorMessage(config=pb.Config(every=self.every, paused=False))
                elif kind == "frame":
                    if stream is None:
                        await self._reject(context, "unknown_stream", "frame on a stream that sent no hello")
                    try:
                        sample = wire.decode(msg.frame, len(stream.layers), len(stream.sites), stream.bins)
                    except wire.WireError as exc:
                        await self._reject(context, exc.reason, str(exc))
                    if msg.frame.seq <= stream.last_seq:
                        await self._reject(
                            context, "sequence", f"frame seq {msg.frame.seq} after seq {stream.last_seq}"
                        )
                    stream.last_seq = msg.frame.seq
                    self.jobs[stream.job_id].accept(stream, sample)
                    yield pb.CollectorMessage(ack=pb.Ack(seq=msg.frame.seq))
                else:
                    await self._reject(context, "empty", "message carries neither hello nor frame")
        finally:
            if stream is not None:
                self.jobs[stream.job_id].close(stream)

    def _open(self, hello: pb.Hello) -> Stream:
        """Register the agent of a valid hello with its job (raises WireError otherwise)."""
        layers, sites = wire.decode_hello(hello)
        job = self.jobs.get(hello.job_id)
        if job is None:
            job = self.jobs[hello.job_id] = Job(hello.job_id, window=self.window, store=self.store)
        stream = Stream(
            job_id=hello.job_id,
            run_id=hello.run_id,
            rank=hello.rank,
            world_size=hello.world_size,
            host=hello.host,
            every=hello.every,
            layers=layers,
            sites=sites,
            bins=hello.histogram_bins,
        )
        job.open(stream)
        log.info(
            "agent joined: job %s rank %d/%d on %s", hello.job_id, hello.rank, hello.world_size, hello.host
        )
        return stream

    async def _reject(self, context: grpc.aio.ServicerContext, reason: str, message: str) -> None:
        self.rejected[reason] += 1
        log.warning("rejected a message (%s): %s", reason, message)
        await context.abort(_STATUS.get(reason, grpc.StatusCode.INVALID_ARGUMENT), message)

    def handler(self, max_message_bytes: int) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Stream": grpc.stream_stream_rpc_method_handler(
                    self.Stream,
                    request_deserializer=deserializer(max_message_bytes),
                    response_serializer=pb.CollectorMessage.SerializeToString,
                )
            },
        )
