"""aiokafka's ERROR about a refused InitProducerId is left out only while meter handles it."""

from __future__ import annotations

import logging

import pytest

from meter.kafka import init_producer_id_handled

SENDER = logging.getLogger("aiokafka.producer.sender")
INIT = "Unexpected error during InitProducerIdRequest: %s"


def test_only_that_record_only_meanwhile(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with init_producer_id_handled():
        SENDER.error(INIT, "<class 'aiokafka.errors.UnknownError'>")
        SENDER.error("Unexpected error in sender routine")
    SENDER.error(INIT, "<class 'aiokafka.errors.UnknownError'>")
    assert [r.getMessage() for r in caplog.records] == [
        "Unexpected error in sender routine",
        "Unexpected error during InitProducerIdRequest: <class 'aiokafka.errors.UnknownError'>",
    ]
    assert not SENDER.filters
