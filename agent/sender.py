"""Stream samples to the collector from a background thread; training never waits for it.

The queue, the thread, `flush`, `shutdown`'s bounds and the inert forked child are the generic
`Processor`'s (agent/processor.py: the training thread only appends to a bounded deque, the oldest
item dropped and counted when it is full). This is its transport, one condition guarding the queue
and the stream's counters, so that "queued", "in flight" and "acknowledged" always read
consistently. The sender thread finds the collector, connects, and streams to it through its
`Relay` (`agent/relay.py`: a child process that owns the gRPC channel, so that no gRPC thread ever
runs in the training process), retries a stream that failed with jittered exponential backoff, and
counts what was delivered and what was dropped. At most `WINDOW` frames are handed to the relay
and not yet acknowledged: the rest wait in the queue, whose bound is the one that holds. A forked
child (DataLoader workers) closes its copy of the relay's socket and never starts a thread.

The target is an address, or a function that finds one (`discovery.find_collector`): then
the thread starts at once and, while no collector is found, looks again every `interval`
seconds; a stream that ended, or a collector that does not answer, is followed by a new lookup,
so an agent follows a collector that moved. The agent samples from its first step and queues
what it samples until the link is up; only once a lookup has answered that there is no
collector is it `dormant` (its monitor samples nothing), until one is found. `shutdown`
half-closes the stream, so that the collector sees a rank that finished, not one that was lost.

Accepted is not durable. `Ack.seq` says the collector applied the frames up to it (`delivered`);
`Ack.durable` says how far its checkpoints have committed them (absent: a collector without a
database, where applied is all there is). Frames the collector applied and never made durable
are lost if it dies: `undurable` counts them (applied, above the durable mark), and `shutdown`
reports success only when it is zero and nothing was dropped, so a collector whose commits fail
(a full disk) does not pass for one that took everything. An ack for a frame that was never sent
is a protocol violation: logged once, and believed only up to the last frame sent.

Without a spool, frames in flight when a stream breaks are counted as dropped. With one
(`spool=DIR`), every frame put on a stream is also appended to a bounded on-disk spool
(`agent/spool.py`) and held until the collector says it is durable; the next stream replays the
frames still held, in sequence order, before any new one, and nothing is counted as dropped
unless a frame the spool evicted (`spool_bytes`) was in flight when its stream broke, or
`shutdown` gave up on it. An evicted frame the collector then accepts is delivered, not dropped
(it reached the collector; only its replay is gone). Sequence numbers keep increasing across
streams, and the collector de-duplicates on (job, run, rank, seq), so a replayed frame it had
already applied is acknowledged, not re-applied. A spool that fails (a directory that cannot
be made, a full disk) is given up, logged once (`spool_error`), and streaming goes on without it:
nothing the spool does raises into training.

A spool outlives its process: what it holds at `shutdown` (frames not durable at the collector,
and the queued ones, which it takes too) stays on disk and is counted in `spooled`, not dropped.
The first stream of a sender given the same directory replays, before its own frames, every
spool a dead process left there (`agent/replay.py`; `replayed` counts what became durable), and
`thermoscope replay` does the same from the command line.

A hello is one layer table, fixed for its stream. When the monitor's table changes (a module
replaced mid-run), `retable` gives the sender the new hello, under a new run id: each queued step
keeps the hello it was measured with, the stream of the old table ends (a half-close, so that the
collector makes its frames durable and acknowledges them) with its last step, and the next stream
opens with the new hello. A spool is written for one hello: at the change it is closed, and what
it still holds (frames the collector never made durable) stays on disk for `thermoscope replay`.

A site table that grows (the same run) after the first sampled step (a site first applied later: `grow`) is
declared by a new hello on a new stream: the stream in progress ends once the collector has
accepted every frame sent on it (none is lost with it), and the next one opens with the grown
hello at once. Between streams nothing is in flight, so the spool is rewritten under the new
hello (`_take_grown`: the frames it holds read 0 values at the sites that joined, as does a
sample taken before the growth: `Sample.with_sites`, `codec.grow_sites`).
The queued steps measured before it are the grown table's too (they read 0 values at its new sites).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress

from thermoscope.science.findings import Finding
from thermoscope.science.stats import LayerInfo, SiteInfo
from thermoscope.v1 import telemetry_pb2 as pb
from thermoscope.wire import codec
from thermoscope.wire.contract import shard

from . import probe
from .ledger import Ledger
from .pending import Pending
from .processor import Processor
from .relay import Relay
from .replay import WINDOW, replay
from .security import Security
from .spool import Spool

log = logging.getLogger("thermoscope.agent")


class Sender(Processor):
    """The streaming sink: the training thread's queue of sampled steps (`Processor`), and the
    thread that streams them."""

    thread_name = "thermoscope-sender"

    def __init__(
        self,
        target: str | Callable[[], str | None],
        hello: pb.AgentMessage,
        *,
        max_queue: int = 1024,
        on_config: Callable[[pb.Config], None] | None = None,
        security: Security | None = None,
        connect_timeout: float = 5.0,
        backoff: tuple[float, float] = (0.2, 10.0),
        interval: float = 5.0,
        spool: str | os.PathLike | None = None,
        spool_bytes: int = 64 << 20,
        ready: threading.Event | None = None,
    ) -> None:
        """`security`: the token and TLS settings (`security.resolve`; None: plaintext, no
        token); `connect_timeout`: seconds to wait for a collector to answer before looking it
        up again; `backoff`: the first and the longest wait after a failed
        stream (and between grpc's reconnects); `interval`: seconds between lookups while `target`
        (a function) finds no collector; `spool`: a directory for this process's spool of frames
        not durable yet (None: none, frames in flight when a stream breaks are lost);
        `spool_bytes`: its bound; `ready`: set once `hello` is final (the monitor's first sampled
        step completes its site table): a collector found before waits for it (None: final now)."""
        if spool_bytes < 1:
            raise ValueError(f"spool_bytes must be positive, got {spool_bytes}")
        self._spool_dir = spool
        self._spool_bytes = spool_bytes
        self._find = target if callable(target) else None
        # a list of collectors is sharded by job: every rank of the job picks the same one
        self.target: str | None = None if callable(target) else shard(target, hello.hello.job_id)
        self._hello = hello  # the hello of the stream open or coming (the sender thread's)
        self._latest = hello  # the hello of the steps submitted now (the training thread's)
        self._grown: pb.AgentMessage | None = None  # the hello of a grown site table, not yet streamed
        self._ready = ready
        self._interval = interval
        self._on_config = on_config
        self._connect_timeout = connect_timeout
        self._security = security or Security()
        self._backoff = backoff
        super().__init__(max_queue)
        if self._find is not None:  # (not after a fork: a DataLoader worker looks for nothing)
            self._start()

    def _reset(self) -> None:
        super()._reset()  # the queue, and the condition that also guards what follows
        self._generation = 0  # bumped when a stream ends: its frames generator must stop
        self._relay: Relay | None = None  # made and closed by the sender thread
        self._ledger = Ledger()  # where each numbered frame stands: sent, accepted, durable, lost
        # `dropped` counts frames lost: queue overflow, or in flight when a stream broke
        self.spooled = 0  # frames left in the spool at shutdown, for a later replay
        # invariant once shut down: submitted == delivered + dropped + spooled
        self.replayed = 0  # frames of dead processes' spools that the collector made durable
        self.connected = False
        self.dormant = False  # a lookup found no collector, and none has been found since
        self.last_error: str | None = None
        self.spool_error: str | None = None  # why the spool was given up (None: it works, or none)
        self._violation_logged = False
        self._leftovers_tried = False  # the spools dead processes left: replayed once per sender
        # made by the first frame kept, per process (a forked child never writes its parent's file)
        self._spool: Spool | None = None

    def _abandon(self) -> None:
        """In a forked child: the parent's relay is abandoned, never touched, and no thread or
        relay is ever made here (see the module's docstring)."""
        if self._relay is not None:
            self._relay.abandon()

    @property
    def delivered(self) -> int:
        """Frames the collector accepted (applied)."""
        return self._ledger.delivered

    @property
    def durable(self) -> int:
        """The last frame the collector said is durable (every frame up to it is)."""
        return self._ledger.durable

    @property
    def undurable(self) -> int:
        """Frames the collector accepted (applied) and has not said are durable: lost if it dies
        now. After `shutdown`, those it never made durable."""
        with self._cond:
            return self._ledger.undurable

    # -- training thread ------------------------------------------------------------------------

    def latest(self) -> None:
        """A streaming monitor derives nothing itself: its collector does."""
        return None

    def findings(self) -> list[Finding]:
        """Nor finds anything: its collector does (`/metrics`, `thermoscope events`)."""
        return []

    def submit(self, item: Pending) -> None:
        """Queue a sampled step with the hello of the table it was measured with."""
        super().submit((self._latest, item))

    def retable(self, hello: pb.AgentMessage, layers: Sequence[LayerInfo], sites: Sequence[SiteInfo]) -> None:
        """The steps submitted from now on stream with `hello` (its new tables, a new run), on a
        new stream once the steps queued before are sent (see the module docstring)."""
        self._latest = hello

    def _busy(self) -> bool:
        """`flush` waits until the collector accepted every queued frame. Accepted, not durable:
        a collector says how far it is durable only with its acks, so an open stream learns it
        with its next frame; `shutdown` learns it at the stream's end."""
        return bool(self._queue) or self._ledger.in_flight > 0

    def shutdown(self, timeout: float = 5.0) -> bool:
        """Flush (bounded), close the stream and stop the thread. True if every frame reached
        the collector and was made durable there (or applied, by a collector without a database).

        The request stream ends first (a half-close: the collector ends the call and knows
        this rank finished, makes its frames durable and says so in a last ack); the call is
        cancelled only if that takes more than a second. Frames not accepted by then are
        counted dropped; frames accepted and not durable are counted in `undurable` and logged.
        """
        relay = self._relay
        if relay is not None:  # if this process ends during the flush, its rank still finished
            relay.finishing()
        flushed = self.flush(timeout) if self._thread is not None else not self._queue
        self._stop(timeout)
        kept = 0
        with self._cond:
            self._swap_grown()  # (the thread has stopped: nothing is in flight)
            if self._spool is not None:
                kept = self._keep_in_spool()
            if self._queue:
                self._count_drop(len(self._queue), "the collector could not take them before shutdown")
                self._queue.clear()
            self._lose_upto(self._ledger.seq, "the collector had not acknowledged them at shutdown")
        undurable = self.undurable
        if undurable and not kept:
            log.warning(
                "thermoscope: %d frames were applied by the collector at %s but not made durable "
                "(its checkpoints failed or had not run): they are lost if it stops",
                undurable,
                self.target,
            )
        return flushed and not (undurable or self.dropped or self.spooled)

    def _keep_in_spool(self) -> int:
        """At shutdown (under the lock): the queued frames join the spool, and the spool stays on
        disk with every frame the collector has not made durable, for a later replay; those the
        collector has not accepted count as `spooled`, not dropped. Returns how many it keeps."""
        held = 0
        ledger = self._ledger
        with self._spooling():
            while self._queue and self._queue[0][0] is self._hello:
                seq = ledger.next()
                self._spool.append(seq, self._encode(self._queue.popleft(), seq))
            if self._queue:  # measured with a later table than the spool's: it cannot replay them
                self._count_drop(len(self._queue), "their layer table changed and the collector is away")
                self._queue.clear()
            self._lose_upto(self._spool.evicted, "evicted from the spool before the collector took them")
            held = len(self._spool)
            self.spooled = self._spool.count(after=ledger.acked)
            ledger.settle_kept(ledger.seq)  # kept for a replay, never accepted (not undurable)
            self._spool.close(keep=True)
            if held:
                log.warning(
                    "thermoscope: %d frames the collector at %s did not make durable are kept in the spool "
                    "%s: the next Monitor with this spool, or `thermoscope replay --spool %s`, delivers them",
                    held,
                    self.target,
                    self._spool.path,
                    self._spool_dir,
                )
        self._spool = None
        return held

    def _lose_upto(self, seq: int, why: str) -> None:
        """Frames numbered up to `seq` that the collector has not accepted will never be: count
        them dropped (call under the lock)."""
        lost = self._ledger.lose_upto(seq)
        if lost:
            self._count_drop(lost, why)

    @contextmanager
    def _spooling(self) -> Iterator[None]:
        """Around every use of the spool (under the lock): a spool that fails is given up, once,
        and streaming goes on without it; nothing it raises may reach the training loop."""
        try:
            yield
        except OSError as exc:
            self.spool_error = f"{exc!r} in {self._spool_dir}"
            log.error(
                "thermoscope: the spool failed (%s); streaming goes on without it: frames in flight "
                "when a stream breaks are now dropped and counted",
                self.spool_error,
            )
            self._spool_dir = None
            spool, self._spool = self._spool, None
            if spool is not None:
                with suppress(OSError):  # (its file is closed all the same)
                    spool.close()

    def _cancel(self) -> None:
        relay = self._relay
        if relay is not None:
            relay.cancel()

    # -- sender thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        delay = self._backoff[0]
        relay = self._relay = Relay(self._security, self._backoff)
        try:
            while not self._stopping.is_set():
                if self._find is not None and not self._look_up():
                    self._stopping.wait(self._interval)
                    continue
                if not relay.connect(self.target, self._connect_timeout, self._idle, self._stopping):  # type: ignore[arg-type]
                    # look up again, and wait again: the channel paces its reconnects itself
                    self._note_error(relay.error or self._why_not(self.target))  # type: ignore[arg-type]
                    continue
                if not self._hello_final():
                    continue
                self._take_grown()
                with self._cond:
                    if self._queue and self._queue[0][0] is not self._hello:
                        self._switch(self._queue[0][0])
                started = time.monotonic()
                self._replay_leftovers(relay)
                error = relay.stream(
                    self._hello.SerializeToString(),
                    self._frames(self._generation),
                    on_open=self._opened,
                    on_ack=self._take_ack,
                    on_config=self._on_config,
                )
                self._end_stream()
                if error is not None:
                    self._note_error(error)
                elif self._take_grown():
                    continue  # ended to declare a grown site table: open the next stream at once
                if time.monotonic() - started > 30:
                    delay = self._backoff[0]  # the stream had been healthy: start the backoff over
                self._idle(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, self._backoff[1])
        finally:
            relay.close()

    def grow(self, hello: pb.AgentMessage) -> None:
        """The site table grew: streams open with `hello` once no frame of the old one is held;
        the steps queued with the table it grew from are its steps too."""
        with self._cond:
            old, self._grown, self._latest = self._latest, hello, hello
            for i, (measured, item) in enumerate(self._queue):
                if measured is old:
                    self._queue[i] = (hello, item)
            self._cond.notify_all()

    def _take_grown(self) -> bool:
        """Between streams (nothing in flight): stream with the grown hello from now on, if there
        is one; True if it was taken."""
        with self._cond:
            return self._swap_grown()

    def _swap_grown(self) -> bool:
        """`_take_grown` under `_cond`: the spool's frames (sent, not durable yet) are written
        anew under the grown hello, read against its table (`codec.grow_sites`)."""
        if self._grown is None:
            return False
        self._hello, self._grown = self._grown, None
        if self._spool is not None:
            n_sites = len(self._hello.hello.sites)
            with self._spooling():
                held = self._spool.frames(self._ledger.durable)
                evicted = self._spool.evicted
                self._spool.close()
                self._spool = None
                self._spool = Spool.create(self._spool_dir, self._hello, self._spool_bytes)  # type: ignore[arg-type]
                self._spool.evicted = evicted
                for seq, data in held:
                    self._spool.append(seq, codec.grow_sites(data, n_sites))
        return True

    def _hello_final(self) -> bool:
        """Wait until the hello is final: the stream opens with the site table the first sampled
        step completed (functional sites included). False if the sender stops first."""
        while self._ready is not None and not self._ready.wait(0.1):
            if self._stopping.is_set():
                return False
        return True

    def _replay_leftovers(self, relay: Relay) -> None:
        """Before the first stream of this sender: replay the spools dead processes left in its
        directory (once; what fails to become durable stays on disk for the next try)."""
        if self._spool_dir is None or self._leftovers_tried:
            return
        self._leftovers_tried = True
        try:
            leftovers = Spool.leftovers(self._spool_dir)
        except OSError:  # no directory yet: nothing was left
            return
        for path in leftovers:
            if self._stopping.is_set():
                return
            done = replay(relay, path, self._stopping)
            self.replayed += done.durable
            log.log(
                logging.INFO if done.complete else logging.WARNING,
                "thermoscope: replayed %s to %s: %s",
                path,
                self.target,
                done,
            )

    def _idle(self, seconds: float) -> None:
        """Wait while no stream is open (until `seconds` pass or shutdown). With a spool, spill the
        oldest queued frames into it once the queue is half full: during an outage the spool's
        bytes bound what is kept, not the queue's length (a short wait stays in memory)."""
        deadline = time.monotonic() + seconds
        while not self._stopping.is_set():
            with self._cond:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                if self._spool_dir is None or len(self._queue) < max(1, self._max_queue // 2):
                    self._cond.wait(left)  # woken by `submit` and `shutdown`
                    continue
                self._swap_grown()  # (no stream is open: a grown hello is taken before this frame)
                if self._queue[0][0] is not self._hello:
                    self._switch(self._queue[0][0])
                item = self._queue.popleft()
                seq = self._ledger.next()
            if not self._keep(seq, self._encode(item, seq)):
                with self._cond:  # no stream is open: what the spool held can never be sent
                    self._lose_upto(self._ledger.seq, "the spool failed with frames waiting for a stream")

    def _switch(self, hello: pb.AgentMessage) -> None:
        """Between streams (under the lock): the next stream opens with the new table's `hello`; the
        old table's spool is closed, what it holds left for `thermoscope replay`."""
        log.info("thermoscope: the layer table changed: streaming as run %r from now on", hello.hello.run_id)
        self._hello = hello
        if self._spool is not None:
            with self._spooling():
                if len(self._spool):
                    log.warning(
                        "thermoscope: %d frames of the previous layer table are left in %s for `thermoscope "
                        "replay` (the collector had not made them durable)",
                        len(self._spool),
                        self._spool.path,
                    )
                self._spool.close(keep=True)
            self._spool = None

    def _keep(self, seq: int, data: bytes) -> bool:
        """Append a frame to the spool (made here, by this process's first frame kept); False if
        the spool is given up (it failed now, or before)."""
        with self._cond:
            with self._spooling():
                if self._spool is None and self._spool_dir is not None:
                    self._spool = Spool.create(self._spool_dir, self._hello, self._spool_bytes)
                if self._spool is not None:
                    self._spool.append(seq, data)
            return self._spool is not None

    def _look_up(self) -> bool:
        """Find the collector; False (dormant for another interval) if there is none."""
        try:
            target = self._find()  # type: ignore[misc]
            if target is not None:
                target = shard(target, self._hello.hello.job_id)
        except Exception as exc:  # a lookup that fails is retried; it must never kill the thread
            self._note_error(f"looking up the collector failed: {exc!r}")
            self.dormant = True
            return False
        if target != self.target and target is not None:
            log.info("thermoscope: collector found at %s", target)
        self.target = target
        self.dormant = target is None
        return target is not None

    def _opened(self) -> None:
        """The collector answered on a new stream."""
        self.connected, self.last_error = True, None
        log.info("thermoscope: streaming to %s", self.target)

    def _end_stream(self) -> None:
        """Retire the stream's frames generator and count the frames that died with it: those the
        spool cannot replay (all of them without one, those it evicted with one)."""
        with self._cond:
            self.connected = False
            self._generation += 1
            if self._spool_dir is None:
                self._lose_upto(self._ledger.seq, "a stream broke with frames in flight")
            elif self._spool is not None:
                self._lose_upto(self._spool.evicted, "evicted from the spool while in flight")
            self._cond.notify_all()

    def _why_not(self, target: str) -> str:
        """Why the connect to `target` failed: something else answered there, or nothing did. A
        TLS channel is not probed (the probe speaks plaintext)."""
        other = None if self._security.tls else probe.not_a_collector(target)
        return other or f"no collector answering at {target}"

    def _note_error(self, error: str) -> None:
        """Log an error once (until another one comes): the stream is retried meanwhile."""
        if error != self.last_error and not self._stopping.is_set():
            log.warning("thermoscope: collector stream at %s: %s (retrying with backoff)", self.target, error)
        self.last_error = error

    def _take_ack(self, accepted: int, durable: int) -> None:
        """Count what the collector accepted; free the spool up to what it persisted. Neither can
        be beyond the last frame sent: a collector that says so breaks the protocol."""
        with self._cond:
            sent = self._ledger.seq
            violation, moved = self._ledger.take_ack(accepted, durable)
            if violation and not self._violation_logged:
                self._violation_logged = True
                log.error(
                    "thermoscope: protocol violation: the collector at %s acknowledged frame %d "
                    "(durable %d) when %d were sent; believed up to %d",
                    self.target,
                    accepted,
                    durable,
                    sent,
                    sent,
                )
            if moved is not None and self._spool is not None:
                with self._spooling():
                    self._spool.ack(moved)
            self._cond.notify_all()

    def _frames(self, generation: int) -> Iterator[bytes]:
        """The serialized frames of one stream: those the spool holds (sent, not durable at the
        collector) first, in seq order, then one per queued sample; at most `WINDOW` ahead of
        the collector's acks.

        Runs on the relay's writer thread. It ends when stopping with nothing left, or when its
        stream was retired (it must not take a frame that no stream would carry).
        """
        replay: list[tuple[int, bytes]] = []
        with self._cond:
            with self._spooling():
                if self._spool is not None:
                    replay = self._spool.frames(self._ledger.durable)
            if self._spool_dir is None:  # nothing to replay: frames not accepted yet never will be
                self._lose_upto(self._ledger.seq, "a stream broke with frames in flight")
        for seq, data in replay:
            with self._cond:
                while generation == self._generation and seq - self._ledger.acked > WINDOW:
                    self._cond.wait()
                if generation != self._generation:
                    return
            yield data
        while True:
            with self._cond:
                while generation == self._generation and (
                    (not self._queue and not self._stopping.is_set())
                    or (self._queue and self._ledger.in_flight >= WINDOW)
                    or (self._grown is not None and self._ledger.in_flight)
                ):
                    self._cond.wait()
                if generation != self._generation or not self._queue or self._grown is not None:
                    return  # (a grown site table: this stream ends, the next declares it)
                if self._queue[0][0] is not self._hello:  # a new table: this stream ends here
                    return
                item = self._queue.popleft()
                seq = self._ledger.next()
            data = self._encode(item, seq)
            if self._spool_dir is not None:  # (no ack for `seq` can come before it is sent)
                self._keep(seq, data)  # a spool that fails is given up: the frame goes on
            yield data

    def _encode(self, item: tuple[pb.AgentMessage, Pending], seq: int) -> bytes:
        """A frame of the stream's hello: a sample taken before its site table grew reads 0
        values at the sites that joined since."""
        sample = item[1].to_sample().with_sites(len(self._hello.hello.sites))
        return codec.encode(sample, seq).SerializeToString()
