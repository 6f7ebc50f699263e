"""engine.routed_load: a replica's load as one router knows it when it decides."""

from __future__ import annotations

from engine.routed_load import RoutedLoad


def test_requests_routed_after_a_probe_was_sent_count_on_top_of_it():
    load = RoutedLoad(arrival_s=0.1)
    load.probed("a", sent_at=10.0, queue_len=3)
    load.routed("a", at=10.05)
    load.routed("a", at=10.2)
    assert load.ongoing("a") == 5


def test_an_answer_never_erases_what_was_routed_while_it_was_in_flight():
    """The burst the e2e test caught: decisions running at once, each awaiting its own
    probe. Every probe was sent before any of them routed, so none may reset the count."""
    load = RoutedLoad(arrival_s=0.0)
    sent = 10.0
    for i in range(6):  # decision i: its probe (sent at 10.0) answers, then it routes
        load.probed("a", sent_at=sent, queue_len=0)
        assert load.ongoing("a") == i
        load.routed("a", at=sent + 0.01 * (i + 1))


def test_a_late_answer_does_not_replace_a_newer_probe():
    load = RoutedLoad(arrival_s=0.0)
    load.probed("a", sent_at=11.0, queue_len=7)
    load.probed("a", sent_at=10.0, queue_len=0)  # sent earlier, answered later
    assert load.ongoing("a") == 7


def test_a_probe_takes_over_the_requests_routed_well_before_it_was_sent():
    load = RoutedLoad(arrival_s=0.1)
    for at in (10.0, 10.5, 10.95):
        load.routed("a", at=at)
    # Sent at 11.0: the requests of 10.0 and 10.5 have reached the replica (in its 2, or
    # finished); the one of 10.95 may still be on its way and counts on top.
    load.probed("a", sent_at=11.0, queue_len=2)
    assert load.ongoing("a") == 3


def test_probe_due_and_forgetting_replicas():
    load = RoutedLoad()
    assert load.probe_due("a", now=5.0, interval_s=1.0)  # never probed
    load.probed("a", sent_at=5.0, queue_len=1)
    assert not load.probe_due("a", now=5.5, interval_s=1.0)
    assert load.probe_due("a", now=6.5, interval_s=1.0)
    load.routed("b", at=5.0)
    load.keep({"a"})
    assert load.ongoing("b") == 0 and load.ongoing("a") == 1
