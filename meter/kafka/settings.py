"""Kafka connection settings shared by every aiokafka client the meter creates.

Precedence when building settings: explicit overrides (CLI flags) > environment
(``METER_*``) > defaults.  Secrets never appear in ``repr``/``str``/logs.
"""

from __future__ import annotations

import argparse
import logging
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Final, Literal, cast, get_args

from meter.errors import ConfigError

log = logging.getLogger(__name__)

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]

SECURITY_PROTOCOLS: Final[tuple[str, ...]] = get_args(SecurityProtocol)
SASL_MECHANISMS: Final[tuple[str, ...]] = get_args(SaslMechanism)
DEFAULT_BOOTSTRAP: Final = "127.0.0.1:9092"
_REDACTED: Final = "***"

ENV_BROKER: Final = "METER_BROKER"
ENV_SECURITY_PROTOCOL: Final = "METER_SECURITY_PROTOCOL"
ENV_SASL_MECHANISM: Final = "METER_SASL_MECHANISM"
ENV_SASL_USERNAME: Final = "METER_SASL_USERNAME"
ENV_SASL_PASSWORD: Final = "METER_SASL_PASSWORD"  # noqa: S105  (variable name, not a password)
ENV_SASL_PASSWORD_FILE: Final = "METER_SASL_PASSWORD_FILE"  # noqa: S105
ENV_SSL_CAFILE: Final = "METER_SSL_CAFILE"
ENV_SSL_CERTFILE: Final = "METER_SSL_CERTFILE"
ENV_SSL_KEYFILE: Final = "METER_SSL_KEYFILE"
ENV_SSL_CHECK_HOSTNAME: Final = "METER_SSL_CHECK_HOSTNAME"

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class KafkaSettingsError(ConfigError):
    """Inconsistent or unreadable Kafka connection settings."""


class Secret:
    """A string that never shows itself in ``repr``/``str``/f-strings/logs."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get_secret_value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret('{_REDACTED}')"

    def __str__(self) -> str:
        return _REDACTED

    def __format__(self, format_spec: str) -> str:
        return format(_REDACTED, format_spec)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash((Secret, self._value))

    def __bool__(self) -> bool:
        return bool(self._value)

    def __reduce__(self) -> tuple[Any, ...]:  # keep pickling (multiprocessing) working
        return (Secret, (self._value,))


def _clean(value: str | None) -> str | None:
    if value is None:
        return None
    value = value.strip()
    return value or None


def _parse_bool(name: str, value: str) -> bool:
    low = value.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise KafkaSettingsError(f"{name}={value!r} is not a boolean (use true/false)")


def read_secret_file(path: str | os.PathLike[str]) -> Secret:
    """Read a password from a file (trailing newline stripped)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise KafkaSettingsError(f"cannot read password file {str(p)!r}: {exc}") from exc
    value = text.rstrip("\r\n")
    if not value:
        raise KafkaSettingsError(f"password file {str(p)!r} is empty")
    try:
        if p.stat().st_mode & 0o077:
            log.warning("password file %s is readable by group/others; chmod 600 it", p)
    except OSError:  # pragma: no cover - stat right after a successful read
        pass
    return Secret(value)


