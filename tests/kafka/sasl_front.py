"""A loopback SASL front for a broker without authentication, for tests.

Tansu 0.6.0 cannot accept a login with memory storage (see ``meter.broker.tansu``), so the
tests that need a broker which *accepts* good credentials and *refuses* bad ones the way
Apache Kafka does put this in front of a plain embedded broker:

- it answers SaslHandshake itself (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512; error 33
  UNSUPPORTED_SASL_MECHANISM for anything else) and SaslAuthenticate v0/v1 (RFC 4616 PLAIN,
  RFC 5802 SCRAM server), refusing bad credentials with error 58 SASL_AUTHENTICATION_FAILED
  and closing the connection, as Apache Kafka does;
- ApiVersions is forwarded to the broker (or, with no broker, answered with a minimal v0
  list); once the client has authenticated, bytes are piped both ways untouched;
- any other request before authentication closes the connection.

Start the broker with ``EmbeddedBroker(advertised_port=front.port)`` so that the
connections clients make to the advertised address come through the front as well.  It
runs its own asyncio loop in a daemon thread, like ``tests.integration.tcp_proxy``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tests.loopback import LoopbackServer

MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
_HASH = {"SCRAM-SHA-256": "sha256", "SCRAM-SHA-512": "sha512"}
_API_VERSIONS, _SASL_HANDSHAKE, _SASL_AUTHENTICATE = 18, 17, 36
_UNSUPPORTED_SASL_MECHANISM, _SASL_AUTHENTICATION_FAILED = 33, 58
_ITERATIONS = 4096


@dataclass
class _Scram:
    hash_name: str
    salt: bytes
    salted: bytes
    first_bare: str = ""
    server_first: str = ""
    nonce: str = ""


@dataclass
class _Session:
    mechanism: str | None = None
    scram: _Scram | None = None
    user: str | None = None
    authenticated: bool = False


def _frame(correlation_id: int, body: bytes) -> bytes:
    payload = struct.pack(">i", correlation_id) + body
    return struct.pack(">i", len(payload)) + payload


def _string(value: str | None) -> bytes:
    if value is None:
        return struct.pack(">h", -1)
    raw = value.encode()
    return struct.pack(">h", len(raw)) + raw


class SaslFront(LoopbackServer):
    def __init__(
        self,
        users: Mapping[str, str],
        *,
        target_port: int | None = None,
        target_host: str = "127.0.0.1",
        listen_port: int = 0,
        listen_host: str = "127.0.0.1",
        mechanisms: Iterable[str] = MECHANISMS,
    ) -> None:
        super().__init__(listen_port=listen_port, listen_host=listen_host)
        self.users = dict(users)
        self.target_host = target_host
        self.target_port = target_port
        self.mechanisms = tuple(mechanisms)
        self.accepted: list[tuple[str, str]] = []  # (mechanism, user) of each login
        self.refused: list[tuple[str, str]] = []
        self._credentials: dict[tuple[str, str], tuple[bytes, bytes]] = {}
        for user, password in self.users.items():
            for mechanism, hash_name in _HASH.items():
                salt = os.urandom(16)
                salted = hashlib.pbkdf2_hmac(hash_name, password.encode(), salt, _ITERATIONS)
                self._credentials[(mechanism, user)] = (salt, salted)

    @property
    def bootstrap(self) -> str:
        return f"{self.listen_host}:{self.port}"

    def _thread_name(self) -> str:
        return "sasl-front"

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2)

    # ------------------------------------------------------------------ a connection
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        session = _Session()
        try:
            if self.target_port is not None:
                upstream = await asyncio.open_connection(self.target_host, self.target_port)
                self._writers.add(upstream[1])
            while not session.authenticated:
                raw = await _read_frame(reader)
                api_key, version, correlation_id = struct.unpack(">hhi", raw[:8])
                (client_id_len,) = struct.unpack(">h", raw[8:10])
                body = raw[10 + max(client_id_len, 0) :]
                if api_key == _API_VERSIONS:
                    writer.write(await self._api_versions(raw, version, correlation_id, upstream))
                elif api_key == _SASL_HANDSHAKE:
                    writer.write(_frame(correlation_id, self._handshake(session, body)))
                elif api_key == _SASL_AUTHENTICATE and version in (0, 1):
                    response, keep = self._authenticate(session, body, version)
                    writer.write(_frame(correlation_id, response))
                    await writer.drain()
                    if not keep:
                        return
                else:
                    return  # anything else before authentication: close, like Kafka
                await writer.drain()
            if upstream is None:
                return
            await asyncio.gather(
                _pipe(reader, upstream[1]), _pipe(upstream[0], writer), return_exceptions=True
            )
        except (OSError, asyncio.IncompleteReadError, struct.error):
            pass
        finally:
            for w in (writer, upstream[1] if upstream else None):
                if w is not None:
                    self._writers.discard(w)
                    w.transport.abort()

    async def _api_versions(
        self,
        raw: bytes,
        version: int,
        correlation_id: int,
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None,
    ) -> bytes:
        if upstream is not None:
            upstream[1].write(struct.pack(">i", len(raw)) + raw)
            await upstream[1].drain()
            answer = await _read_frame(upstream[0])
            return struct.pack(">i", len(answer)) + answer
        if version != 0:
            raise OSError("only ApiVersions v0 is answered without a broker")
        keys = [(_API_VERSIONS, 0, 0), (_SASL_HANDSHAKE, 0, 1), (_SASL_AUTHENTICATE, 0, 1)]
        body = struct.pack(">hi", 0, len(keys)) + b"".join(struct.pack(">hhh", *k) for k in keys)
        return _frame(correlation_id, body)

    def _handshake(self, session: _Session, body: bytes) -> bytes:
        (n,) = struct.unpack(">h", body[:2])
        mechanism = body[2 : 2 + n].decode()
        offered = b"".join(_string(m) for m in self.mechanisms)
        if mechanism not in self.mechanisms:
            return struct.pack(">hi", _UNSUPPORTED_SASL_MECHANISM, len(self.mechanisms)) + offered
        session.mechanism = mechanism
        return struct.pack(">hi", 0, len(self.mechanisms)) + offered

    def _authenticate(self, session: _Session, body: bytes, version: int) -> tuple[bytes, bool]:
        (n,) = struct.unpack(">i", body[:4])
        token = body[4 : 4 + n]
        if session.mechanism == "PLAIN":
            ok = self._plain(session, token)
            reply = b""
        elif session.mechanism in _HASH:
            ok, reply = self._scram(session, token)
        else:
            ok, reply = False, b""
        if not ok:
            self.refused.append((session.mechanism or "?", session.user or "?"))
            message = (
                "Authentication failed during authentication due to invalid credentials "
                f"with SASL mechanism {session.mechanism}"
            )
            answer = struct.pack(">h", _SASL_AUTHENTICATION_FAILED) + _string(message)
            answer += struct.pack(">i", 0)
            if version >= 1:
                answer += struct.pack(">q", 0)
            return answer, False
        answer = struct.pack(">h", 0) + _string(None) + struct.pack(">i", len(reply)) + reply
        if version >= 1:
            answer += struct.pack(">q", 0)
        return answer, True

    def _plain(self, session: _Session, token: bytes) -> bool:
        parts = token.decode("utf-8", "replace").split("\0")
        if len(parts) != 3:
            return False
        authzid, user, password = parts
        session.user = user
        expected = self.users.get(user)
        ok = (
            expected is not None
            and authzid in ("", user)
            and hmac.compare_digest(password.encode(), expected.encode())
        )
        if ok:
            session.authenticated = True
            self.accepted.append(("PLAIN", user))
        return ok

    def _scram(self, session: _Session, token: bytes) -> tuple[bool, bytes]:
        assert session.mechanism is not None
        text = token.decode("utf-8", "replace")
        if session.scram is None:  # client-first: "n,,n=user,r=nonce"
            gs2, _, bare = text.partition(",,")
            attrs = dict(p.split("=", 1) for p in bare.split(",") if "=" in p)
            user = attrs.get("n", "").replace("=2C", ",").replace("=3D", "=")
            session.user = user
            credential = self._credentials.get((session.mechanism, user))
            if not gs2.startswith("n") or "r" not in attrs or credential is None:
                return False, b""
            salt, salted = credential
            scram = _Scram(_HASH[session.mechanism], salt, salted, first_bare=bare)
            scram.nonce = attrs["r"] + base64.b64encode(os.urandom(18)).decode()
            scram.server_first = (
                f"r={scram.nonce},s={base64.b64encode(salt).decode()},i={_ITERATIONS}"
            )
            session.scram = scram
            return True, scram.server_first.encode()
        scram = session.scram  # client-final: "c=biws,r=nonce,p=proof"
        without_proof, _, proof_part = text.rpartition(",p=")
        attrs = dict(p.split("=", 1) for p in without_proof.split(",") if "=" in p)
        if attrs.get("r") != scram.nonce:
            return False, b""
        auth_message = f"{scram.first_bare},{scram.server_first},{without_proof}".encode()
        client_key = hmac.digest(scram.salted, b"Client Key", scram.hash_name)
        stored_key = hashlib.new(scram.hash_name, client_key).digest()
        signature = hmac.digest(stored_key, auth_message, scram.hash_name)
        try:
            proof = base64.b64decode(proof_part, validate=True)
        except ValueError:
            return False, b""
        if len(proof) != len(signature):
            return False, b""
        recovered = bytes(a ^ b for a, b in zip(proof, signature, strict=True))
        if not hmac.compare_digest(hashlib.new(scram.hash_name, recovered).digest(), stored_key):
            return False, b""
        server_key = hmac.digest(scram.salted, b"Server Key", scram.hash_name)
        verifier = hmac.digest(server_key, auth_message, scram.hash_name)
        session.authenticated = True
        self.accepted.append((session.mechanism, session.user or "?"))
        return True, b"v=" + base64.b64encode(verifier)


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    (size,) = struct.unpack(">i", await reader.readexactly(4))
    if not 0 < size <= 64 * 1024 * 1024:
        raise OSError(f"implausible frame size {size}")
    return await reader.readexactly(size)


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
    finally:
        dst.transport.abort()
