"""A collector the test speaks for: it takes `Telemetry/Stream` calls (one at a time, as a node
aggregator opens them), hands the test every message it receives, and answers only what the
test tells it to (acks, configs, the call's end), so that what an aggregator tells its ranks
can be checked against exactly what its collector said. And the event loop thread it runs on
(`LoopThread`), for aggregators in the test's process too.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from dataclasses import dataclass

import grpc

from thermoscope.v1 import telemetry_pb2 as pb
from thermoscope.wire.contract import SERVICE


class LoopThread:
    """An asyncio event loop on a daemon thread. `call` runs a coroutine there and returns its
    result; `close` cancels what still runs there (as `asyncio.run` does at its end), then stops
    and closes the loop."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def call(self, coro, timeout: float = 60.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=timeout)

    def close(self) -> None:
        self.call(_cancel_the_rest())
        self.call(self.loop.shutdown_asyncgens())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()


async def _cancel_the_rest() -> None:
    tasks = asyncio.all_tasks() - {asyncio.current_task()}
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class ScriptedCollector:
    """On loopback, on its own event loop thread; `target` is its address. Use as a context
    manager (it stops at the end)."""

    def __init__(self) -> None:
        self._received: queue.Queue = queue.Queue()  # messages of every call, in order
        self._replies: asyncio.Queue | None = None  # the current call's; an _End ends it
        self._loop = LoopThread("scripted-collector")
        self._server, port = self._loop.call(self._start())
        self.target = f"127.0.0.1:{port}"
        self.calls = 0

    async def _start(self) -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Stream": grpc.stream_stream_rpc_method_handler(
                    self._stream,
                    request_deserializer=pb.AgentMessage.FromString,
                    response_serializer=pb.CollectorMessage.SerializeToString,
                )
            },
        )
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    async def _stream(self, requests, context: grpc.aio.ServicerContext):
        replies: asyncio.Queue = asyncio.Queue()
        self._replies = replies
        self.calls += 1

        async def read() -> None:
            async for msg in requests:
                self._received.put(msg)

        reader = asyncio.create_task(read())
        try:
            while not isinstance(reply := await replies.get(), _End):
                yield reply
            await context.abort(reply.code, reply.details)
        finally:
            reader.cancel()

    def message(self, timeout: float = 30.0) -> pb.AgentMessage:
        """The next message received (queue.Empty if none comes within `timeout` s)."""
        return self._received.get(timeout=timeout)

    def frames(self, n: int) -> list[pb.Frame]:
        """The next `n` messages, which must be frames."""
        messages = [self.message() for _ in range(n)]
        assert all(m.HasField("frame") for m in messages), messages
        return [m.frame for m in messages]

    def _reply(self, reply: pb.CollectorMessage | _End) -> None:
        self._loop.loop.call_soon_threadsafe(self._replies.put_nowait, reply)

    def ack(self, seq: int, durable: int) -> None:
        """Acknowledge the current call's frames up to `seq`, durable up to `durable`."""
        self._reply(pb.CollectorMessage(ack=pb.Ack(seq=seq, durable=durable)))

    def config(self, **fields) -> None:
        """Send a Config (an aggregator relays it to every open rank, in order with its acks)."""
        self._reply(pb.CollectorMessage(config=pb.Config(**fields)))

    def end(self, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE, details: str = "going away") -> None:
        """End the current call with `code`."""
        self._reply(_End(code, details))

    def __enter__(self) -> ScriptedCollector:
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call(self._server.stop(0))
        self._loop.close()


@dataclass(frozen=True)
class _End:
    """End the current call with this status."""

    code: grpc.StatusCode
    details: str
