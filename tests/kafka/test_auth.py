"""A refused SASL handshake is recognized and named in one line, never with the password.

The checks against :class:`~tests.kafka.sasl_front.SaslFront` need no broker: the front
answers ApiVersions and the SASL handshake itself, as Apache Kafka does.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from aiokafka.conn import ScramAuthenticator
from aiokafka.errors import (
    IllegalSaslStateError,
    KafkaConnectionError,
    SaslAuthenticationFailed,
    UnsupportedSaslMechanismError,
)

from meter.cli import _auth_failure
from meter.errors import AuthenticationError, BrokerError
from meter.kafka import (
    KafkaSettings,
    Secret,
    auth_failure,
    check_authentication,
    diagnose,
    translate_auth_errors,
)
from meter.kafka.auth import _reason
from tests.kafka.sasl_front import MECHANISMS, SaslFront

PASSWORD = "correct-horse-9"
WRONG = "battery-staple-7"


def sasl(mechanism: str = "SCRAM-SHA-256", password: str = WRONG, **kw: Any) -> KafkaSettings:
    values: dict[str, Any] = {
        "bootstrap": "127.0.0.1:9092",
        "security_protocol": "SASL_PLAINTEXT",
        "sasl_mechanism": mechanism,
        "sasl_username": "alice",
        "sasl_password": Secret(password),
        **kw,
    }
    return KafkaSettings(**values)


def one_clean_line(err: AuthenticationError, mechanism: str, password: str = WRONG) -> str:
    text = str(err)
    assert "\n" not in text
    assert text.startswith(f"authentication failed: SASL {mechanism} as user 'alice' ")
    assert password not in text
    return text


@pytest.fixture(scope="module")
def front() -> Iterator[SaslFront]:
    with SaslFront({"alice": PASSWORD}) as f:
        yield f


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


# ---------------------------------------------------------------------- recognizer


def aiokafka_scram_error(mechanism: str, server_final: str) -> BaseException:
    """What aiokafka's own SCRAM client raises on a server-final message."""
    scram = ScramAuthenticator(
        loop=None,
        sasl_plain_password=WRONG,
        sasl_plain_username="alice",
        sasl_mechanism=mechanism,
    )
    try:
        scram.process_server_final_message(server_final)
    except (KeyError, ValueError) as exc:
        return exc
    raise AssertionError("aiokafka accepted the answer")


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_aiokafka_scram_keyerror_v_is_a_rejection(mechanism: str) -> None:
    exc = aiokafka_scram_error(mechanism, "e=invalid-proof")
    assert isinstance(exc, KeyError)
    assert exc.args == ("v",)
    err = auth_failure(exc, sasl(mechanism))
    assert err is not None
    assert one_clean_line(err, mechanism).endswith(
        "was rejected by 127.0.0.1:9092 (check the password)"
    )


def test_a_keyerror_v_from_elsewhere_is_not_a_rejection() -> None:
    try:
        _ = {"u": 1}["v"]
    except KeyError as exc:
        assert auth_failure(exc, sasl()) is None


def test_aiokafka_wrong_server_signature_is_recognized() -> None:
    exc = aiokafka_scram_error("SCRAM-SHA-256", "v=AAAA")
    assert isinstance(exc, ValueError)
    assert auth_failure(exc, sasl()) is not None


@pytest.mark.parametrize(
    ("exc", "words"),
    [
        (SaslAuthenticationFailed("invalid credentials"), "was rejected by 127.0.0.1:9092"),
        (UnsupportedSaslMechanismError("nope"), "is not offered by 127.0.0.1:9092"),
        (IllegalSaslStateError("state"), "illegal SASL state"),
    ],
)
def test_aiokafka_sasl_errors_are_recognized(exc: BaseException, words: str) -> None:
    err = auth_failure(exc, sasl("PLAIN"))
    assert err is not None
    assert words in one_clean_line(err, "PLAIN")


def test_the_cause_chain_is_followed() -> None:
    outer = RuntimeError("wrapped")
    outer.__cause__ = SaslAuthenticationFailed("bad")
    assert auth_failure(outer, sasl()) is not None


def test_unable_to_bootstrap_needs_a_diagnosis() -> None:
    assert auth_failure(KafkaConnectionError("Unable to bootstrap from [...]"), sasl()) is None


def test_nothing_is_an_auth_failure_without_sasl() -> None:
    plain = KafkaSettings(bootstrap="127.0.0.1:9092")
    assert auth_failure(SaslAuthenticationFailed("x"), plain) is None


def test_an_authentication_error_is_itself() -> None:
    err = AuthenticationError("authentication failed: x")
    assert auth_failure(err, sasl()) is err
    assert isinstance(err, BrokerError)


def test_server_reasons_are_bounded_printable_and_never_show_the_password() -> None:
    settings = sasl(password=PASSWORD)
    said = _reason(f"bad\n\x00credentials {PASSWORD} " + "x" * 500, settings)
    assert said is not None
    assert PASSWORD not in said
    assert "\n" not in said
    assert len(said) <= 120


