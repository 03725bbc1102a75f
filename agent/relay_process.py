"""The relay process: a training process's gRPC, in a process of its own (`agent/relay.py`).

    python -m thermoscope.agent.relay_process FD

FD is its end of the socket pair. Its main thread reads the training process' messages
(`agent/pipe.py`) and never blocks on anything else, so a CANCEL or the end of the socket is
seen at once; a connect and a stream each run on a thread of their own, on the one `Link` kept
per collector address (`agent/link.py`), and report back over the socket. Frames are queued for
the stream as they come: the sender keeps at most `sender.WINDOW` frames unacknowledged, so the
queue stays short.

It imports neither torch nor the training process' modules, ignores SIGINT (a Ctrl-C meant for
the training loop must not cut the stream its `close()` is about to flush), and exits at the
end of the socket: after the training process closed it, or died. A stream still open then
belongs to a training process that died: the relay cancels it, so the collector sees the rank
lost, as it would have seen the process itself die (what the spool holds is replayed later),
unless the process had said it was closing (FINISH: a Ray worker stopped during its `close`),
whose stream is half-closed: a finished rank.
"""

from __future__ import annotations

import json
import logging
import queue
import signal
import socket
import sys
import threading
from contextlib import suppress

from .link import Link
from .pipe import ACK, Kind, Pipe, PipeClosed
from .security import Security

#: Seconds the relay waits for a cancelled stream's thread before it exits.
EXIT_TIME = 5.0


class RelayServer:
    """What the relay does with each message of the training process (see the module docstring)."""

    def __init__(self, pipe: Pipe) -> None:
        self.pipe = pipe
        self.security = Security()
        self.backoff = (0.2, 10.0)
        self.link: Link | None = None
        self.stopping = threading.Event()  # of the connect or stream under way
        self.frames: queue.SimpleQueue[bytes | None] | None = None  # of the open stream
        self.worker: threading.Thread | None = None
        self.finishing = False  # the training process said it is closing (FINISH)

    def serve(self) -> None:
        """Handle messages until the socket ends, then let the stream under way end."""
        try:
            while True:
                kind, payload = self.pipe.recv()
                self.handle(kind, payload)
        except PipeClosed:
            pass
        finally:
            self.finish()

    def handle(self, kind: Kind, payload: bytes) -> None:
        if kind == Kind.SETUP:
            setup = json.loads(payload)
            self.security = Security.from_json(setup["security"])
            self.backoff = tuple(setup["backoff"])
        elif kind == Kind.CONNECT:
            request = json.loads(payload)
            self._run(self._connect, request["target"], request["timeout"])
        elif kind == Kind.OPEN:
            self.frames = queue.SimpleQueue()
            self._run(self._stream, payload, self.frames)
        elif kind == Kind.FRAME:
            if self.frames is not None:
                self.frames.put(payload)
        elif kind == Kind.END:
            if self.frames is not None:
                self.frames.put(None)
        elif kind == Kind.FINISH:
            self.finishing = True
        elif kind == Kind.CANCEL:
            self.stopping.set()
            if self.link is not None:
                self.link.cancel()

    def finish(self) -> None:
        """The socket ended. A stream still open belongs to a training process that died: if it
        was closing (FINISH), the stream is half-closed, so the collector sees the rank finished;
        if not, it is cancelled, as its own death would have broken it. Then the channel closes."""
        if self.finishing and self.frames is not None:
            self.frames.put(None)
            if self.worker is not None:
                self.worker.join(EXIT_TIME)
        self.stopping.set()
        if self.link is not None:
            self.link.cancel()
        if self.worker is not None:
            self.worker.join(EXIT_TIME)
        if self.link is not None:
            self.link.close()

    def _run(self, work, *args) -> None:
        """Run a connect or a stream on its own thread, after the last one ended."""
        if self.worker is not None:
            self.worker.join()
        self.stopping = threading.Event()
        self.worker = threading.Thread(target=work, args=(*args, self.stopping), daemon=True)
        self.worker.start()

    def _connect(self, target: str, timeout: float, stopping: threading.Event) -> None:
        if self.link is None or self.link.target != target:
            if self.link is not None:
                self.link.close()
            self.link = Link(target, self.security, self.backoff)
        ready = self.link.connect(timeout, stopping.wait, stopping)
        self._send(Kind.CONNECTED, b"1" if ready else b"0")

    def _stream(self, hello: bytes, frames: queue.SimpleQueue, stopping: threading.Event) -> None:
        if self.link is None:
            self._send(Kind.CLOSED, b"no connect came before the stream")
            return
        error = self.link.stream(
            hello,
            iter(frames.get, None),
            on_open=lambda: self._send(Kind.OPENED),
            on_ack=lambda seq, durable: self._send(Kind.ACK, ACK.pack(seq, durable)),
            on_config=lambda config: self._send(Kind.CONFIG, config.SerializeToString()),
            stopping=stopping,
        )
        self._send(Kind.CLOSED, (error or "").encode())

    def _send(self, kind: Kind, payload: bytes = b"") -> None:
        with suppress(PipeClosed):  # the training process is gone: `serve` sees it and finishes
            self.pipe.send(kind, payload)


class _Forward(logging.Handler):
    """Log records go to the training process, which logs them under their own names."""

    def __init__(self, pipe: Pipe) -> None:
        super().__init__(logging.INFO)
        self.pipe = pipe

    def emit(self, record: logging.LogRecord) -> None:
        message = {"name": record.name, "level": record.levelno, "message": record.getMessage()}
        with suppress(PipeClosed):
            self.pipe.send(Kind.LOG, json.dumps(message).encode())


def main(argv: list[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pipe = Pipe(socket.socket(fileno=int(argv[1])))
    logging.basicConfig(level=logging.INFO, handlers=[_Forward(pipe)], force=True)
    RelayServer(pipe).serve()


if __name__ == "__main__":
    main(sys.argv)
