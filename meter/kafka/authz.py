"""A request the broker refuses for want of an ACL, as one clear error.

Apache Kafka with an authorizer answers a request it does not allow with
TOPIC_AUTHORIZATION_FAILED (29), GROUP_AUTHORIZATION_FAILED (30) or
CLUSTER_AUTHORIZATION_FAILED (31), and says neither the operation nor, for some requests,
the resource.  aiokafka turns them into ``TopicAuthorizationFailedError`` and its kin,
logs a WARNING per fetch ("Not authorized to read from topic ...") and retries.  The
caller knows which request it made, so it names the operation: :func:`not_authorized`
builds the one :class:`~meter.errors.AuthorizationError`, :func:`denial` recognizes the
aiokafka errors.  The ACLs meter needs are listed in the README ("Access control").
"""

from __future__ import annotations

import logging
from typing import Final

from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    TopicAuthorizationFailedError,
)

from meter.errors import AuthorizationError
from meter.kafka.settings import KafkaSettings

#: Kafka's error codes of a refused authorization.
TOPIC_AUTHORIZATION_FAILED: Final = 29
GROUP_AUTHORIZATION_FAILED: Final = 30
CLUSTER_AUTHORIZATION_FAILED: Final = 31

_IDEMPOTENT: Final = "IdempotentWrite"

#: What aiokafka logs on every refused fetch or metadata request (aiokafka 0.14:
#: consumer/fetcher.py, cluster.py); meter says it once itself.
_AIOKAFKA_DENIALS: Final = (
    "Not authorized to read from topic",
    "is not authorized for this client",
)


def principal(settings: KafkaSettings) -> str:
    """Who the broker refused, as far as the client knows it."""
    if settings.uses_sasl:
        return f"user {settings.sasl_username!r}"
    if settings.ssl_certfile:
        return "this client (the principal of its TLS certificate)"
    return "this client (User:ANONYMOUS without SASL or a client certificate)"


def not_authorized(
    settings: KafkaSettings, operation: str, resource: str, name: str, hint: str = ""
) -> AuthorizationError:
    """The error for ``operation`` (``Read``, ``Write``, ``Create``, ``Describe``,
    ``DescribeConfigs``, ``IdempotentWrite``) refused on ``resource`` (``topic``,
    ``group``, ``cluster``) ``name``."""
    target = f"{resource} {name!r}" if resource != "cluster" else "the cluster"
    return AuthorizationError(
        f"not authorized: {settings.bootstrap} denies {principal(settings)} {operation} on "
        f"{target}{f' ({hint})' if hint else ''}; an ACL is missing (the ACLs meter needs: "
        'README, "Access control")',
        operation=operation,
        resource=resource,
        name=name,
    )


def _topic_of(exc: TopicAuthorizationFailedError, default: str) -> str:
    arg = exc.args[0] if exc.args else None
    if isinstance(arg, str) and arg:
        return arg
    if isinstance(arg, (set, frozenset, list, tuple)) and arg:
        return str(sorted(arg)[0])
    return default


def denial(
    exc: BaseException,
    settings: KafkaSettings,
    *,
    topic_operation: str,
    topic: str = "",
    group: str = "",
    cluster_operation: str = _IDEMPOTENT,
) -> AuthorizationError | None:
    """The :class:`AuthorizationError` that ``exc`` (or an exception it was raised from)
    means, or ``None`` if it is not a refused authorization.

    ``topic_operation`` is what the caller asked of a topic (``Read`` for a fetch,
    ``Write`` for a produce); ``topic`` and ``group`` name the resource when aiokafka's
    error does not.  A refused group is always ``Read`` (joining, syncing, heartbeats and
    commits need it)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, AuthorizationError):
            return e
        if isinstance(e, TopicAuthorizationFailedError):
            return not_authorized(settings, topic_operation, "topic", _topic_of(e, topic))
        if isinstance(e, GroupAuthorizationFailedError):
            name = e.args[0] if e.args and isinstance(e.args[0], str) else group
            return not_authorized(settings, "Read", "group", name)
        if isinstance(e, ClusterAuthorizationFailedError):
            hint = "Write on any topic also grants it" if cluster_operation == _IDEMPOTENT else ""
            return not_authorized(settings, cluster_operation, "cluster", "kafka-cluster", hint)
        e = e.__cause__ or e.__context__
    return None


class AiokafkaDenials(logging.Filter):
    """Drops aiokafka's own log records about refused authorizations (one per fetch or
    metadata request, many a second): meter reports each denial once, as an
    :class:`~meter.errors.AuthorizationError` naming the operation.  For a handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("aiokafka"):
            return True
        message = str(record.msg)
        return not any(d in message for d in _AIOKAFKA_DENIALS)
