"""Embedded Kafka-protocol broker (Tansu) for local runs and tests."""

from meter.broker.tansu import BrokerError, EmbeddedBroker, find_tansu_binary

__all__ = ["BrokerError", "EmbeddedBroker", "find_tansu_binary"]
