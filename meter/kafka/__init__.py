"""aiokafka adapters: connection settings, topic management, whole-topic reads."""

from meter.kafka.settings import (
    KafkaSettings,
    KafkaSettingsError,
    Secret,
    add_kafka_arguments,
    settings_from_args,
)
from meter.kafka.topics import (
    TopicError,
    TopicSpec,
    close_consumer,
    describe_partitions,
    ensure_topics,
    iter_to_end,
    read_to_end,
)

__all__ = [
    "KafkaSettings",
    "KafkaSettingsError",
    "Secret",
    "TopicError",
    "TopicSpec",
    "add_kafka_arguments",
    "close_consumer",
    "describe_partitions",
    "ensure_topics",
    "iter_to_end",
    "read_to_end",
    "settings_from_args",
]
