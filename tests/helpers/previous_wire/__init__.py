"""The previous release's wire, and a collector that speaks only it (tests/test_version_skew.py).

`telemetry.proto` here is the contract of the previous release (commit de0f99f, the release
tests/golden/previous_release.sqlite3 comes from: `git show de0f99f:proto/thermoscope/v1/telemetry.proto`),
with one line changed: its package is `thermoscope.previous`, so that its messages and this
release's can live in one process (protobuf's descriptor pool holds one `thermoscope.v1.Hello`).
Message names never travel: the bytes are the previous release's. The stubs were made with
`python -m grpc_tools.protoc -I. --python_out=. --pyi_out=. telemetry.proto` in this folder.

`PreviousCollector` answers as that release's collector did: a hello with its config (which
says no protocol version: the field did not exist), each frame it can parse with an ack. It
keeps what it received, parsed with the previous stubs, for the test to read.
"""

from __future__ import annotations

import asyncio
import queue

import grpc

from thermoscope.wire.contract import SERVICE

from ..scripted import LoopThread
from . import telemetry_pb2 as previous


class PreviousCollector:
    """On loopback, on its own event loop thread; `target` is its address. A context manager."""

    def __init__(self) -> None:
        self.received: queue.Queue = queue.Queue()  # every message of every call, previous stubs
        self._loop = LoopThread("previous-collector")
        self._server, port = self._loop.call(self._start())
        self.target = f"127.0.0.1:{port}"

    async def _start(self) -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Stream": grpc.stream_stream_rpc_method_handler(
                    self._stream,
                    request_deserializer=previous.AgentMessage.FromString,
                    response_serializer=previous.CollectorMessage.SerializeToString,
                )
            },
        )
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    async def _stream(self, requests, context: grpc.aio.ServicerContext):
        async for msg in requests:
            self.received.put(msg)
            if msg.HasField("hello"):
                yield previous.CollectorMessage(config=previous.Config(every=1))
            else:
                yield previous.CollectorMessage(ack=previous.Ack(seq=msg.frame.seq, durable=msg.frame.seq))
            await asyncio.sleep(0)

    def messages(self) -> list[previous.AgentMessage]:
        """What it received so far."""
        out = []
        while not self.received.empty():
            out.append(self.received.get())
        return out

    def __enter__(self) -> PreviousCollector:
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call(self._server.stop(0))
        self._loop.close()
