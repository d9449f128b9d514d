"""A consumer that stops leaves its group at once, whatever generation the broker is at.

aiokafka sends LeaveGroup only from generation 1 on; the embedded broker hands out
generation 0 first, so without :func:`~meter.kafka.topics.leave_at_generation_zero` a
worker's first clean stop stayed a member for its whole session timeout and the next
worker's join waited it out (18 s of a 10 s session on the embedded broker).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient

from meter.kafka import KafkaSettings
from meter.kafka.topics import TopicSpec, close_consumer, ensure_topics

pytestmark = [pytest.mark.integration, pytest.mark.brokers("tansu", "kafka")]


async def _members(bootstrap: str, group: str) -> tuple[str, list[Any]]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (response,) = await admin.describe_consumer_groups([group])
        (described,) = response.groups
        return described[2], list(described[5])  # (error, group, state, type, protocol, members)
    finally:
        await admin.close()


async def _joined(bootstrap: str, topic: str, group: str) -> AIOKafkaConsumer:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        session_timeout_ms=10_000,
        heartbeat_interval_ms=1_000,
    )
    await consumer.start()
    while not consumer.assignment():
        await consumer.getmany(timeout_ms=200)
    return consumer


def test_a_stopped_consumer_is_no_longer_a_member_of_its_group(
    kafka_settings: KafkaSettings, unique: str
) -> None:
    topic, group = f"leave-{unique}", f"leave-{unique}"

    async def scenario() -> tuple[tuple[str, list[Any]], tuple[str, list[Any]]]:
        # Created first, as meter does: Apache Kafka here auto-creates nothing.
        await ensure_topics(kafka_settings, [TopicSpec(topic, 1)])
        first = await _joined(kafka_settings.bootstrap, topic, group)
        member = first._coordinator.member_id
        while_in = await _members(kafka_settings.bootstrap, group)
        assert [m[0] for m in while_in[1]] == [member]
        assert await close_consumer(first)
        # Straight after the stop: a member still listed is one the broker keeps for its
        # whole session timeout (10 s here), and the next join waits it out.
        return while_in, await _members(kafka_settings.bootstrap, group)

    _, after = asyncio.run(scenario())
    assert after[1] == [], f"the stopped consumer is still a member ({after[0]}): {after[1]}"
