"""A refused authorization is one error naming who, which operation and which resource
(no broker needed; ``tests/integration/test_acls.py`` proves it on Apache Kafka)."""

from __future__ import annotations

import logging

import pytest
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    KafkaConnectionError,
    TopicAuthorizationFailedError,
)

from meter.domain import load_ratecards
from meter.errors import AuthorizationError, BrokerError, MeterError
from meter.kafka import KafkaSettings, Secret
from meter.kafka.authz import AiokafkaDenials, denial, not_authorized
from meter.stream.config import StreamConfig
from meter.stream.partition import HomePartition
from meter.stream.worker import Worker

SASL = KafkaSettings(
    bootstrap="kafka-1:9093",
    security_protocol="SASL_SSL",
    sasl_mechanism="SCRAM-SHA-512",
    sasl_username="meter-worker",
    sasl_password=Secret("hunter2-secret"),
)


def test_the_error_names_the_user_the_operation_and_the_resource_never_the_password() -> None:
    err = not_authorized(SASL, "Write", "topic", "meter.usage")
    assert isinstance(err, BrokerError)
    assert isinstance(err, MeterError)
    assert (err.operation, err.resource, err.name) == ("Write", "topic", "meter.usage")
    text = str(err)
    assert text.startswith(
        "not authorized: kafka-1:9093 denies user 'meter-worker' Write on topic 'meter.usage'"
    )
    assert "README" in text
    assert "hunter2" not in text
    assert "\n" not in text


def test_without_sasl_it_says_which_principal_it_could_be() -> None:
    plain = KafkaSettings(bootstrap="kafka-1:9092")
    assert "User:ANONYMOUS" in str(not_authorized(plain, "Read", "group", "meter"))
    tls = KafkaSettings(
        bootstrap="kafka-1:9093", security_protocol="SSL", ssl_certfile="c.pem", ssl_keyfile="k"
    )
    assert "TLS certificate" in str(not_authorized(tls, "Read", "group", "meter"))


@pytest.mark.parametrize(
    ("exc", "said"),
    [
        (TopicAuthorizationFailedError("meter.jobs"), "Read on topic 'meter.jobs'"),
        (TopicAuthorizationFailedError({"b", "a"}), "Read on topic 'a'"),
        (TopicAuthorizationFailedError(), "Read on topic 'fallback'"),
        (GroupAuthorizationFailedError("meter"), "Read on group 'meter'"),
        (GroupAuthorizationFailedError(), "Read on group 'the-group'"),
        (ClusterAuthorizationFailedError(), "IdempotentWrite on the cluster"),
    ],
)
def test_aiokafka_refusals_are_named_by_what_was_asked(exc: Exception, said: str) -> None:
    refused = denial(exc, SASL, topic_operation="Read", topic="fallback", group="the-group")
    assert refused is not None
    assert said in str(refused)


def test_a_refusal_is_found_behind_another_error_and_nothing_else_is_one() -> None:
    outer = RuntimeError("wrapped")
    outer.__cause__ = TopicAuthorizationFailedError("meter.usage")
    refused = denial(outer, SASL, topic_operation="Write")
    assert refused is not None
    assert refused.operation == "Write"
    assert denial(KafkaConnectionError("down"), SASL, topic_operation="Read") is None
    assert denial(ValueError("x"), SASL, topic_operation="Read") is None
    already = not_authorized(SASL, "Create", "topic", "meter.jobs")
    assert denial(already, SASL, topic_operation="Read") is already


def test_aiokafkas_own_lines_about_a_refusal_are_dropped_meters_kept() -> None:
    drop = AiokafkaDenials()

    def record(name: str, msg: str) -> logging.LogRecord:
        return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, None, None)

    assert not drop.filter(
        record("aiokafka.consumer.fetcher", "Not authorized to read from topic meter.jobs.")
    )
    assert not drop.filter(record("aiokafka.cluster", "Topic t1 is not authorized for this client"))
    assert drop.filter(record("aiokafka.consumer.fetcher", "Unexpected error in fetcher"))
    assert drop.filter(record("meter.stream.worker", "Not authorized to read from topic x"))


def healthy() -> Worker:
    w = Worker(SASL, StreamConfig(), load_ratecards())
    w.connecting = ""
    w.ready.set()
    w.lease.granted(1)
    hp = w.homes[0] = HomePartition(0, w.cards.height)
    hp.begin_recovery()
    hp.recovered(0)
    return w


def test_a_worker_denied_says_it_once_is_not_ready_and_recovers_when_allowed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    w = healthy()
    assert w.health() == (True, "ok")
    caplog.set_level(logging.INFO, "meter.stream.worker")
    for _ in range(5):
        assert w._denied(TopicAuthorizationFailedError("meter.jobs"), "fetch", "Read")
    assert not w._denied(KafkaConnectionError("down"), "fetch", "Read")
    ok, reason = w.health()
    assert not ok
    assert "denies user 'meter-worker' Read on topic 'meter.jobs'" in reason
    assert w.problems()["not_authorized"]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1, errors
    w._allowed("fetch")
    assert w.health() == (True, "ok")
    assert not w.problems()["not_authorized"]
    # Denied again later: said again.
    assert w._denied(GroupAuthorizationFailedError("meter"), "fetch", "Read")
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 2


def test_an_authorization_error_is_a_broker_error_for_callers_that_catch_those() -> None:
    with pytest.raises(BrokerError):
        raise AuthorizationError("x", operation="Read", resource="topic", name="t")
