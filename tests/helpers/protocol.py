"""Agents written against the wire contract, without the Monitor: hellos, samples and frames
built by hand (the load generator's, `thermoscope.cli.raw_protocol`, as the tests' agents name
themselves), one-shot streams, streams held open (in this process or a client process of their
own, to freeze), and a server that never reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator

import grpc

from thermoscope.cli import raw_protocol
from thermoscope.cli.raw_protocol import BINS, frame, histogram, layer_table, sample, site_stats
from thermoscope.v1 import telemetry_pb2 as pb
from thermoscope.v1 import telemetry_pb2_grpc as pb_grpc
from thermoscope.wire.contract import SERVICE

__all__ = [
    "AGENT",
    "BINS",
    "RUN",
    "OpenStream",
    "frame",
    "held_in_a_process",
    "hello",
    "histogram",
    "layer_table",
    "sample",
    "site_stats",
    "stalled_collector",
    "stream",
]

#: The run the tests' raw agents belong to, and the host and version they give.
RUN, AGENT = "r1", "test"
#: `raw_protocol.hello` of the tests' agents (`run=` names another run).
hello = functools.partial(raw_protocol.hello, run=RUN, agent=AGENT)


def stream(target: str, messages) -> tuple[list[pb.CollectorMessage], grpc.RpcError | None]:
    """Send `messages` on one Telemetry stream; return the replies and the error, if any."""
    with grpc.insecure_channel(target) as channel:
        call = pb_grpc.TelemetryStub(channel).Stream(iter(messages), timeout=15)
        replies: list[pb.CollectorMessage] = []
        try:
            replies.extend(call)
        except grpc.RpcError as exc:
            return replies, exc
        return replies, None


class OpenStream:
    """An agent's stream held open: send messages one at a time and read the replies.

    `config` is the Config that answered the hello; `metadata`: the call's (a bearer token).
    Replies are read by a thread, so that `reply` can wait a bounded time; `cancel` breaks the
    call as a crashed agent would.
    """

    _END = object()

    def __init__(self, target: str, first: pb.AgentMessage, metadata=None) -> None:
        self._outbox: queue.Queue = queue.Queue()
        self._outbox.put(first)
        self._inbox: queue.Queue = queue.Queue()
        self._channel = grpc.insecure_channel(target)
        self._call = pb_grpc.TelemetryStub(self._channel).Stream(
            iter(self._outbox.get, None), metadata=metadata, timeout=30
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        first_reply = self.reply()
        assert first_reply.HasField("config")
        self.config = first_reply.config

    def _read(self) -> None:
        try:
            for reply in self._call:
                self._inbox.put(reply)
        except grpc.RpcError:
            pass
        finally:
            self._inbox.put(self._END)

    def send(self, msg: pb.AgentMessage) -> None:
        self._outbox.put(msg)

    def reply(self, timeout: float = 15.0) -> pb.CollectorMessage:
        """The next reply (queue.Empty if none came within `timeout` s)."""
        item = self._inbox.get(timeout=timeout)
        if item is self._END:
            self._inbox.put(item)
            raise EOFError("the call has ended")
        return item

    def acks_to_the_end(self, timeout: float = 60.0) -> list[pb.Ack]:
        """The acks this stream gets until its call ends (configs skipped)."""
        acks = []
        while True:
            try:
                reply = self.reply(timeout=timeout)
            except EOFError:
                return acks
            if reply.HasField("ack"):
                acks.append(reply.ack)

    def ack(self, msg: pb.AgentMessage) -> int:
        """Send a frame and return the sequence number the collector acknowledged."""
        self.send(msg)
        return self.reply().ack.seq

    def close(self) -> None:
        """Half-close the requests (the agent finished) and read the call to its end."""
        self._outbox.put(None)
        self._reader.join(timeout=15)
        self._channel.close()

    def cancel(self) -> None:
        """Break the call (an agent that crashed or lost its connection)."""
        self._call.cancel()
        self._reader.join(timeout=15)
        self._channel.close()


@contextlib.contextmanager
def stalled_collector() -> Iterator[str]:
    """A gRPC server that accepts the Telemetry stream and never reads it (flow control stalls)."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def stall(requests, context):
        await asyncio.Event().wait()  # never reads a request, never replies
        yield b""

    async def start() -> tuple[grpc.aio.Server, int]:
        server = grpc.aio.server()
        handler = grpc.method_handlers_generic_handler(
            SERVICE, {"Stream": grpc.stream_stream_rpc_method_handler(stall)}
        )
        server.add_generic_rpc_handlers((handler,))
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(0), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


#: A client process that holds one stream after its hello, says "held" once answered, and waits.
_HOLDER = """
import sys, time, grpc
from thermoscope.v1 import telemetry_pb2_grpc as pb_grpc
from thermoscope.cli.raw_protocol import hello
def requests():
    yield hello(sys.argv[2], run="r1", agent="test")
    time.sleep(3600)
channel = grpc.insecure_channel(sys.argv[1])
call = pb_grpc.TelemetryStub(channel).Stream(requests(), metadata=(("authorization", sys.argv[3]),))
next(call)
print("held", flush=True)
time.sleep(3600)
"""


def held_in_a_process(target: str, job: str, authorization: str) -> subprocess.Popen:
    """A client process holding a stream of `job` (its hello answered), sent with the
    `authorization` metadata value: to freeze (SIGSTOP) or kill; the caller ends it."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, target, job, authorization], stdout=subprocess.PIPE, text=True
    )
    if holder.stdout.readline().strip() != "held":
        holder.kill()
        holder.wait()
        raise RuntimeError(f"the client process could not hold a stream of {job!r} at {target}")
    return holder
