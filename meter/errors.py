"""The one error tree of meter.

Every error the meter raises on purpose is a :class:`MeterError`.  Subclasses
also derive from the matching built-in so callers can catch either.

Bad *events* are not errors: parsing returns a :class:`meter.domain.Rejected`
outcome and the meter carries on.  These exceptions are for the things a
person has to fix before the meter can run (a bad rate card, an unreadable
file, an unreachable broker at a point where waiting makes no sense).
"""

from __future__ import annotations


class MeterError(Exception):
    """Base class of every error meter raises on purpose."""


class ConfigError(MeterError, ValueError):
    """A setting, flag or environment variable is invalid."""


class RateCardError(ConfigError):
    """A rate card file is malformed, overlapping or incomplete."""


class InputError(MeterError, OSError):
    """An input file cannot be opened or read."""


class BrokerError(MeterError, RuntimeError):
    """The Kafka broker cannot be started, reached or used as needed."""


class AuthenticationError(BrokerError):
    """The broker refused the SASL handshake: a wrong user name or password, or a mechanism
    the broker does not offer.  Retrying with the same settings cannot succeed; the message
    names the mechanism, the user and the broker, never the password."""


class AuthorizationError(BrokerError):
    """The broker refused a request for want of an ACL (Kafka's TOPIC_, GROUP_ or
    CLUSTER_AUTHORIZATION_FAILED).  The message names who was refused, the operation and
    the resource (``Write`` on topic ``meter.usage``); retrying cannot succeed until an
    administrator adds the ACL.  ``operation``, ``resource`` and ``name`` say the same
    for programs."""

    def __init__(self, message: str, *, operation: str, resource: str, name: str) -> None:
        super().__init__(message)
        self.operation = operation
        self.resource = resource
        self.name = name


class TlsError(BrokerError):
    """The TLS handshake with the broker failed: its certificate is not signed by the CA
    meter trusts (``--ssl-cafile``), does not name the host meter connected to, or the
    listener speaks no TLS.  Retrying with the same settings cannot succeed."""
