"""When a worker suspects its group's leader (meter.kafka.group), without a broker."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

from aiokafka.consumer.group_coordinator import CoordinatorGroupRebalance, GroupCoordinator
from aiokafka.protocol.group import JoinGroupRequest, LeaveGroupRequest

from meter.domain import load_ratecards
from meter.kafka import KafkaSettings
from meter.kafka.group import (
    RECHECK_SESSIONS,
    SUSPECT_AFTER_SESSIONS,
    LeaderWatch,
    Suspect,
    watch_joins,
)
from meter.stream.config import StreamConfig
from meter.stream.worker import Worker

SESSION = 6.0


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def watch() -> tuple[LeaderWatch, Clock]:
    clock = Clock()
    return LeaderWatch(SESSION, clock), clock


def test_a_leader_named_for_a_session_is_suspected_only_past_two_sessions_of_waiting() -> None:
    w, clock = watch()
    w.waiting()
    w.joined("ghost", "me")
    clock.t += SUSPECT_AFTER_SESSIONS * SESSION - 0.1
    assert w.due() is None  # a slow but healthy rebalance takes this long
    clock.t += 0.1
    assert w.due() == Suspect("ghost", SUSPECT_AFTER_SESSIONS * SESSION, 12.0)
    assert w.due() is None  # checked: not again on what was known then
    clock.t += 10 * SESSION
    assert w.due() is None  # nor later, without a join that names it again


def test_after_a_check_only_a_join_answered_two_sessions_later_makes_it_suspect_again() -> None:
    """The repair's join and the eviction take 1.5 sessions; a join answered before may
    name the departed leader from before its eviction, and acting on it would make it a
    member again (and, once the broker cleared it, the leader again)."""
    w, clock = watch()
    w.waiting()
    w.joined("ghost", "me")
    clock.t += 2 * SESSION
    assert w.due() is not None
    clock.t += RECHECK_SESSIONS * SESSION - 0.1
    w.joined("ghost", "me")
    clock.t += SESSION
    assert w.due() is None
    w.joined("ghost", "me")  # answered 2 sessions after the check: still named
    suspect = w.due()
    assert suspect is not None
    assert suspect.leader == "ghost"


def test_a_leader_named_only_lately_is_given_a_session() -> None:
    w, clock = watch()
    w.waiting()
    w.joined("first", "me")
    clock.t += 3 * SESSION
    w.joined("second", "me")  # a new leader: it may be syncing right now
    assert w.due() is None
    w.joined("second", "me")  # named again: still since the first time
    clock.t += SESSION
    suspect = w.due()
    assert suspect is not None
    assert suspect.leader == "second"
    assert suspect.waited_s == 4 * SESSION


def test_nothing_is_suspected_while_assigned_or_while_this_member_leads() -> None:
    w, clock = watch()
    w.joined("ghost", "me")
    clock.t += 10 * SESSION
    assert w.due() is None  # not waiting: partitions are here
    w.waiting()
    clock.t += 10 * SESSION
    w.joined("me", "me")
    assert w.due() is None  # this member leads: its own sync makes the assignment
    w.joined("ghost", "me")
    clock.t += SESSION
    assert w.due() is not None
    assert w.assigned() == 11 * SESSION
    assert w.waiting_since is None
    assert w.due() is None
    w.waiting()  # the next rebalance starts a new wait, and needs a new leader named
    clock.t += 10 * SESSION
    assert w.due() is None


def test_a_wait_starts_once_and_lasts_until_an_assignment() -> None:
    w, clock = watch()
    w.waiting()
    clock.t += 5
    w.waiting()  # a revocation inside the same wait
    assert w.waiting_since == 100.0
    clock.t += 1
    assert w.assigned() == 6.0
    assert w.assigned() is None


class FakeCoordinator:
    def __init__(self, response: Any) -> None:
        self.response = response
        self.sent: list[Any] = []

    async def _send_req(self, request: Any) -> Any:
        self.sent.append(request)
        return self.response


class Answer:
    def __init__(self, error_code: int, leader_id: str, member_id: str) -> None:
        self.error_code = error_code
        self.leader_id = leader_id
        self.member_id = member_id


def _consumer(coordinator: FakeCoordinator) -> Any:
    class Consumer:
        _coordinator = coordinator

    return Consumer()


def _join() -> JoinGroupRequest:
    return JoinGroupRequest("g", 6000, 6000, "me", None, "consumer", [("range", b"")])


def test_watch_joins_reports_each_successful_join_and_nothing_else() -> None:
    seen: list[tuple[str, str]] = []
    coordinator = FakeCoordinator(Answer(0, "ghost", "me"))
    consumer = _consumer(coordinator)
    assert watch_joins(consumer, lambda leader, member: seen.append((leader, member)))
    assert not watch_joins(consumer, lambda leader, member: None)  # wrapped once only

    async def scenario() -> None:
        assert (await coordinator._send_req(_join())).leader_id == "ghost"
        await coordinator._send_req(LeaveGroupRequest("g", "me"))
        coordinator.response = Answer(27, "", "")  # RebalanceInProgress: no leader named
        await coordinator._send_req(_join())

    asyncio.run(scenario())
    assert seen == [("ghost", "me")]
    assert len(coordinator.sent) == 3


def test_watch_joins_does_nothing_without_a_coordinator() -> None:
    assert not watch_joins(object(), lambda leader, member: None)


def test_aiokafka_still_sends_its_join_through_send_req() -> None:
    """meter.kafka.group wraps GroupCoordinator._send_req to read the leader of each join:
    an aiokafka upgrade that renames it fails here, not silently in production."""
    assert inspect.iscoroutinefunction(GroupCoordinator._send_req)
    join = inspect.getsource(CoordinatorGroupRebalance.perform_group_join)
    assert "await self._coordinator._send_req(request)" in join
    assert "response.leader_id" in join


def test_a_stuck_group_is_the_reason_healthz_gives() -> None:
    w = Worker(KafkaSettings(bootstrap="127.0.0.1:1"), StreamConfig(), load_ratecards())
    w.connecting = ""
    w.group_stuck = "consumer group meter is stuck: its leader x left during a rebalance"
    assert w.health() == (False, w.group_stuck)
