"""Replaying a spool a dead process left behind, on the stream it was written for.

A leftover spool (`agent/spool.py`) holds its process' hello and the frames the collector had not
made durable. `replay` adopts one (locks it, so no other process replays it at once), opens a
stream with that hello, sends its frames in seq order, at most `WINDOW` ahead of the collector's
acks, half-closes, and takes the collector's last ack: the frames it made durable are done. A
spool whose every frame became durable is removed; any other is kept, holding only the frames
still to deliver. The collector de-duplicates on (job, run, rank, seq), so a frame it had
already applied is acknowledged and counted once, however often it is replayed.

The sender replays its directory's leftovers before its own first stream, and `thermoscope
replay` replays them from the command line (`cli/replay.py`); both through a `Relay`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .relay import Relay
from .spool import Spool, SpoolError

#: Frames handed to the relay and not acknowledged yet, at most (per stream).
WINDOW = 64


@dataclass(frozen=True)
class Replayed:
    """What a replay of one spool did."""

    path: Path
    frames: int  # frames it held
    durable: int  # ... that the collector has made durable
    error: str | None = None  # why the rest were not (None: all were, or the stream ended)

    @property
    def complete(self) -> bool:
        return self.durable == self.frames and self.error is None

    def __str__(self) -> str:
        done = f"{self.durable} of {self.frames} frames durable"
        return done if self.error is None else f"{done} ({self.error})"


def replay(relay: Relay, path: Path, stopping: threading.Event) -> Replayed:
    """Replay the leftover spool at `path` to the collector `relay` is connected to."""
    try:
        spool = Spool.adopt(path)
    except BlockingIOError:
        return Replayed(path, 0, 0, "another live process holds it")
    except (SpoolError, OSError) as exc:
        return Replayed(path, 0, 0, f"cannot be read: {exc}")
    frames = spool.frames()
    if not frames:
        spool.close()
        return Replayed(path, 0, 0)
    last = frames[-1][0]
    progress = _Progress(last)
    error = relay.stream(
        spool.hello, progress.feed(frames, stopping), on_open=_nothing, on_ack=progress.ack, on_config=None
    )
    progress.end()
    spool.ack(progress.durable)
    spool.close(keep=True)  # (removed when it holds nothing)
    durable = sum(1 for seq, _ in frames if seq <= progress.durable)
    if durable < len(frames) and error is None:
        error = "the collector ended the stream before making every frame durable"
    return Replayed(path, len(frames), durable, error)


class _Progress:
    """The acks of one replay, and the window its frames wait on."""

    def __init__(self, last: int) -> None:
        self.last = last
        self.accepted = 0
        self.durable = 0
        self._ended = False
        self._cond = threading.Condition()

    def ack(self, accepted: int, durable: int) -> None:
        with self._cond:  # (never beyond the last frame: a collector that says so is wrong)
            self.accepted = max(self.accepted, min(accepted, self.last))
            self.durable = max(self.durable, min(durable, self.last))
            self._cond.notify_all()

    def end(self) -> None:
        """The stream ended: the frames still waiting for the window are not sent."""
        with self._cond:
            self._ended = True
            self._cond.notify_all()

    def feed(self, frames: list[tuple[int, bytes]], stopping: threading.Event) -> Iterator[bytes]:
        for seq, data in frames:
            with self._cond:
                while seq - self.accepted > WINDOW and not self._ended:
                    self._cond.wait(0.1)
                if self._ended or stopping.is_set():
                    return
            yield data


def _nothing() -> None:
    pass
