"""The topics meter creates and the check of existing ones, on a real broker (issue 20,
part 3): a worker refuses to start on a changelog that would lose ledger entries, naming
the topic, the setting, what it found and what meter expects; the topics it creates carry
the configs meter needs."""

from __future__ import annotations

import asyncio

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from meter.kafka import KafkaSettings
from meter.stream.config import DAY_MS
from tests.integration.harness import Names, WorkerProcess

pytestmark = pytest.mark.integration


async def _create(settings: KafkaSettings, topics: list[NewTopic]) -> None:
    admin = AIOKafkaAdminClient(**settings.client_kwargs())
    await admin.start()
    try:
        response = await admin.create_topics(topics)
        assert all(e[1] == 0 for e in response.topic_errors), response
    finally:
        await admin.close()


async def _configs(settings: KafkaSettings, names: list[str]) -> dict[str, dict[str, str]]:
    admin = AIOKafkaAdminClient(**settings.client_kwargs())
    await admin.start()
    try:
        responses = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, n) for n in names]
        )
    finally:
        await admin.close()
    return {r[3]: {e[0]: e[1] for e in r[4]} for response in responses for r in response.resources}


@pytest.mark.brokers("tansu", "kafka")
def test_a_changelog_kept_one_day_is_refused_naming_topic_setting_and_values(
    kafka_settings: KafkaSettings, unique: str
) -> None:
    names = Names(unique)
    changelog = f"{names.jobs}.ledger.changelog"
    asyncio.run(
        _create(
            kafka_settings,
            [NewTopic(changelog, 4, 1, topic_configs={"retention.ms": str(DAY_MS)})],
        )
    )
    worker = WorkerProcess(kafka_settings.bootstrap, names, "changelog-1d")
    try:
        code = worker.proc.wait(60)
    finally:
        worker.close()
    log = worker.log()
    assert code == 2, log
    line = f"topic {changelog}: retention.ms is {DAY_MS}, meter expects -1"
    assert f"meter: error: {line}" in log, log
    assert "took home partitions" not in log


@pytest.mark.brokers("tansu", "kafka")
def test_a_changelog_with_other_partitions_than_its_by_tenant_topic_is_refused(
    kafka_settings: KafkaSettings, unique: str
) -> None:
    names = Names(unique)
    changelog = f"{names.jobs}.ledger.changelog"
    asyncio.run(
        _create(
            kafka_settings,
            [
                NewTopic(f"{names.jobs}.by-tenant", 4, 1),
                NewTopic(changelog, 2, 1, topic_configs={"retention.ms": "-1"}),
            ],
        )
    )
    worker = WorkerProcess(kafka_settings.bootstrap, names, "changelog-parts")
    try:
        code = worker.proc.wait(60)
    finally:
        worker.close()
    log = worker.log()
    assert code == 2, log
    assert (
        f"meter: error: topic {changelog}: partitions is 2, meter expects 4 "
        f"(as {names.jobs}.by-tenant)"
    ) in log, log


@pytest.mark.brokers("kafka")
def test_the_topics_a_worker_creates_carry_what_meter_needs(
    kafka_settings: KafkaSettings, unique: str
) -> None:
    names = Names(unique)
    worker = WorkerProcess(kafka_settings.bootstrap, names, "created")
    try:
        worker.wait_for_log("took home partitions")
        assert worker.terminate() == 0
    finally:
        worker.close()
    log = worker.log()
    assert "meter expects" not in log, log  # no difference at all
    j = names.jobs
    configs = asyncio.run(
        _configs(
            kafka_settings,
            [f"{j}.ledger.changelog", f"{j}.ledger.snapshots", names.usage, j, f"{j}.clock"],
        )
    )
    wanted = {
        f"{j}.ledger.changelog": {
            "cleanup.policy": "delete",
            "retention.ms": "-1",
            "retention.bytes": "-1",
            "min.insync.replicas": "1",
        },
        f"{j}.ledger.snapshots": {"cleanup.policy": "compact", "min.insync.replicas": "1"},
        names.usage: {"cleanup.policy": "compact", "min.insync.replicas": "1"},
        j: {"retention.ms": str(40 * DAY_MS), "min.insync.replicas": "1"},
        f"{j}.clock": {"message.timestamp.type": "LogAppendTime", "retention.ms": str(DAY_MS)},
    }
    for topic, expected in wanted.items():
        assert {k: configs[topic].get(k) for k in expected} == expected, topic
    assert "replication factor 1, min.insync.replicas 1" in log, log
