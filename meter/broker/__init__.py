"""Embedded Kafka-protocol broker (Tansu) for local runs and tests."""

from meter.broker.tansu import EmbeddedBroker, EmbeddedBrokerError, find_tansu_binary
from meter.errors import BrokerError

__all__ = ["BrokerError", "EmbeddedBroker", "EmbeddedBrokerError", "find_tansu_binary"]
