"""A home partition's lifecycle and the lease, without a broker."""

from __future__ import annotations

import inspect

import pytest
from aiokafka.consumer.group_coordinator import GroupCoordinator

from meter.domain import load_ratecards
from meter.stream.lease import Lease
from meter.stream.partition import DataLostError, HomePartition, LifecycleError, Phase

CARDS = load_ratecards()
RATE = (5, "vcsp-2026", "subscription")


def active(end: int = 10) -> HomePartition:
    hp = HomePartition(3, CARDS.height)
    hp.begin_recovery()
    hp.recovered(end)
    assert hp.phase is Phase.ACTIVE
    return hp


def test_a_change_is_published_only_once_its_changelog_write_is_acknowledged() -> None:
    hp = active()
    assert hp.apply("acme", "2026-11", "vm", "a", RATE, 1000, "e1")
    assert not hp.apply("acme", "2026-11", "vm", "a", RATE, 1001, "e2")  # duplicate
    assert hp.take_dirty() == {}  # pending, not publishable
    batch = hp.take_batch()
    assert batch.tails == []  # no tail month passed: the next month's window does not reach it
    assert batch.entries == [("acme", "2026-11", "vm", "a", RATE)]
    assert batch.event_ids == {}
    hp.written(batch, [10])
    assert hp.take_dirty() == {("acme", "2026-11"): 1000}
    assert hp.changelog_end == 11


def test_a_batch_in_flight_does_not_publish_the_next_one() -> None:
    """The worker writes batch N+1 before batch N is acknowledged: each batch's
    acknowledgement makes only its own changes publishable."""
    hp = active()
    hp.apply("acme", "2026-11", "vm", "a", RATE, 1000, "e1")
    first = hp.take_batch()
    hp.apply("beta", "2026-11", "vm", "b", RATE, 2000, "e2")
    second = hp.take_batch()
    hp.written(first, [10])
    assert hp.take_dirty() == {("acme", "2026-11"): 1000}  # not beta: still in flight
    hp.written(second, [11])
    assert hp.take_dirty() == {("beta", "2026-11"): 2000}
    assert hp.changelog_end == 12


def test_a_batch_acknowledged_after_a_fence_promotes_nothing() -> None:
    hp = active(10)
    hp.apply("acme", "2026-11", "vm", "a", RATE, 1000, "e1")
    batch = hp.take_batch()
    hp.fence("group membership not confirmed")
    hp.written(batch, [10])  # landed, but ownership was in doubt meanwhile
    assert hp.take_dirty() == {}
    assert hp.changelog_end == 10  # caught up from here: the record is read again
    assert hp.begin_recovery() == 10
    hp.recovered(11)
    assert ("acme", "2026-11") in hp.take_dirty()


def test_a_write_that_lands_past_the_changelog_end_fences_the_partition() -> None:
    hp = active(10)
    hp.apply("acme", "2026-11", "vm", "a", RATE, 1000, "e1")
    hp.written(hp.take_batch(), [14])  # someone else wrote offsets 10..13
    assert hp.phase is Phase.FENCED
    assert "another writer" in hp.reason
    assert hp.take_dirty() == {}  # nothing unverified is published
    assert hp.begin_recovery() == 10  # caught up from where the state was
    hp.recovered(15)
    assert hp.phase is Phase.ACTIVE
    assert ("acme", "2026-11") in hp.take_dirty()  # everything republished after catching up


def test_a_write_acknowledged_below_the_changelog_end_means_the_broker_lost_data() -> None:
    hp = active(10)
    with pytest.raises(DataLostError, match="below offset 10"):
        hp.written(hp.take_batch(), [0])
    with pytest.raises(DataLostError):
        active(10).recovered(3)


def test_a_failed_write_leaves_the_partition_to_be_rebuilt_from_offset_zero() -> None:
    hp = active(10)
    hp.apply("acme", "2026-11", "vm", "a", RATE, 1000, "e1")
    hp.take_batch()
    hp.write_failed("cancelled")
    assert hp.phase is Phase.FENCED
    assert hp.needs_rebuild
    assert hp.begin_recovery() == 0
    assert len(hp.ledger) == 0  # the unacknowledged change is gone with the old ledger


def test_moves_not_on_the_list_are_refused() -> None:
    hp = active()
    hp.move(Phase.CLOSED)
    with pytest.raises(LifecycleError, match="closed -> active"):
        hp.move(Phase.ACTIVE)
    with pytest.raises(LifecycleError):
        HomePartition(0).move(Phase.RECOVERING)


def test_the_lease_lapses_after_its_share_of_the_session_timeout() -> None:
    now = [100.0]
    lease = Lease(10.0, clock=lambda: now[0])
    assert not lease.valid()  # nothing proved yet
    lease.granted(7)
    now[0] = 107.9
    assert lease.valid()
    now[0] = 108.1  # 80% of 10 s after the assignment
    assert not lease.valid()
    lease.renew(6, 108.0)  # a proof from another generation proves nothing
    assert not lease.valid()
    lease.renew(7, 108.0)  # request sent at 108.0 in generation 7 succeeded
    assert lease.valid()


def test_the_heartbeat_hook_fits_the_installed_aiokafka() -> None:
    """meter.stream.lease wraps GroupCoordinator._do_heartbeat: an aiokafka upgrade that
    drops it must fail here, not silently fall back."""
    assert inspect.iscoroutinefunction(GroupCoordinator._do_heartbeat)
    assert "self.generation" in inspect.getsource(GroupCoordinator.__init__)
