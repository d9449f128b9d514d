"""A refused SASL handshake as one clear error.

aiokafka 0.14 reports a refused handshake in ways that never say "wrong password":

- SCRAM, when the server answers the client's proof with ``e=...`` (RFC 5802 §7; Tansu
  0.6.0 does): ``KeyError: 'v'`` from ``ScramAuthenticator.process_server_final_message``,
  which ``AIOKafkaClient.bootstrap()`` does not catch, so it escapes ``start()``.
- Apache Kafka's answer, SaslAuthenticate error 58 (SASL_AUTHENTICATION_FAILED): bootstrap
  catches ``SaslAuthenticationFailed``, logs "Unable connect to ..." and raises
  ``KafkaConnectionError("Unable to bootstrap from [...]")``; the cause is lost.
- A broker that closes the connection instead (Tansu 0.6.0 for PLAIN): the same
  "Unable to bootstrap".

So meter checks the handshake itself before it starts aiokafka clients
(:func:`check_authentication`: one short connection per bootstrap server until one answers,
with ApiVersions, SaslHandshake and SaslAuthenticate, then closed), and translates whatever
escapes aiokafka anyway (:func:`auth_failure`, :func:`translate_auth_errors`, and
:func:`meter.kafka.topics.start_client` for clients started by hand).  The error names the
mechanism, the user and the broker, never the password.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import logging
import os
import ssl
import struct
from collections.abc import AsyncIterator, Iterator
from pathlib import PurePath
from typing import Final

from aiokafka.errors import (
    AuthenticationFailedError,
    AuthenticationMethodNotSupported,
    IllegalSaslStateError,
    KafkaConnectionError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)

from meter.errors import AuthenticationError, TlsError
from meter.kafka.settings import KafkaSettings

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S: Final = 10.0

_API_VERSIONS: Final = 18
_SASL_HANDSHAKE: Final = 17
_SASL_AUTHENTICATE: Final = 36
_UNSUPPORTED_SASL_MECHANISM: Final = 33
_ILLEGAL_SASL_STATE: Final = 34
_SASL_AUTHENTICATION_FAILED: Final = 58
_CLIENT_ID: Final = b"meter-auth-check"
_MAX_FRAME: Final = 1 << 20
_MAX_ITERATIONS: Final = 1_000_000
_MAX_REASON: Final = 120
_HASHES: Final = {"SCRAM-SHA-256": "sha256", "SCRAM-SHA-512": "sha512"}
# Where aiokafka's SCRAM client fails on an answer without the field it expects.
_AIOKAFKA_SCRAM_STEPS: Final = frozenset(
    {"process_server_first_message", "process_server_final_message"}
)

_HINT: Final = "(check the password)"


# ---------------------------------------------------------------------- the error


def _failure(settings: KafkaSettings, problem: str) -> AuthenticationError:
    return AuthenticationError(
        f"authentication failed: SASL {settings.sasl_mechanism} as user "
        f"{settings.sasl_username!r} {problem}"
    )


def _rejected(settings: KafkaSettings, server: str, said: str | None = None) -> AuthenticationError:
    """The broker checked the credentials and said no."""
    if said == "unknown-user":
        return _failure(settings, f"was rejected by {server}: unknown user (check the user name)")
    if said and said != "invalid-proof":
        return _failure(settings, f"was rejected by {server}: {said} {_HINT}")
    return _failure(settings, f"was rejected by {server} {_HINT}")


def _not_offered(settings: KafkaSettings, server: str, offered: list[str]) -> AuthenticationError:
    others = ", ".join(offered) if offered else "none"
    return _failure(settings, f"is not offered by {server} (it offers: {others})")


def _reason(raw: str | None, settings: KafkaSettings) -> str | None:
    """A server-supplied reason, fit for one log line: printable, bounded, no password."""
    if not raw:
        return None
    text = "".join(c if c.isprintable() else " " for c in raw)
    text = " ".join(text.split())[:_MAX_REASON]
    password = settings.sasl_password.get_secret_value() if settings.sasl_password else ""
    if password and password in text:
        text = text.replace(password, "***")
    return text or None


# ---------------------------------------------------------------------- recognizer


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < 8:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _raised_by_aiokafka_scram(exc: BaseException) -> bool:
    if not isinstance(exc, (KeyError, ValueError)):
        return False
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name in _AIOKAFKA_SCRAM_STEPS and PurePath(code.co_filename).parts[-2:] == (
            "aiokafka",
            "conn.py",
        ):
            return True
        tb = tb.tb_next
    return False


def auth_failure(exc: BaseException, settings: KafkaSettings) -> AuthenticationError | None:
    """The :class:`AuthenticationError` that ``exc`` (or an exception it was raised from)
    means, or ``None`` if it is not a refused SASL handshake.

    Recognizes aiokafka's ``SaslAuthenticationFailed``, ``AuthenticationFailedError``,
    ``IllegalSaslStateError``, ``UnsupportedSaslMechanismError``,
    ``AuthenticationMethodNotSupported`` and the ``KeyError``/``ValueError`` its SCRAM client
    raises on an ``e=`` answer.  A bare "Unable to bootstrap" carries no cause: ask
    :func:`diagnose` (or use :func:`translate_auth_errors`, which does).
    """
    if not settings.uses_sasl:
        return None
    server = settings.bootstrap
    for e in _chain(exc):
        if isinstance(e, AuthenticationError):
            return e
        if isinstance(e, (SaslAuthenticationFailed, AuthenticationFailedError)):
            return _rejected(settings, server)
        if isinstance(e, IllegalSaslStateError):
            return _failure(
                settings, f"was refused by {server} (illegal SASL state: is it a SASL listener?)"
            )
        if isinstance(e, (UnsupportedSaslMechanismError, AuthenticationMethodNotSupported)):
            return _failure(settings, f"is not offered by {server}")
        if settings.sasl_mechanism in _HASHES and _raised_by_aiokafka_scram(e):
            return _rejected(settings, server)
    return None


# ---------------------------------------------------------------------- the check


class _Frame:
    """Reads fields of a response body; a short or malformed body is a ConnectionError."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def _take(self, n: int) -> bytes:
        if n < 0 or self._pos + n > len(self._data):
            raise ConnectionError("malformed Kafka response")
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def int16(self) -> int:
        value: int = struct.unpack(">h", self._take(2))[0]
        return value

    def int32(self) -> int:
        value: int = struct.unpack(">i", self._take(4))[0]
        return value

    def string(self) -> str | None:
        n = self.int16()
        return None if n < 0 else self._take(n).decode("utf-8", "replace")

    def bytes_(self) -> bytes:
        n = self.int32()
        return b"" if n < 0 else self._take(n)


