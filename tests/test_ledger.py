"""The sender's ledger: where each numbered frame stands (agent/ledger.py). The streaming tests
(test_no_loss, test_agent_protocol, test_agent_reliability) prove it end to end; these pin its
arithmetic where a stream is hard to steer: lost frames are never undurable, an ack is never
believed beyond the last frame sent, and the durable mark only moves forward."""

from thermoscope.agent.ledger import Ledger


def sent(n: int) -> Ledger:
    ledger = Ledger()
    for _ in range(n):
        ledger.next()
    return ledger


def test_accepted_frames_are_delivered_and_undurable_until_the_collector_persists_them() -> None:
    ledger = sent(10)
    assert ledger.take_ack(6, 2) == (False, 2)
    assert (ledger.delivered, ledger.in_flight, ledger.undurable) == (6, 4, 4)
    assert ledger.take_ack(10, 10) == (False, 10)
    assert (ledger.delivered, ledger.in_flight, ledger.undurable) == (10, 0, 0)


def test_an_ack_beyond_the_last_frame_sent_is_a_violation_believed_up_to_it() -> None:
    ledger = sent(3)
    assert ledger.take_ack(1_000, 2**62) == (True, 3)
    assert (ledger.delivered, ledger.durable) == (3, 3)


def test_lost_and_kept_frames_are_settled_but_never_count_as_undurable() -> None:
    ledger = sent(10)
    ledger.take_ack(4, 4)
    assert ledger.lose_upto(7) == 3  # 5..7 lost in flight
    assert ledger.lose_upto(7) == 0  # (once)
    ledger.settle_kept(10)  # 8..10 kept in a spool
    assert (ledger.delivered, ledger.in_flight, ledger.undurable) == (4, 0, 0)


def test_the_durable_mark_never_moves_back() -> None:
    ledger = sent(5)
    ledger.take_ack(5, 4)
    assert ledger.take_ack(5, 2) == (False, None)
    assert ledger.durable == 4
