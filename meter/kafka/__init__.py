"""aiokafka adapters: connection settings, SASL checks, topic management, whole-topic reads."""

from meter.errors import AuthenticationError
from meter.kafka.auth import (
    auth_failure,
    check_authentication,
    diagnose,
    translate_auth_errors,
)
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
    init_producer_id_handled,
    iter_to_end,
    read_to_end,
    start_client,
)

__all__ = [
    "AuthenticationError",
    "KafkaSettings",
    "KafkaSettingsError",
    "Secret",
    "TopicError",
    "TopicSpec",
    "add_kafka_arguments",
    "auth_failure",
    "check_authentication",
    "close_consumer",
    "describe_partitions",
    "diagnose",
    "ensure_topics",
    "init_producer_id_handled",
    "iter_to_end",
    "read_to_end",
    "settings_from_args",
    "start_client",
    "translate_auth_errors",
]
