"""A bounded queue the training thread hands items to, and the one thread that takes them.

Shaped like OpenTelemetry's batch processor, with the transport left to a subclass (the sender's
stream, `sender.Sender`): the training thread only appends to a `deque` of at most `max_queue`
items (the oldest is dropped, counted and logged once when it is full) and wakes the worker
through the one condition that guards the queue and whatever the subclass counts with it; the
worker thread starts with the first item (or at once, `_start`), and `flush` and `shutdown` wait
a bounded time. After `fork` (DataLoader workers) the child's processor is emptied and inert: the
parent's thread is not in the child, so it never starts one, and `submit` ignores what it is given.

A subclass gives `_run` (the worker), and may extend `_reset` (its state, made anew after a fork),
`_busy` (what `flush` waits for), `_cancel` (a shutdown that waited long enough) and `_abandon`
(what a forked child must never touch of its parent's).
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections import deque
from typing import Any

log = logging.getLogger("thermoscope.agent")


class Processor:
    """See the module docstring."""

    thread_name = "thermoscope-processor"

    def __init__(self, max_queue: int) -> None:
        if max_queue < 1:
            raise ValueError(f"max_queue must be positive, got {max_queue}")
        self._max_queue = max_queue
        self._reset()
        ref = weakref.WeakMethod(self._after_fork_in_child)
        os.register_at_fork(after_in_child=lambda: (m := ref()) is not None and m())

    def _reset(self) -> None:
        self._queue: deque[Any] = deque(maxlen=self._max_queue)
        self._cond = threading.Condition()  # guards the queue and the subclass' counters
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.submitted = 0  # items handed over
        self.dropped = 0  # items lost (the queue was full, or as the subclass counts)
        self._drop_logged = False
        self._forked = False  # True in a forked child: inert

    def submit(self, item: Any) -> None:
        """Queue one item; never blocks. Drops (and counts) the oldest when full. Ignored in a
        forked child."""
        if self._forked:
            return
        with self._cond:
            if len(self._queue) == self._max_queue:
                self._count_drop(1, "the send queue is full")
            self._queue.append(item)
            self.submitted += 1
            self._cond.notify_all()
        if self._thread is None:
            self._start()

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until the worker is done with everything handed over (`_busy`); False if
        `timeout` passed first, or there is no worker to do it."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._busy():
                left = deadline - time.monotonic()
                if left <= 0 or self._thread is None or not self._thread.is_alive():
                    return False
                self._cond.wait(min(left, 0.05))
        return True

    def _busy(self) -> bool:
        """Under the lock: whether the worker has work left (here: items queued)."""
        return bool(self._queue)

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        raise NotImplementedError

    def _stop(self, timeout: float) -> None:
        """Stop the worker: it gets a second to end by itself, then `_cancel`, then `timeout`."""
        with self._cond:
            self._stopping.set()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(min(timeout, 1.0))
            if self._thread.is_alive():
                self._cancel()
            self._thread.join(timeout)

    def _cancel(self) -> None:
        """Make the worker's transport give up what it waits for (a shutdown that waited)."""

    def _count_drop(self, n: int, why: str) -> None:
        """Count `n` items lost (under the lock); the first loss is logged, the rest counted."""
        self.dropped += n
        if not self._drop_logged:
            self._drop_logged = True
            log.warning(
                "thermoscope: dropping frames (%s); training continues. Further drops are counted.", why
            )

    def _after_fork_in_child(self) -> None:
        """A forked child's processor is empty and inert (see the module docstring)."""
        self._abandon()
        self._reset()
        self._forked = True

    def _abandon(self) -> None:
        """In a forked child, before the reset: let go of the parent's resources untouched."""