class _Conn:
    """Just enough of the Kafka protocol for ApiVersions and the SASL handshake."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._correlation = 0

    async def request(self, api_key: int, version: int, body: bytes) -> _Frame:
        self._correlation += 1
        header = struct.pack(">hhih", api_key, version, self._correlation, len(_CLIENT_ID))
        payload = header + _CLIENT_ID + body
        self._writer.write(struct.pack(">i", len(payload)) + payload)
        try:
            await self._writer.drain()
            (size,) = struct.unpack(">i", await self._reader.readexactly(4))
            if not 4 <= size <= _MAX_FRAME:
                raise ConnectionError(f"implausible Kafka response size {size}")
            data = await self._reader.readexactly(size)
        except asyncio.IncompleteReadError as exc:
            raise ConnectionError("the broker closed the connection") from exc
        frame = _Frame(data)
        if frame.int32() != self._correlation:
            raise ConnectionError("Kafka response out of order")
        return frame

    async def api_versions(self) -> None:
        frame = await self.request(_API_VERSIONS, 0, b"")
        code = frame.int16()
        if code != 0:
            raise ConnectionError(f"ApiVersions error {code}")

    async def handshake(self, mechanism: str) -> tuple[int, list[str]]:
        name = mechanism.encode()
        frame = await self.request(_SASL_HANDSHAKE, 1, struct.pack(">h", len(name)) + name)
        code = frame.int16()
        count = frame.int32()
        offered = [frame.string() or "" for _ in range(max(count, 0))]
        return code, offered

    async def authenticate(self, payload: bytes) -> tuple[int, str | None, bytes]:
        frame = await self.request(_SASL_AUTHENTICATE, 0, struct.pack(">i", len(payload)) + payload)
        return frame.int16(), frame.string(), frame.bytes_()

    async def close(self) -> None:
        self._writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(self._writer.wait_closed(), 1.0)


def _refused(
    settings: KafkaSettings, server: str, code: int, message: str | None
) -> AuthenticationError:
    if code == _SASL_AUTHENTICATION_FAILED:
        return _rejected(settings, server)
    if code == _ILLEGAL_SASL_STATE:
        return _failure(
            settings, f"was refused by {server} (illegal SASL state: is it a SASL listener?)"
        )
    said = _reason(message, settings)
    detail = f"error {code}: {said}" if said else f"error {code}"
    return _failure(settings, f"was refused by {server} ({detail})")


async def _plain(conn: _Conn, settings: KafkaSettings, server: str) -> AuthenticationError | None:
    assert settings.sasl_username is not None and settings.sasl_password is not None
    user, password = settings.sasl_username, settings.sasl_password.get_secret_value()
    step = await _step(conn, settings, server, f"\0{user}\0{password}".encode())
    return step if isinstance(step, AuthenticationError) else None


def _attributes(message: bytes) -> dict[str, str]:
    pairs = (p.split("=", 1) for p in message.decode("utf-8", "replace").split(",") if "=" in p)
    return {k: v for k, v in pairs}


async def _step(
    conn: _Conn, settings: KafkaSettings, server: str, payload: bytes
) -> tuple[bytes, dict[str, str]] | AuthenticationError:
    """One SaslAuthenticate round trip: the server's answer and its SCRAM attributes, or
    why the login failed (refused, connection closed, or an ``e=`` attribute)."""
    try:
        code, message, answer = await conn.authenticate(payload)
    except ConnectionError:
        return _rejected(settings, server)
    if code != 0:
        return _refused(settings, server, code, message)
    attributes = _attributes(answer)
    if "e" in attributes:
        return _rejected(settings, server, _reason(attributes["e"], settings))
    return answer, attributes


async def _scram(conn: _Conn, settings: KafkaSettings, server: str) -> AuthenticationError | None:
    assert settings.sasl_username is not None and settings.sasl_password is not None
    assert settings.sasl_mechanism is not None
    hash_name = _HASHES[settings.sasl_mechanism]
    user = settings.sasl_username.replace("=", "=3D").replace(",", "=2C")
    nonce = base64.b64encode(os.urandom(18)).decode()
    first_bare = f"n={user},r={nonce}"
    malformed = _failure(settings, f"got a malformed SCRAM answer from {server}")
    step = await _step(conn, settings, server, f"n,,{first_bare}".encode())
    if isinstance(step, AuthenticationError):
        return step
    server_first, first = step
    combined, salt_b64, iterations = first.get("r", ""), first.get("s", ""), first.get("i", "")
    if not combined.startswith(nonce) or not iterations.isdigit():
        return malformed
    try:
        salt = base64.b64decode(salt_b64, validate=True)
    except binascii.Error:
        return malformed
    if not 1 <= int(iterations) <= _MAX_ITERATIONS:
        return malformed
    salted = await asyncio.to_thread(
        hashlib.pbkdf2_hmac,
        hash_name,
        settings.sasl_password.get_secret_value().encode(),
        salt,
        int(iterations),
    )
    client_key = hmac.digest(salted, b"Client Key", hash_name)
    stored_key = hashlib.new(hash_name, client_key).digest()
    final_bare = f"c=biws,r={combined}"
    auth_message = b",".join((first_bare.encode(), server_first, final_bare.encode()))
    signature = hmac.digest(stored_key, auth_message, hash_name)
    proof = base64.b64encode(bytes(a ^ b for a, b in zip(client_key, signature, strict=True)))
    step = await _step(conn, settings, server, f"{final_bare},p={proof.decode()}".encode())
    if isinstance(step, AuthenticationError):
        return step
    final = step[1]
    expected = hmac.digest(hmac.digest(salted, b"Server Key", hash_name), auth_message, hash_name)
    try:
        verifier = base64.b64decode(final.get("v", ""), validate=True)
    except binascii.Error:
        return malformed
    if not hmac.compare_digest(verifier, expected):
        return _failure(
            settings,
            f"was not confirmed: {server} did not prove it knows the password "
            "(is it the broker you meant?)",
        )
    return None


async def _probe(settings: KafkaSettings, host: str, port: int) -> AuthenticationError | None:
    """``None`` if the handshake succeeds; raises ``OSError``/``ConnectionError`` if the
    server cannot be reached or does not answer ApiVersions (not an authentication matter)."""
    assert settings.sasl_mechanism is not None
    server = f"{host}:{port}"
    reader, writer = await asyncio.open_connection(host, port, ssl=settings.ssl_context())
    conn = _Conn(reader, writer)
    try:
        await conn.api_versions()
        try:
            code, offered = await conn.handshake(settings.sasl_mechanism)
        except ConnectionError:
            return _failure(
                settings,
                f"was refused: {server} closed the connection at the SASL handshake "
                f"(does it offer {settings.sasl_mechanism}?)",
            )
        if code == _UNSUPPORTED_SASL_MECHANISM or (
            code == 0 and settings.sasl_mechanism not in offered
        ):
            return _not_offered(settings, server, offered)
        if code != 0:
            return _refused(settings, server, code, None)
        if settings.sasl_mechanism == "PLAIN":
            return await _plain(conn, settings, server)
        return await _scram(conn, settings, server)
    finally:
        await conn.close()


def _tls_failure(settings: KafkaSettings, server: str, exc: ssl.SSLError) -> TlsError:
    if isinstance(exc, ssl.SSLCertVerificationError):
        what = f"certificate verify failed: {exc.verify_message}"
    else:
        what = exc.reason or str(exc)
    trusted = f"--ssl-cafile {settings.ssl_cafile}" if settings.ssl_cafile else "the system CAs"
    return TlsError(
        f"TLS handshake with {server} failed: {what} (meter trusts {trusted}: is that the CA "
        "that signed the broker's certificate, does the certificate name the host meter "
        "connects to, and is this a TLS listener?)"
    )


async def _tls_only(settings: KafkaSettings, host: str, port: int) -> None:
    """A TLS handshake and nothing else (SSL without SASL); raises what it raises."""
    _reader, writer = await asyncio.open_connection(host, port, ssl=settings.ssl_context())
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def diagnose(
    settings: KafkaSettings, *, max_seconds: float = PROBE_TIMEOUT_S
) -> AuthenticationError | TlsError | None:
    """Try the TLS and SASL handshakes on the bootstrap servers, in order, until one answers.

    Returns the :class:`AuthenticationError` if that server refuses the SASL handshake, the
    :class:`~meter.errors.TlsError` if the TLS handshake fails (a certificate not signed by
    the CA meter trusts, or naming another host; a listener without TLS), ``None`` if it
    accepts them, if no server could be reached, or if ``settings`` use neither SASL nor
    TLS (reaching the broker is the clients' business and they report it their own way).
    """
    if not settings.uses_sasl and not settings.uses_ssl:
        return None
    for server in settings.bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            if not settings.uses_sasl:
                await asyncio.wait_for(_tls_only(settings, host, int(port)), max_seconds)
                return None
            return await asyncio.wait_for(_probe(settings, host, int(port)), max_seconds)
        except ssl.SSLError as exc:  # the certificate, the host name, or no TLS at all
            return _tls_failure(settings, server.strip(), exc)
        except (OSError, TimeoutError) as exc:  # ConnectionError is an OSError
            log.debug("SASL check: %s:%s not usable (%s: %s)", host, port, type(exc).__name__, exc)
    return None


async def check_authentication(
    settings: KafkaSettings, *, max_seconds: float = PROBE_TIMEOUT_S
) -> None:
    """Raise :class:`AuthenticationError` if the broker refuses the SASL handshake, and
    :class:`~meter.errors.TlsError` if the TLS handshake fails (see :func:`diagnose`).

    A no-op without SASL and TLS.  Costs one short connection (and, for SCRAM, one PBKDF2)
    per call.
    """
    failure = await diagnose(settings, max_seconds=max_seconds)
    if failure is not None:
        raise failure


@contextlib.asynccontextmanager
async def translate_auth_errors(
    settings: KafkaSettings, *, check_first: bool = True
) -> AsyncIterator[None]:
    """Run the block with refused SASL handshakes raised as :class:`AuthenticationError`.

    With ``check_first`` (the default) the handshake is checked before the block runs, so a
    refusal surfaces before any aiokafka client starts, logs or leaks.  Inside the block,
    an exception :func:`auth_failure` recognizes is translated; a ``KafkaConnectionError``
    ("Unable to bootstrap") under SASL or TLS is diagnosed with :func:`diagnose`.  Anything else
    propagates unchanged.
    """
    if check_first:
        await check_authentication(settings)
    try:
        yield
    except AuthenticationError:
        raise
    except Exception as exc:
        failure: AuthenticationError | TlsError | None = auth_failure(exc, settings)
        if failure is None and isinstance(exc, KafkaConnectionError):
            failure = await diagnose(settings)
        if failure is None:
            raise
        raise failure from exc
