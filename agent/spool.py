"""The agent's spool: frames put on a stream that the collector has not made durable yet.

A `Sender` given a spool directory keeps every frame it sends until the collector says it is durable
(`Ack.durable`: its last checkpoint holds the frame's effects), and replays the ones still
held, in sequence order, on the next stream (a collector that was killed, restarted or
moved). The collector de-duplicates on (job, run, rank, seq), so a replayed frame it had
already applied is acknowledged and not counted twice. A frame the collector accepted
(`Ack.seq`) but has not checkpointed yet is still held: accepted is not durable.

A spool outlives its process. What it still holds when the monitor closes (frames the collector
never made durable, and those it never took) stays on disk, as a disk buffer should: the next
`Sender` given the same directory (or `thermoscope replay`) finds it among the `leftovers`,
`adopt`s it and replays it with the hello it was written for; the collector's de-duplication
keeps that from counting anything twice. A process holds an exclusive `flock` on its file while
it lives, so a file is a leftover exactly when no live process holds it (the lock goes with the
process, however it died).

On disk: one append-only file per agent process (`Spool.create`): the `MAGIC` line, then records
`<seq: u64 little-endian> <length: u32> <length bytes>`, the first of which (seq 0) is the
serialized hello and the others serialized frames. The offsets of the frames still held live in
memory (`(seq, offset, length)` per frame, so a long outage costs disk, not RAM). The file is cut
back to its hello once every frame is durable, and rewritten with only the frames still held when
its dead records outgrow the bound, and when it is kept at close.

The bound is `max_bytes` of frames held: beyond it the oldest frames are evicted, but the newest
frame is always kept, however large. The spool only says how far it evicted (`evicted`): an evicted
frame was sent, so whether it is lost is the sender's to say (lost if its stream breaks before the
collector accepts it, undurable if the collector accepted it and never made it durable).

Every file operation may raise `OSError` (a directory that cannot be made, a full disk); the sender
gives the spool up then, it never lets that reach the training loop.
"""

from __future__ import annotations

import fcntl
import os
import re
import struct
import time
from collections import deque
from pathlib import Path

from thermoscope.v1 import telemetry_pb2 as pb

MAGIC = b"thermoscope spool 2\n"
_HEADER = struct.Struct("<QI")


class SpoolError(ValueError):
    """A file that is not a spool this release can replay (another format, or no hello)."""


