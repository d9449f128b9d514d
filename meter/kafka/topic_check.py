"""What meter needs of its topics, and how existing topics differ from it (pure).

No client here: :func:`~meter.kafka.topics.ensure_topics` reads the cluster (metadata,
DescribeConfigs) and hands plain data to :func:`choose_replication` and :func:`compare`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from meter.errors import ConfigError

#: Replication factor meter chooses when none is given: this many, or fewer brokers.
DEFAULT_MAX_REPLICATION: Final = 3
MIN_INSYNC: Final = "min.insync.replicas"


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """A topic the meter needs.  ``configs`` go to CreateTopics verbatim (strings).

    ``replication_factor`` None: chosen for the cluster (:func:`choose_replication`).
    ``strict``: config keys whose difference on an existing topic breaks exactness (an
    error, not a warning).  ``state``: the topic holds meter's state, so replication
    factor 1 on a multi-broker cluster is refused unless given explicitly.
    ``same_partitions_as``: another topic whose partition count this one must have.
    """

    name: str
    partitions: int
    replication_factor: int | None = None
    configs: Mapping[str, str] = field(default_factory=dict)
    strict: frozenset[str] = frozenset()
    state: bool = False
    same_partitions_as: str | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("topic name must not be empty")
        if self.partitions < 1:
            raise ValueError(f"topic {self.name}: partitions must be >= 1")
        if self.replication_factor is not None and self.replication_factor < 1:
            raise ValueError(f"topic {self.name}: replication_factor must be >= 1")


@dataclass(frozen=True, slots=True)
class Replication:
    """The replication factor and min.insync.replicas of the topics meter creates."""

    factor: int
    min_insync: int
    #: The factor was given (``--replication-factor``), not chosen for the cluster.
    explicit: bool = False


def choose_replication(
    brokers: int, factor: int | None = None, min_insync: int | None = None
) -> Replication:
    """The replication for a cluster of ``brokers`` brokers (as its metadata lists them).

    Not given: factor ``min(3, brokers)`` and min.insync.replicas ``max(1, factor - 1)``, so
    a single-node broker gets 1/1 and three or more brokers get 3/2 (one broker may be down
    and writes with acks=all still succeed).  A factor above the broker count, or a
    min.insync.replicas above the factor (every acks=all write refused), is a ConfigError.
    """
    if brokers < 1:
        raise ConfigError("the cluster metadata lists no brokers")
    if factor is None:
        chosen = min(DEFAULT_MAX_REPLICATION, brokers)
    elif factor < 1:
        raise ConfigError(f"--replication-factor must be at least 1, got {factor}")
    elif factor > brokers:
        raise ConfigError(
            f"--replication-factor {factor} but the cluster has {brokers} "
            f"broker{'s' if brokers != 1 else ''}: at most {brokers}"
        )
    else:
        chosen = factor
    isr = max(1, chosen - 1) if min_insync is None else min_insync
    if isr < 1 or isr > chosen:
        raise ConfigError(
            f"--min-insync-replicas {isr} with replication factor {chosen}: it must be "
            f"between 1 and {chosen} (above it, every write with acks=all is refused)"
        )
    return Replication(chosen, isr, explicit=factor is not None)


@dataclass(frozen=True, slots=True)
class FoundTopic:
    """An existing topic as the broker describes it."""

    partitions: int
    #: The smallest replica count of its partitions.
    replication_factor: int
    #: Its configs (DescribeConfigs); None: the broker did not describe them.  A key the
    #: broker left out is not compared (Tansu lists only the configs given at creation).
    configs: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class Difference:
    """One way an existing topic differs from what meter needs."""

    topic: str
    setting: str
    found: str
    expected: str
    #: It breaks exactness (or every write): meter refuses to start.
    fatal: bool
    why: str = ""

    def line(self) -> str:
        text = f"topic {self.topic}: {self.setting} is {self.found}, meter expects {self.expected}"
        return f"{text} ({self.why})" if self.why else text


def _same(key: str, found: str, expected: str) -> bool:
    if key == "cleanup.policy":
        return {p.strip() for p in found.split(",")} == {p.strip() for p in expected.split(",")}
    try:
        return int(found) == int(expected)
    except ValueError:
        return found.strip() == expected.strip()


def compare(
    specs: Sequence[TopicSpec],
    found: Mapping[str, FoundTopic],
    replication: Replication,
    brokers: int,
) -> list[Difference]:
    """Every difference between the existing topics in ``found`` and ``specs``, in spec order.

    Fatal: a difference in a ``strict`` config; a partition count other than that of the
    ``same_partitions_as`` topic; replication factor 1 on a ``state`` topic of a
    multi-broker cluster unless the factor was given; min.insync.replicas above the
    replication factor.  Everything else is a warning (meter works, less safely)."""
    diffs: list[Difference] = []
    for spec in specs:
        topic = found.get(spec.name)
        if topic is None:
            continue
        pair = spec.same_partitions_as
        other = found.get(pair) if pair is not None else None
        if other is not None and topic.partitions != other.partitions:
            diffs.append(
                Difference(
                    spec.name,
                    "partitions",
                    str(topic.partitions),
                    f"{other.partitions} (as {pair})",
                    fatal=True,
                    why=f"each of its partitions belongs to the same-numbered {pair} partition",
                )
            )
        elif topic.partitions != spec.partitions:
            diffs.append(
                Difference(
                    spec.name,
                    "partitions",
                    str(topic.partitions),
                    str(spec.partitions),
                    fatal=False,
                    why=f"using {topic.partitions}",
                )
            )
        want_rf = spec.replication_factor or replication.factor
        if topic.replication_factor != want_rf:
            refused = (
                spec.state
                and topic.replication_factor == 1
                and brokers > 1
                and not replication.explicit
            )
            diffs.append(
                Difference(
                    spec.name,
                    "replication factor",
                    str(topic.replication_factor),
                    str(want_rf),
                    fatal=refused,
                    why=(
                        f"meter's state would sit on one disk of a {brokers}-broker cluster: "
                        "add replicas (kafka-reassign-partitions), or pass "
                        "--replication-factor 1 to accept it"
                        if refused
                        else "meter does not change replicas of existing topics"
                    ),
                )
            )
        if topic.configs is None:
            continue
        expected = {**spec.configs, MIN_INSYNC: str(replication.min_insync)}
        for key, want in expected.items():
            have = topic.configs.get(key)
            if have is None or _same(key, have, want):
                continue
            if key == MIN_INSYNC:
                over = _int(have) > topic.replication_factor
                diffs.append(
                    Difference(
                        spec.name,
                        key,
                        have,
                        want,
                        fatal=over,
                        why=(
                            f"above its replication factor {topic.replication_factor}: "
                            "every write with acks=all is refused"
                            if over
                            else "meter does not alter configs of existing topics"
                        ),
                    )
                )
                continue
            diffs.append(
                Difference(
                    spec.name,
                    key,
                    have,
                    want,
                    fatal=key in spec.strict,
                    why=(
                        "exact totals need it: kafka-configs --alter it"
                        if key in spec.strict
                        else "meter does not alter configs of existing topics"
                    ),
                )
            )
    return diffs


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 0


def refusal(diffs: Sequence[Difference]) -> ConfigError | None:
    """The error to refuse to start with, naming the first fatal difference; None: none."""
    fatal = [d for d in diffs if d.fatal]
    if not fatal:
        return None
    more = f" (and {len(fatal) - 1} more, logged above)" if len(fatal) > 1 else ""
    return ConfigError(fatal[0].line() + more)
