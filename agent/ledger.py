"""`Ledger`: where each frame a sender numbered stands: sent, accepted, durable, or lost.

The sender's transport (`sender.Sender`) numbers frames as it puts them on a stream (`seq`) and
learns from the collector's acks how far they were accepted (applied: `acked`) and made durable
(`durable`). Keeping that arithmetic here, apart from the thread, the relay and the spool, is
what lets its invariants be read in one place:

- `durable <= acked <= seq` as far as the collector is believed: an ack for a frame never sent
  is a protocol violation, believed only up to `seq` (`take_ack` says it clamped);
- a frame is settled once it is accepted, or lost (`lose_upto`: counted by the caller as
  dropped), or kept in a spool for a later replay (`settle_kept`); settled frames that were
  never accepted are remembered as ranges, so that `undurable` (accepted, not durable: lost if
  the collector dies now) never counts them.

It holds no lock: its owner calls it under the condition that guards its queue.
"""

from __future__ import annotations


class Ledger:
    """The sequence numbers of one sender (see the module docstring)."""

    def __init__(self) -> None:
        self.seq = 0  # last sequence number put on a stream
        self.acked = 0  # up to here settled: accepted, or lost and counted, or kept for a replay
        self.durable = 0  # ... and up to here persisted by the collector (the spool holds the rest)
        self.delivered = 0  # frames the collector accepted (applied)
        self._unaccepted: list[tuple[int, int]] = []  # (after, upto]: settled, never accepted

    def next(self) -> int:
        """Number the next frame."""
        self.seq += 1
        return self.seq

    @property
    def in_flight(self) -> int:
        """Frames sent and not settled yet."""
        return self.seq - self.acked

    @property
    def undurable(self) -> int:
        """Frames the collector accepted and has not said are durable."""
        above = self.acked - self.durable
        for after, upto in self._unaccepted:
            above -= max(0, min(upto, self.acked) - max(after, self.durable))
        return max(0, above)

    def lose_upto(self, seq: int) -> int:
        """Frames numbered up to `seq` not accepted yet never will be: settle them; how many."""
        if seq <= self.acked:
            return 0
        lost = seq - self.acked
        self.settle_kept(seq)
        return lost

    def settle_kept(self, seq: int) -> None:
        """Frames up to `seq` not accepted yet are kept elsewhere (a spool): settled, not accepted."""
        if seq > self.acked:
            self._unaccepted.append((self.acked, seq))
            self.acked = seq

    def take_ack(self, accepted: int, durable: int) -> tuple[bool, int | None]:
        """Believe an ack up to the last frame sent. Returns whether it claimed more (a protocol
        violation), and the new durable mark if it moved (None if not)."""
        violation = max(accepted, durable) > self.seq
        accepted, durable = min(accepted, self.seq), min(durable, self.seq)
        if accepted > self.acked:
            self.delivered += accepted - self.acked  # (frames counted lost are below `acked`)
            self.acked = accepted
        if durable <= self.durable:
            return violation, None
        self.durable = durable
        self._unaccepted = [(after, upto) for after, upto in self._unaccepted if upto > durable]
        return violation, durable
