"""ModelSlot: first come first served, and routing turns between decode steps bounded in number
and in their share of the model's time, so a flood of routing calls cannot starve a batch."""

import threading
import time

import pytest

from metis.serving.scheduler import ModelSlot


def wait_until(condition, timeout: float = 30.0) -> None:
    """A bounded wait for another thread to reach a state (never an assertion on timing)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the other thread never got there"
        time.sleep(0.001)


def test_an_idle_slot_is_taken_at_once_and_a_pause_without_waiters_grants_nothing():
    slot = ModelSlot()
    with slot.hold():
        slot.pause()
    assert slot.turns == 0 and slot.waiting() == 0


def test_waiting_callers_get_the_model_in_arrival_order():
    slot = ModelSlot()
    order = []

    def caller(name):
        with slot.hold():
            order.append(name)

    with slot.hold():
        threads = []
        for i, name in enumerate("abcd"):
            threads.append(threading.Thread(target=caller, args=(name,)))
            threads[-1].start()
            wait_until(lambda n=i + 1: slot.waiting() == n)
    for t in threads:
        t.join(30)
    assert order == list("abcd")


def test_a_routing_flood_cannot_starve_the_holder():
    """8 threads take the model in a loop while the holder makes 200 steps; each pause grants at
    most one turn, so the holder finishes while the flood is still going."""
    slot = ModelSlot(share=1.0)  # the loosest time share: a turn at every step
    stop = threading.Event()
    routed = []

    def flood():
        while not stop.is_set():
            with slot.hold():
                routed.append(1)

    def holder():
        with slot.hold():
            for _ in range(200):
                slot.pause()

    floods = [threading.Thread(target=flood) for _ in range(8)]
    for t in floods:
        t.start()
    wait_until(lambda: len(routed) >= 8)
    batch = threading.Thread(target=holder)
    batch.start()
    batch.join(60)
    still_flooding = all(t.is_alive() for t in floods)
    stop.set()
    for t in floods:
        t.join(30)
    assert not batch.is_alive() and still_flooding
    assert slot.turns <= 200


def test_turns_take_at_most_their_share_of_the_model_time():
    """With share 0.25, a turn of 1 s buys the holder 3 s before the next turn (a fake clock)."""
    now = [0.0]
    slot = ModelSlot(share=0.25, clock=lambda: now[0])
    turns = []

    def caller():
        with slot.hold():
            now[0] += 1.0  # this turn takes one second
            turns.append(now[0])

    with slot.hold():
        first, second = threading.Thread(target=caller), threading.Thread(target=caller)
        first.start()
        wait_until(lambda: slot.waiting() == 1)
        slot.pause()  # at 0 s: a turn, 0 -> 1 s, so none before 4 s
        assert turns == [1.0]
        second.start()
        wait_until(lambda: slot.waiting() == 1)
        now[0] = 3.9
        slot.pause()
        assert turns == [1.0] and slot.waiting() == 1  # too soon: it waits
        now[0] = 4.0
        slot.pause()
        assert turns == [1.0, 5.0] and slot.turns == 2
    first.join(30)
    second.join(30)


@pytest.mark.parametrize("share", [0, -0.5, 1.5])
def test_a_share_outside_zero_to_one_is_refused(share):
    with pytest.raises(ValueError, match="share"):
        ModelSlot(share=share)