class Spool:
    """Frames of one sender not durable yet, bounded by `max_bytes`; not thread-safe (the
    sender calls it under its lock)."""

    def __init__(self, path: str | Path, max_bytes: int, hello: bytes = b"") -> None:
        """A new spool at `path` for the stream that opens with `hello` (serialized), locked by
        this process; a file already there is overwritten."""
        if max_bytes < 1:
            raise ValueError(f"spool bound must be positive, got {max_bytes}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = _locked(self.path, os.O_CREAT | os.O_TRUNC)
        self._file.write(MAGIC)
        self._write(0, hello)
        self._init(max_bytes, hello)

    def _init(self, max_bytes: int, hello: bytes) -> None:
        self.max_bytes = max_bytes
        self.hello = hello
        self._base = len(MAGIC) + _HEADER.size + len(hello)  # where the frames start
        self._index: deque[tuple[int, int, int]] = deque()  # (seq, offset, length), seq order
        self.bytes = 0  # frame bytes held
        self.evicted = 0  # the highest seq evicted by the bound (0: none): it cannot be replayed

    @classmethod
    def create(cls, directory: str | os.PathLike, hello: pb.AgentMessage, max_bytes: int) -> Spool:
        """This process's spool in `directory`, named for its job, run, rank and pid: a forked
        child that spools gets its own file, never its parent's. A leftover of a dead process
        that had the same pid (a restarted container) is moved aside, never overwritten."""
        h = hello.hello
        stem = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{h.job_id}-{h.run_id}-{h.rank}-{os.getpid()}")
        path = Path(directory, f"{stem}.spool")
        if path.exists() and path.stat().st_size:  # a dead process' frames: a leftover to replay
            os.replace(path, path.with_name(f"{stem}-{time.time_ns()}.spool"))
        return cls(path, max_bytes, hello.SerializeToString())

    @classmethod
    def leftovers(cls, directory: str | os.PathLike) -> list[Path]:
        """The spool files in `directory` that no live process holds, oldest first."""
        found = []
        for path in sorted(Path(directory).glob("*.spool"), key=lambda p: p.stat().st_mtime):
            try:
                _locked(path).close()
            except (BlockingIOError, FileNotFoundError):  # a live process' own, or gone meanwhile
                continue
            found.append(path)
        return found

    @classmethod
    def adopt(cls, path: str | Path, max_bytes: int = 1 << 62) -> Spool:
        """A leftover spool, locked by this process from now on: its hello and the frames it
        holds (a record cut short by a crash ends it). BlockingIOError if a live process holds
        it; SpoolError if it is not a spool this release wrote."""
        spool = cls.__new__(cls)
        spool.path = Path(path)
        spool._file = _locked(spool.path)
        try:
            if spool._file.read(len(MAGIC)) != MAGIC:
                raise SpoolError(f"{path} is not a spool of this release (no {MAGIC!r} header)")
            records = list(_records(spool._file))
            if not records or records[0][0] != 0:
                raise SpoolError(f"{path} holds no hello")
            _, offset, length = records[0]
            spool._file.seek(offset)
            spool._init(max_bytes, spool._file.read(length))
            for seq, offset, length in records[1:]:
                if spool._index and seq <= spool._index[-1][0]:
                    continue  # (an unlikely re-append after a compaction's crash: keep the first)
                spool._index.append((seq, offset, length))
                spool.bytes += length
        except BaseException:
            spool._file.close()
            raise
        return spool

    def __len__(self) -> int:
        return len(self._index)

    def count(self, after: int = 0) -> int:
        """How many frames held have seq > `after`."""
        return sum(1 for seq, _, _ in self._index if seq > after)

    def append(self, seq: int, data: bytes) -> None:
        """Keep the frame `seq`, evicting the oldest beyond the bound (`evicted` says how far).

        Frames may come slightly out of order (a stream's request thread and the sender thread
        between streams each number and append their own): the index stays in seq order."""
        position = len(self._index)
        while position and self._index[position - 1][0] >= seq:
            if self._index[position - 1][0] == seq:
                raise ValueError(f"spool already holds seq {seq}")
            position -= 1
        offset = self._write(seq, data)
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

    def close(self, keep: bool = False) -> None:
        """Close the file, and remove it unless `keep` and it holds frames: then it is rewritten
        with only those (and its hello), for a later replay."""
        if keep and self._index:
            self._rewrite()
            os.fsync(self._file.fileno())
            self._file.close()
            return
        self.path.unlink(missing_ok=True)
        self._file.close()

    def _write(self, seq: int, data: bytes) -> int:
        """Append one record; the offset of its data. In the OS's hands on return: it survives
        this process, whatever kills it."""
        self._file.seek(0, os.SEEK_END)
        offset = self._file.tell() + _HEADER.size
        self._file.write(_HEADER.pack(seq, len(data)) + data)
        self._file.flush()
        return offset

    def _compact(self) -> None:
        """Cut back to the hello when nothing is held; rewrite when dead records take more than
        the bound."""
        if not self._index:
            self._file.truncate(self._base)
            return
        size = self._file.seek(0, os.SEEK_END)
        if size - self._base - self.bytes - len(self._index) * _HEADER.size > max(self.max_bytes, 1 << 20):
            self._rewrite()

    def _rewrite(self) -> None:
        """The file anew with its hello and the frames held only, replacing it atomically (the
        lock moves to the new file, which this process holds from now on)."""
        live = self.frames()
        tmp = self.path.with_name(self.path.name + ".tmp")
        index = deque()
        with open(tmp, "wb") as f:
            f.write(MAGIC + _HEADER.pack(0, len(self.hello)) + self.hello)
            for seq, data in live:
                f.write(_HEADER.pack(seq, len(data)))
                index.append((seq, f.tell(), len(data)))
                f.write(data)
        new = _locked(tmp)
        os.replace(tmp, self.path)
        self._file.close()
        self._file = new
        self._index = index


def _locked(path: Path, flags: int = 0):
    """`path` opened for reading and writing (with extra `os.open` flags), under this process'
    exclusive lock: BlockingIOError if another live process holds it."""
    fd = os.open(path, os.O_RDWR | flags, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "r+b")


def _records(file) -> list[tuple[int, int, int]]:
    """(seq, offset, length) of each whole record from the file's position on."""
    out = []
    while len(header := file.read(_HEADER.size)) == _HEADER.size:
        seq, length = _HEADER.unpack(header)
        offset = file.tell()
        if len(file.read(length)) < length:
            break  # cut short: the process died writing it
        out.append((seq, offset, length))
    return out
