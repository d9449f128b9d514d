"""The replication meter chooses and the comparison of existing topics (pure, no broker)."""

from __future__ import annotations

import pytest

from meter.errors import ConfigError
from meter.kafka.topic_check import (
    FoundTopic,
    Replication,
    choose_replication,
    compare,
    refusal,
)
from meter.stream.config import DAY_MS, StreamConfig

CONFIG = StreamConfig()
T = CONFIG.topics
SPECS = CONFIG.topic_specs()


@pytest.mark.parametrize(
    ("brokers", "factor", "isr"), [(1, 1, 1), (2, 2, 1), (3, 3, 2), (5, 3, 2), (9, 3, 2)]
)
def test_default_replication_follows_the_broker_count(brokers: int, factor: int, isr: int) -> None:
    assert choose_replication(brokers) == Replication(factor, isr, explicit=False)


def test_a_given_factor_is_explicit_and_sets_the_default_min_isr() -> None:
    assert choose_replication(3, 1) == Replication(1, 1, explicit=True)
    assert choose_replication(5, 5) == Replication(5, 4, explicit=True)
    assert choose_replication(3, 3, 3) == Replication(3, 3, explicit=True)


@pytest.mark.parametrize(
    ("brokers", "factor", "isr", "match"),
    [
        (1, 3, None, r"--replication-factor 3 but the cluster has 1 broker: at most 1"),
        (3, None, 4, r"--min-insync-replicas 4 with replication factor 3"),
        (1, None, 2, r"--min-insync-replicas 2 with replication factor 1"),
        (0, None, None, "no brokers"),
    ],
)
def test_impossible_replication_is_a_config_error(
    brokers: int, factor: int | None, isr: int | None, match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        choose_replication(brokers, factor, isr)


def healthy(replication: Replication) -> dict[str, FoundTopic]:
    """Every topic as meter would have created it (Kafka lists every config)."""
    return {
        s.name: FoundTopic(
            s.partitions,
            replication.factor,
            {
                "cleanup.policy": "delete",
                "retention.bytes": "-1",
                "retention.ms": str(7 * DAY_MS),
                **s.configs,
                "min.insync.replicas": str(replication.min_insync),
            },
        )
        for s in SPECS
    }


def changed(topic: FoundTopic, **configs: str) -> FoundTopic:
    """``topic`` with ``configs`` changed (keys with ``_`` for ``.``)."""
    return FoundTopic(
        topic.partitions,
        topic.replication_factor,
        {**(topic.configs or {}), **{k.replace("_", "."): v for k, v in configs.items()}},
    )


def test_topics_as_created_show_no_difference() -> None:
    rep = choose_replication(3)
    assert compare(SPECS, healthy(rep), rep, 3) == []


def test_missing_topics_and_unreported_configs_are_not_compared() -> None:
    rep = choose_replication(1)
    found = {T.changelog: FoundTopic(4, 1, {}), T.usage: FoundTopic(4, 1, None)}
    assert compare(SPECS, found, rep, 1) == []


def test_a_changelog_with_finite_retention_is_refused_naming_topic_setting_and_values() -> None:
    rep = choose_replication(1)
    found = healthy(rep)
    found[T.changelog] = changed(found[T.changelog], retention_ms="86400000")
    diffs = compare(SPECS, found, rep, 1)
    assert [(d.topic, d.setting, d.found, d.expected, d.fatal) for d in diffs] == [
        (T.changelog, "retention.ms", "86400000", "-1", True)
    ]
    error = refusal(diffs)
    assert error is not None
    assert str(error).startswith(
        "topic meter.ledger.changelog: retention.ms is 86400000, meter expects -1 ("
    )


def test_a_compacted_changelog_is_refused_a_deleting_usage_topic_is_a_warning() -> None:
    rep = choose_replication(1)
    found = healthy(rep)
    found[T.changelog] = FoundTopic(4, 1, {"cleanup.policy": "compact,delete"})
    found[T.usage] = FoundTopic(4, 1, {"cleanup.policy": "delete"})
    diffs = compare(SPECS, found, rep, 1)
    assert [(d.topic, d.setting, d.fatal) for d in diffs] == [
        (T.changelog, "cleanup.policy", True),
        (T.usage, "cleanup.policy", False),
    ]
    assert [d.line() for d in diffs][1] == (
        "topic meter.usage: cleanup.policy is delete, meter expects compact "
        "(meter does not alter configs of existing topics)"
    )


def test_cleanup_policy_compares_as_a_set() -> None:
    rep = choose_replication(1)
    found = healthy(rep)
    found[T.usage] = FoundTopic(4, 1, {"cleanup.policy": "compact"})
    assert compare(SPECS, found, rep, 1) == []


def test_changelog_partitions_must_match_the_by_tenant_topic() -> None:
    rep = choose_replication(1)
    found = healthy(rep)
    found[T.changelog] = FoundTopic(8, 1, found[T.changelog].configs)
    diffs = compare(SPECS, found, rep, 1)
    assert [(d.topic, d.setting, d.found, d.expected, d.fatal) for d in diffs] == [
        (T.changelog, "partitions", "8", f"4 (as {T.by_tenant})", True)
    ]


def test_other_partition_counts_are_warnings() -> None:
    rep = choose_replication(1)
    found = {
        name: FoundTopic(8 if name != T.clock else 1, 1, topic.configs)
        for name, topic in healthy(rep).items()
    }
    diffs = compare(SPECS, found, rep, 1)
    assert diffs
    assert all(d.setting == "partitions" and not d.fatal for d in diffs)
    assert refusal(diffs) is None


def test_one_copy_of_state_on_a_multi_broker_cluster_is_refused_unless_given() -> None:
    found = healthy(choose_replication(1))
    chosen = choose_replication(3)
    diffs = compare(SPECS, found, chosen, 3)
    refused = {d.topic for d in diffs if d.fatal}
    assert refused == {T.changelog, T.snapshots}
    rf = next(d for d in diffs if d.topic == T.changelog and d.setting == "replication factor")
    assert rf.line().startswith(
        "topic meter.ledger.changelog: replication factor is 1, meter expects 3 (meter's "
        "state would sit on one disk of a 3-broker cluster"
    )
    # Other topics with one copy: a warning.
    assert any(d.topic == T.usage and not d.fatal for d in diffs)
    # Told explicitly: accepted.
    given = choose_replication(3, 1)
    ok = {n: changed(t, min_insync_replicas="1") for n, t in found.items()}
    assert compare(SPECS, ok, given, 3) == []


def test_min_isr_above_the_replicas_is_refused_below_expected_a_warning() -> None:
    rep = choose_replication(3)
    found = healthy(rep)
    found[T.usage] = changed(found[T.usage], min_insync_replicas="1")
    found[T.jobs] = changed(found[T.jobs], min_insync_replicas="4")
    diffs = compare(SPECS, found, rep, 3)
    assert [(d.topic, d.found, d.expected, d.fatal) for d in diffs] == [
        (T.jobs, "4", "2", True),
        (T.usage, "1", "2", False),
    ]