@dataclass(frozen=True, slots=True)
class KafkaSettings:
    """How to reach the Kafka cluster.  Immutable; build with :meth:`from_env`."""

    bootstrap: str = DEFAULT_BOOTSTRAP
    security_protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    sasl_username: str | None = None
    sasl_password: Secret | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_check_hostname: bool = True
    client_id: str = "meter"

    def __post_init__(self) -> None:
        servers = [s.strip() for s in self.bootstrap.split(",") if s.strip()]
        if not servers:
            raise KafkaSettingsError("bootstrap servers must not be empty")
        for server in servers:
            host, sep, port = server.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise KafkaSettingsError(f"bootstrap server {server!r} is not host:port")
        if self.security_protocol not in SECURITY_PROTOCOLS:
            raise KafkaSettingsError(
                f"security_protocol {self.security_protocol!r} is not one of {SECURITY_PROTOCOLS}"
            )
        if self.sasl_mechanism is not None and self.sasl_mechanism not in SASL_MECHANISMS:
            raise KafkaSettingsError(
                f"sasl_mechanism {self.sasl_mechanism!r} is not one of {SASL_MECHANISMS}"
            )
        if self.uses_sasl:
            if self.sasl_mechanism is None:
                choices = ", ".join(SASL_MECHANISMS)
                raise KafkaSettingsError(
                    f"{self.security_protocol} needs a SASL mechanism ({choices})"
                )
            if not self.sasl_username or not self.sasl_password:
                raise KafkaSettingsError(
                    f"{self.security_protocol} needs a SASL username and password"
                )
        elif self.sasl_mechanism or self.sasl_username or self.sasl_password:
            raise KafkaSettingsError(
                f"SASL settings were given but security_protocol is {self.security_protocol}; "
                "use SASL_SSL (or SASL_PLAINTEXT)"
            )
        if not self.uses_ssl and (self.ssl_cafile or self.ssl_certfile or self.ssl_keyfile):
            raise KafkaSettingsError(
                f"TLS files were given but security_protocol is {self.security_protocol}; "
                "use SSL or SASL_SSL"
            )
        if self.ssl_keyfile and not self.ssl_certfile:
            raise KafkaSettingsError("ssl_keyfile needs ssl_certfile")

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    @property
    def uses_ssl(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    def ssl_context(self) -> ssl.SSLContext | None:
        """A fresh client TLS context, or ``None`` for non-TLS protocols."""
        if not self.uses_ssl:
            return None
        from aiokafka.helpers import create_ssl_context  # noqa: PLC0415  (keep import cheap)

        try:
            ctx = create_ssl_context(
                cafile=self.ssl_cafile, certfile=self.ssl_certfile, keyfile=self.ssl_keyfile
            )
        except (OSError, ssl.SSLError) as exc:
            raise KafkaSettingsError(f"cannot build TLS context: {exc}") from exc
        ctx.check_hostname = self.ssl_check_hostname
        return cast(ssl.SSLContext, ctx)

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments accepted by AIOKafkaConsumer, AIOKafkaProducer and
        AIOKafkaAdminClient (each call builds a new SSL context)."""
        kwargs: dict[str, Any] = {
            "bootstrap_servers": self.bootstrap,
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
        }
        if self.uses_ssl:
            kwargs["ssl_context"] = self.ssl_context()
        if self.uses_sasl:
            assert self.sasl_password is not None
            kwargs["sasl_mechanism"] = self.sasl_mechanism
            # aiokafka uses the sasl_plain_* names for SCRAM as well.
            kwargs["sasl_plain_username"] = self.sasl_username
            kwargs["sasl_plain_password"] = self.sasl_password.get_secret_value()
        return kwargs

    def redacted(self) -> dict[str, Any]:
        """All settings as a dict safe to log or print; the password is ``'***'``."""
        out: dict[str, Any] = {f.name: getattr(self, f.name) for f in fields(self)}
        out["sasl_password"] = _REDACTED if self.sasl_password is not None else None
        return out

    def with_bootstrap(self, bootstrap: str) -> KafkaSettings:
        return replace(self, bootstrap=bootstrap)

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> KafkaSettings:
        """Build settings from ``METER_*`` variables, then apply ``overrides``.

        ``overrides`` maps field names to values; ``None`` values are ignored so an
        argparse namespace with unset flags can be passed straight through.
        ``sasl_password`` may be given as ``str`` or :class:`Secret`.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}

        def take(field_name: str, var: str) -> None:
            value = _clean(env.get(var))
            if value is not None:
                values[field_name] = value

        take("bootstrap", ENV_BROKER)
        take("security_protocol", ENV_SECURITY_PROTOCOL)
        take("sasl_mechanism", ENV_SASL_MECHANISM)
        take("sasl_username", ENV_SASL_USERNAME)
        take("ssl_cafile", ENV_SSL_CAFILE)
        take("ssl_certfile", ENV_SSL_CERTFILE)
        take("ssl_keyfile", ENV_SSL_KEYFILE)
        if "security_protocol" in values:
            values["security_protocol"] = values["security_protocol"].upper()
        if "sasl_mechanism" in values:
            values["sasl_mechanism"] = values["sasl_mechanism"].upper()
        check = _clean(env.get(ENV_SSL_CHECK_HOSTNAME))
        if check is not None:
            values["ssl_check_hostname"] = _parse_bool(ENV_SSL_CHECK_HOSTNAME, check)
        password = env.get(ENV_SASL_PASSWORD)
        password_file = _clean(env.get(ENV_SASL_PASSWORD_FILE))
        if password and password_file:
            raise KafkaSettingsError(
                f"set only one of {ENV_SASL_PASSWORD} and {ENV_SASL_PASSWORD_FILE}"
            )
        if password:
            values["sasl_password"] = Secret(password)
        elif password_file:
            values["sasl_password"] = read_secret_file(password_file)

        known = {f.name for f in fields(cls)}
        for key, value in (overrides or {}).items():
            if key not in known:
                raise KafkaSettingsError(f"unknown Kafka setting {key!r}")
            if value is None:
                continue
            if key == "sasl_password" and isinstance(value, str):
                values[key] = Secret(value)
            else:
                values[key] = value
        return cls(**values)

    def __str__(self) -> str:
        extra = f" sasl={self.sasl_mechanism} user={self.sasl_username}" if self.uses_sasl else ""
        return f"{self.bootstrap} ({self.security_protocol}{extra})"


