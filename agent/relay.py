"""The training process's end of its relay: a child process that owns everything gRPC.

gRPC's C core runs threads and registers `fork` handlers; a training process whose DataLoader
forks workers while a gRPC stream is busy crashed some of those workers (SIGSEGV, or "exited
unexpectedly"), and turning grpc's fork support off only works if it is done before anything
imports grpc (Ray workers and many trainers import it first). So the training process never
imports grpc at all: its sender talks to a relay process over a socket pair (`agent/pipe.py`),
and the relay (`agent/relay_process.py`, started with `subprocess`, so it is a fresh
interpreter, not a fork) keeps the gRPC channel (`agent/link.py`) and streams the frames it is
handed, as they were serialized, to the collector. This is how node agents of monitoring
systems are commonly built, and it leaves the training process with plain threads and one
socket, which forks safely: a forked child closes its copy of the socket (`abandon`) and never
writes to it.

`Relay` has the shape of the link it replaces: `connect(target, ...)` waits for the channel to
be READY, `stream(...)` runs one stream to its end, handing acks and configs back on the
caller's thread while a writer thread feeds it frames, `cancel` ends it from another thread.
The relay is started on the first `connect`, and again if it died (its exit is a broken stream,
like any other); `close` closes the socket, and the relay, reading end of file, half-closes
what it streams and exits. It also exits when the training process dies, however it died.
The relay's log records come back over the socket and are logged here, under their own names.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import suppress

from thermoscope.v1 import telemetry_pb2 as pb

from .pipe import ACK, Kind, Pipe, PipeClosed
from .security import Security

log = logging.getLogger("thermoscope.agent")

#: Seconds a new relay may take to start (a fresh interpreter importing grpc) on top of a
#: connect's own timeout, and a closing relay to exit before it is killed.
START_TIME = 30.0
EXIT_TIME = 5.0

_abandoned: list[subprocess.Popen] = []  # a forked child's inherited relays: never waited for


class Relay:
    """One relay process and the socket to it (see the module docstring)."""

    def __init__(self, security: Security, backoff: tuple[float, float]) -> None:
        """`security`: the token and TLS settings the relay's channels use; `backoff`: the
        first and the longest wait between the channel's reconnects."""
        self._setup = json.dumps({"security": security.to_json(), "backoff": list(backoff)}).encode()
        self._process: subprocess.Popen | None = None
        self._pipe: Pipe | None = None
        self._writer: threading.Thread | None = None
        self._fresh = False  # the relay was just started: its first connect may take longer
        self.target: str | None = None
        self.error: str | None = None  # why the last connect failed, if the relay failed it

    def connect(
        self, target: str, timeout: float, wait: Callable[[float], None], stopping: threading.Event
    ) -> bool:
        """Wait until the channel to `target` is READY (the relay's grpc connects and
        reconnects meanwhile); False if `timeout` passed, `stopping` was set or the relay could
        not be started (`error` says which). `wait(seconds)` passes the time meanwhile (the
        sender spills its queue into the spool)."""
        self.target = target
        deadline = time.monotonic() + timeout
        try:
            pipe = self._started()
            deadline += START_TIME if self._fresh else 0.0
            pipe.send(Kind.CONNECT, json.dumps({"target": target, "timeout": timeout}).encode())
            while not stopping.is_set():
                while (message := pipe.recv(0)) is not None:
                    kind, payload = message
                    if kind == Kind.CONNECTED:
                        self._fresh = False
                        self.error = None  # (the channel did not become ready: the caller says why)
                        return payload == b"1"
                    self._other(kind, payload)
                if time.monotonic() > deadline:  # a relay that does not answer is broken
                    self.error = "the relay process did not answer; starting another"
                    self._stop(kill=True)
                    return False
                wait(0.05)
            return False
        except (OSError, PipeClosed) as exc:
            self.error = f"the relay process failed ({self._why(exc)}); starting another"
            self._stop(kill=True)
            while (left := deadline - time.monotonic()) > 0 and not stopping.is_set():
                wait(min(left, 0.05))  # no faster than a connect that timed out
            return False

    def stream(
        self,
        hello: bytes,
        frames: Iterator[bytes],
        *,
        on_open: Callable[[], None],
        on_ack: Callable[[int, int], None],
        on_config: Callable[[pb.Config], None] | None,
    ) -> str | None:
        """Run one stream to its end: None if the collector ended it, else what went wrong.

        `hello` and `frames` are serialized AgentMessages; a writer thread hands the frames to
        the relay until `frames` ends (then the stream is half-closed). `on_open()` comes with
        the collector's first reply, `on_ack(accepted, durable)` with each ack, `on_config` with
        each config, all on this (the caller's) thread."""
        if self._writer is not None:  # the last stream's writer has ended (its frames retired)
            self._writer.join()
        pipe = self._pipe
        if pipe is None:
            return "no relay process"
        try:
            pipe.send(Kind.OPEN, hello)
            self._writer = threading.Thread(
                target=self._write, args=(pipe, frames), name="thermoscope-relay-writer", daemon=True
            )
            self._writer.start()
            while True:
                kind, payload = pipe.recv()
                if kind == Kind.CLOSED:
                    return payload.decode() or None
                if kind == Kind.OPENED:
                    on_open()
                elif kind == Kind.ACK:
                    on_ack(*ACK.unpack(payload))
                elif kind == Kind.CONFIG and on_config is not None:
                    on_config(pb.Config.FromString(payload))
                else:
                    self._other(kind, payload)
        except PipeClosed as exc:
            why = self._why(exc)
            self._stop(kill=True)
            return why

    def cancel(self) -> None:
        """Cancel the stream under way, if any (from another thread: a shutdown that waited)."""
        pipe = self._pipe
        if pipe is not None:
            with suppress(PipeClosed):
                pipe.send(Kind.CANCEL)

    def finishing(self) -> None:
        """The training process is closing: if it ends before its stream did (a Ray worker is
        stopped right after its training function returns), the relay ends the stream as a
        finished rank's, not as a dead one's."""
        pipe = self._pipe
        if pipe is not None:
            with suppress(PipeClosed):
                pipe.send(Kind.FINISH)

    def close(self) -> None:
        """Close the socket and let the relay exit (it half-closes what it streams first);
        killed if it takes more than `EXIT_TIME`."""
        self._stop(kill=False)

    def abandon(self) -> None:
        """In a forked child: close this process' copy of the socket (the parent's stays open)
        and never touch the parent's relay process."""
        if self._pipe is not None:
            self._pipe.close()
        if self._process is not None:
            _abandoned.append(self._process)
        self._pipe = self._process = None

    # -- the relay process -----------------------------------------------------------------------

    def _started(self) -> Pipe:
        """The pipe to a running relay, starting one if there is none (or it exited)."""
        if self._pipe is not None and self._process is not None and self._process.poll() is None:
            return self._pipe
        self._stop(kill=True)
        ours, theirs = socket.socketpair()
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "thermoscope.agent.relay_process", str(theirs.fileno())],
                pass_fds=(theirs.fileno(),),
                stdin=subprocess.DEVNULL,
                env={**os.environ, "GRPC_ENABLE_FORK_SUPPORT": "0"},
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._pipe = Pipe(ours)
        self._fresh = True
        self._pipe.send(Kind.SETUP, self._setup)
        return self._pipe

    def _stop(self, kill: bool) -> None:
        """Close the socket; wait for the relay to exit (at once if `kill`). A writer still
        running ends by itself: its frames are retired, and its socket is closed."""
        pipe, process = self._pipe, self._process
        self._pipe = self._process = None
        if pipe is not None:
            pipe.close()
        if process is not None:
            if kill:
                process.kill()
            try:
                process.wait(EXIT_TIME)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def _why(self, exc: Exception) -> str:
        status = self._process.poll() if self._process is not None else None
        return f"the relay process exited with status {status}" if status is not None else str(exc)

    @staticmethod
    def _write(pipe: Pipe, frames: Iterator[bytes]) -> None:
        """The writer thread: the stream's frames, then its end (nothing if the relay is gone)."""
        with suppress(PipeClosed):
            for frame in frames:
                pipe.send(Kind.FRAME, frame)
            pipe.send(Kind.END)

    @staticmethod
    def _other(kind: Kind, payload: bytes) -> None:
        """A message that belongs to no call: the relay's log records (anything else is stale:
        the reply to a connect or stream given up on)."""
        if kind == Kind.LOG:
            record = json.loads(payload)
            logging.getLogger(record["name"]).log(record["level"], "%s", record["message"])
