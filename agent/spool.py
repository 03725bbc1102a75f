"""The agent's spool: frames put on a stream that the collector has not made durable yet.

A `Sender` given a spool directory keeps every frame it sends until the collector says it is durable
(`Ack.durable`: its last checkpoint holds the frame's effects), and replays the ones still
held, in sequence order, on the next stream (a collector that was killed, restarted or
moved). The collector de-duplicates on (job, run, rank, seq), so a replayed frame it had
already applied is acknowledged and not counted twice. A frame the collector accepted
(`Ack.seq`) but has not checkpointed yet is still held: accepted is not durable.

On disk: one append-only file per agent process (`Spool.of_process`), a log of records
`<seq: u64 little-endian> <length: u32> <length bytes: a serialized AgentMessage>`; the
watermarks and the offsets of the frames still held live in memory (the file
is for this process only: it is truncated when the spool opens, so nothing of another
process's run is replayed). Memory holds only `(seq, offset, length)` per frame, so a long
outage costs disk, not RAM. The file is truncated once every frame is durable, and
rewritten with only the frames still held when its dead records outgrow the bound.

The bound is `max_bytes` of frames held: beyond it the oldest frames are evicted, but the newest
frame is always kept, however large. The spool only says how far it evicted (`evicted`): an evicted
frame was sent, so whether it is lost is the sender's to say (lost if its stream breaks before the
collector accepts it, undurable if the collector accepted it and never made it durable).

Every file operation may raise `OSError` (a directory that cannot be made, a full disk); the sender
gives the spool up then, it never lets that reach the training loop.
"""

from __future__ import annotations

import os
import re
import struct
from collections import deque
from pathlib import Path

from thermoscope.v1 import telemetry_pb2 as pb

_HEADER = struct.Struct("<QI")


class Spool:
    """Frames of one sender not durable yet, bounded by `max_bytes`; not thread-safe (the
    sender calls it under its lock)."""

    def __init__(self, path: str | Path, max_bytes: int) -> None:
        if max_bytes < 1:
            raise ValueError(f"spool bound must be positive, got {max_bytes}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._file = open(self.path, "w+b")  # noqa: SIM115 (held open for the spool's life)
        self._index: deque[tuple[int, int, int]] = deque()  # (seq, offset, length), seq order
        self.bytes = 0  # frame bytes held
        self.evicted = 0  # the highest seq evicted by the bound (0: none): it cannot be replayed

    @classmethod
    def of_process(cls, directory: str | os.PathLike, hello: pb.Hello, max_bytes: int) -> Spool:
        """This process's spool in `directory`, named for its job, run, rank and pid: a forked
        child that spools gets its own file, never its parent's."""
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{hello.job_id}-{hello.run_id}-{hello.rank}-{os.getpid()}")
        return cls(Path(directory, f"{name}.spool"), max_bytes)

    def __len__(self) -> int:
        return len(self._index)

    def append(self, seq: int, data: bytes) -> None:
        """Keep the frame `seq`, evicting the oldest beyond the bound (`evicted` says how far).

        Frames may come slightly out of order (a stream's request thread and the sender thread
        between streams each number and append their own): the index stays in seq order."""
        position = len(self._index)
        while position and self._index[position - 1][0] >= seq:
            if self._index[position - 1][0] == seq:
                raise ValueError(f"spool already holds seq {seq}")
            position -= 1
        self._file.seek(0, os.SEEK_END)
        offset = self._file.tell() + _HEADER.size
        self._file.write(_HEADER.pack(seq, len(data)))
        self._file.write(data)
        self._file.flush()  # in the OS's hands: survives this process's collector, and this process
        self._index.insert(position, (seq, offset, len(data)))
        self.bytes += len(data)
        while self.bytes > self.max_bytes and len(self._index) > 1:
            old, _, length = self._index.popleft()
            self.bytes -= length
            self.evicted = max(self.evicted, old)
        self._compact()

    def ack(self, seq: int) -> None:
        """Every frame up to `seq` is durable at the collector: forget them."""
        dropped = False
        while self._index and self._index[0][0] <= seq:
            self.bytes -= self._index.popleft()[2]
            dropped = True
        if dropped:
            self._compact()

    def frames(self, after: int = 0) -> list[tuple[int, bytes]]:
        """The frames held with seq > `after`, in seq order, read back from the file."""
        out = []
        for seq, offset, length in self._index:
            if seq > after:
                self._file.seek(offset)
                out.append((seq, self._file.read(length)))
        return out

    def clear(self) -> None:
        """Forget every frame held."""
        self._index.clear()
        self.bytes = 0
        self._compact()

    def close(self, remove: bool = True) -> None:
        self._file.close()
        if remove:
            self.path.unlink(missing_ok=True)

    def _compact(self) -> None:
        """Truncate when nothing is held; rewrite when dead records take more than the bound."""
        if not self._index:
            self._file.truncate(0)
            return
        size = self._file.seek(0, os.SEEK_END)
        if size - self.bytes - len(self._index) * _HEADER.size <= max(self.max_bytes, 1 << 20):
            return
        live = self.frames()
        tmp = self.path.with_name(self.path.name + ".tmp")
        index = deque()
        with open(tmp, "wb") as f:
            for seq, data in live:
                f.write(_HEADER.pack(seq, len(data)))
                index.append((seq, f.tell(), len(data)))
                f.write(data)
        os.replace(tmp, self.path)
        self._file.close()
        self._file = open(self.path, "r+b")  # noqa: SIM115
        self._index = index