def test_the_cli_recognizes_what_escaped(tmp_path: Any) -> None:
    secret = tmp_path / "pw"
    secret.write_text(WRONG)
    secret.chmod(0o600)
    args = argparse.Namespace(
        broker="127.0.0.1:9092",
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username="alice",
        sasl_password_file=str(secret),
    )
    err = _auth_failure(args, aiokafka_scram_error("SCRAM-SHA-512", "e=invalid-proof"))
    assert err is not None
    one_clean_line(err, "SCRAM-SHA-512")
    assert _auth_failure(argparse.Namespace(), SaslAuthenticationFailed("x")) is None


# ---------------------------------------------------------------------- the check


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_the_right_password_passes_the_check(front: SaslFront, mechanism: str) -> None:
    settings = sasl(mechanism, PASSWORD, bootstrap=front.bootstrap)
    assert asyncio.run(diagnose(settings)) is None
    asyncio.run(check_authentication(settings))
    assert (mechanism, "alice") in front.accepted


@pytest.mark.parametrize("mechanism", MECHANISMS)
def test_a_wrong_password_is_one_line(front: SaslFront, mechanism: str) -> None:
    settings = sasl(mechanism, WRONG, bootstrap=front.bootstrap)
    err = asyncio.run(diagnose(settings))
    assert err is not None
    text = one_clean_line(err, mechanism)
    assert text.endswith(f"was rejected by {front.bootstrap} (check the password)")
    with pytest.raises(AuthenticationError):
        asyncio.run(check_authentication(settings))


def test_an_unknown_user_is_rejected(front: SaslFront) -> None:
    settings = sasl("SCRAM-SHA-512", PASSWORD, bootstrap=front.bootstrap, sasl_username="bob")
    err = asyncio.run(diagnose(settings))
    assert err is not None
    assert "as user 'bob' was rejected" in str(err)


def test_a_mechanism_the_broker_does_not_offer() -> None:
    with SaslFront({"alice": PASSWORD}, mechanisms=["SCRAM-SHA-512"]) as f:
        err = asyncio.run(diagnose(sasl("PLAIN", PASSWORD, bootstrap=f.bootstrap)))
    assert err is not None
    assert one_clean_line(err, "PLAIN", PASSWORD).endswith(
        f"is not offered by {f.bootstrap} (it offers: SCRAM-SHA-512)"
    )


def test_an_unreachable_broker_is_not_an_auth_failure() -> None:
    settings = sasl(bootstrap=f"127.0.0.1:{free_port()}")
    assert asyncio.run(diagnose(settings)) is None


def test_the_next_bootstrap_server_is_tried(front: SaslFront) -> None:
    settings = sasl(bootstrap=f"127.0.0.1:{free_port()},{front.bootstrap}")
    err = asyncio.run(diagnose(settings))
    assert err is not None
    assert f"rejected by {front.bootstrap}" in str(err)


def test_without_sasl_nothing_is_checked() -> None:
    settings = KafkaSettings(bootstrap=f"127.0.0.1:{free_port()}")
    assert asyncio.run(diagnose(settings)) is None


# ---------------------------------------------------------------------- translation


def test_translation_checks_before_the_block_runs(front: SaslFront) -> None:
    ran = []

    async def run() -> None:
        async with translate_auth_errors(sasl(bootstrap=front.bootstrap)):
            ran.append(True)

    with pytest.raises(AuthenticationError):
        asyncio.run(run())
    assert ran == []


def test_unable_to_bootstrap_is_diagnosed(front: SaslFront) -> None:
    async def run() -> None:
        async with translate_auth_errors(sasl(bootstrap=front.bootstrap), check_first=False):
            raise KafkaConnectionError("Unable to bootstrap from [...]")

    with pytest.raises(AuthenticationError) as caught:
        asyncio.run(run())
    assert isinstance(caught.value.__cause__, KafkaConnectionError)


def test_an_outage_stays_an_outage(front: SaslFront) -> None:
    """With good credentials "Unable to bootstrap" is not an authentication matter."""

    async def run() -> None:
        async with translate_auth_errors(sasl(password=PASSWORD, bootstrap=front.bootstrap)):
            raise KafkaConnectionError("Unable to bootstrap from [...]")

    with pytest.raises(KafkaConnectionError):
        asyncio.run(run())


def test_other_errors_pass_through(front: SaslFront) -> None:
    async def run() -> None:
        async with translate_auth_errors(sasl(bootstrap=front.bootstrap), check_first=False):
            raise ValueError("not about authentication")

    with pytest.raises(ValueError, match="not about authentication"):
        asyncio.run(run())


# ---------------------------------------------------------------------- the command line


@pytest.mark.parametrize("command", [["report"], ["send", "-"]])
def test_a_command_says_it_in_one_line_and_exits_2(
    front: SaslFront, tmp_path: Any, command: list[str]
) -> None:
    secret = tmp_path / "pw"
    secret.write_text(WRONG)
    secret.chmod(0o600)
    flags = ["--broker", front.bootstrap, "--security-protocol", "SASL_PLAINTEXT"]
    flags += ["--sasl-mechanism", "SCRAM-SHA-256", "--sasl-username", "alice"]
    out = subprocess.run(
        [sys.executable, "-m", "meter", *command, *flags, "--sasl-password-file", str(secret)],
        input=b'{"x": 1}\n',
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 2
    assert out.stdout == b""
    assert out.stderr.decode() == (
        "meter: authentication failed: SASL SCRAM-SHA-256 as user 'alice' was rejected by "
        f"{front.bootstrap} (check the password)\n"
    )