def add_kafka_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the Kafka connection flags (all default to ``None`` so the env can fill in)."""
    group = parser.add_argument_group(
        "Kafka connection", "Flags override the METER_* environment variables."
    )
    group.add_argument(
        "--broker",
        metavar="HOST:PORT[,HOST:PORT]",
        help=f"bootstrap servers (env {ENV_BROKER}; default {DEFAULT_BOOTSTRAP})",
    )
    group.add_argument(
        "--security-protocol",
        type=str.upper,
        choices=SECURITY_PROTOCOLS,
        help=f"how to reach the broker (env {ENV_SECURITY_PROTOCOL}; default PLAINTEXT)",
    )
    group.add_argument(
        "--sasl-mechanism",
        type=str.upper,
        choices=SASL_MECHANISMS,
        help=f"SASL mechanism (env {ENV_SASL_MECHANISM})",
    )
    group.add_argument("--sasl-username", help=f"SASL user name (env {ENV_SASL_USERNAME})")
    group.add_argument(
        "--sasl-password-file",
        metavar="PATH",
        help=(
            "file holding the SASL password (there is deliberately no plain password flag; "
            f"env {ENV_SASL_PASSWORD} or {ENV_SASL_PASSWORD_FILE} also work)"
        ),
    )
    group.add_argument("--ssl-cafile", metavar="PEM", help=f"CA bundle (env {ENV_SSL_CAFILE})")
    group.add_argument(
        "--ssl-certfile", metavar="PEM", help=f"client certificate (env {ENV_SSL_CERTFILE})"
    )
    group.add_argument(
        "--ssl-keyfile", metavar="PEM", help=f"client private key (env {ENV_SSL_KEYFILE})"
    )
    group.add_argument(
        "--ssl-check-hostname",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"verify the broker certificate's hostname (env {ENV_SSL_CHECK_HOSTNAME}; default on)",
    )


def settings_from_args(
    args: argparse.Namespace, environ: Mapping[str, str] | None = None
) -> KafkaSettings:
    """Combine flags added by :func:`add_kafka_arguments` with the environment."""
    overrides: dict[str, Any] = {
        "bootstrap": getattr(args, "broker", None),
        "security_protocol": getattr(args, "security_protocol", None),
        "sasl_mechanism": getattr(args, "sasl_mechanism", None),
        "sasl_username": getattr(args, "sasl_username", None),
        "ssl_cafile": getattr(args, "ssl_cafile", None),
        "ssl_certfile": getattr(args, "ssl_certfile", None),
        "ssl_keyfile": getattr(args, "ssl_keyfile", None),
        "ssl_check_hostname": getattr(args, "ssl_check_hostname", None),
    }
    password_file = getattr(args, "sasl_password_file", None)
    if password_file:
        overrides["sasl_password"] = read_secret_file(password_file)
    env = os.environ if environ is None else environ
    if password_file and (env.get(ENV_SASL_PASSWORD) or env.get(ENV_SASL_PASSWORD_FILE)):
        # The flag wins; drop the env password so from_env doesn't complain about both.
        env = {k: v for k, v in env.items() if k not in (ENV_SASL_PASSWORD, ENV_SASL_PASSWORD_FILE)}
    return KafkaSettings.from_env(env, overrides)
