"""meter: a Kafka-native, license-aware usage meter for backup service providers."""

__version__ = "0.1.0"
