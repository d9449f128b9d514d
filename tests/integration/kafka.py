"""Apache Kafka for the integration tests: one KRaft node (broker and controller in one JVM)
on free loopback ports, its data in a temporary directory.

The jars come from ``deploy/kafka/fetch.sh`` (the version pinned in ``deploy/kafka/pom.xml``,
fetched from Maven Central once into ``.cache/kafka-<version>/libs``).  Start-up is a
``kafka.tools.StorageTool format`` and ``kafka.Kafka server.properties``; the broker is ready
when a client can create a topic on it.  Stop: SIGTERM (a controlled shutdown), then SIGKILL
after a bound.

The settings keep tests fast and honest: internal topics with one replica and few
partitions, no initial rebalance delay, sessions as short as the tests use, and no topic
auto-creation (meter creates every topic it uses, as production needs).  Everything else is
Apache Kafka's default (notably ``message.max.bytes`` and
``log.message.timestamp.after.max.ms``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import IO, Self

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from meter.broker.tansu import _pdeathsig_preexec

ROOT = Path(__file__).resolve().parents[2]
FETCH = ROOT / "deploy" / "kafka" / "fetch.sh"
_LOOPBACK = "127.0.0.1"
_READY_PROBE_TOPIC = "meter-test-ready"

#: JVM options: a bounded heap (one broker per pytest-xdist process) and G1 as Kafka's own
#: scripts use it.
JVM_OPTS = (
    "-Xms256m",
    "-Xmx1g",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-Djava.awt.headless=true",
)

SETTINGS = {
    "process.roles": "broker,controller",
    "node.id": "1",
    "controller.listener.names": "CONTROLLER",
    "inter.broker.listener.name": "PLAINTEXT",
    "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
    "num.partitions": "1",
    "auto.create.topics.enable": "false",
    "offsets.topic.replication.factor": "1",
    "offsets.topic.num.partitions": "4",
    "transaction.state.log.replication.factor": "1",
    "transaction.state.log.min.isr": "1",
    "transaction.state.log.num.partitions": "4",
    "share.coordinator.state.topic.replication.factor": "1",
    "share.coordinator.state.topic.min.isr": "1",
    "group.initial.rebalance.delay.ms": "0",
    # The tests' workers use --session-timeout-ms 6000; Kafka's floor is 6000 by default.
    "group.min.session.timeout.ms": "1000",
}

_LOG4J2 = """\
status = error
appender.out.type = Console
appender.out.name = out
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = INFO
rootLogger.appenderRef.out.ref = out
logger.kafka.name = kafka
logger.kafka.level = INFO
logger.apache.name = org.apache.kafka
logger.apache.level = INFO
"""


class KafkaUnavailableError(RuntimeError):
    """Java or the broker's jars are missing (one line saying which)."""


class KafkaStartError(RuntimeError):
    """The broker did not start or did not answer in time (with the tail of its log)."""


def fetch_libs() -> Path:
    """The broker's jar directory, fetched by ``deploy/kafka/fetch.sh`` if not cached yet."""
    if shutil.which("java") is None:
        raise KafkaUnavailableError("java is not installed (apt-get install default-jre-headless)")
    done = subprocess.run([str(FETCH)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise KafkaUnavailableError(done.stderr.strip() or f"{FETCH} exited {done.returncode}")
    return Path(done.stdout.strip())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def _listening(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((_LOOPBACK, port)) == 0


def _cluster_id() -> str:
    """A random cluster id; never one starting with ``-`` (1 in 64), which the storage tool
    takes for an option ("argument --cluster-id/-t: expected one argument")."""
    while (cid := base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode())[0] == "-":
        pass
    return cid


async def _create_probe_topic(bootstrap: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    try:
        await admin.start()
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics([NewTopic(_READY_PROBE_TOPIC, 1, 1)])
    finally:
        await admin.close()


class KafkaBroker:
    """A single-node Apache Kafka; ``with KafkaBroker(libs, log_path) as b: b.bootstrap``.

    ``port`` (default: a free one) is where it listens; ``advertised_port`` (default:
    ``port``) is what it puts in metadata, so that every client connection can run through
    a TCP proxy listening there (start the proxy first: the ready probe goes through it).
    :meth:`kill` crashes it keeping its data; :meth:`restart` starts it again on the same
    ports, with its data or (``wipe=True``) formatted afresh, a broker that lost its disk.
    """

    kind = "kafka"

    def __init__(
        self,
        libs: Path,
        log_path: Path,
        *,
        settings: dict[str, str] | None = None,
        ready_timeout: float = 90.0,
        port: int = 0,
        advertised_port: int = 0,
    ) -> None:
        self.libs = libs
        self.log_path = log_path
        self.settings = {**SETTINGS, **(settings or {})}
        self.ready_timeout = ready_timeout
        self.port = 0
        self._requested_port = port
        self._advertised_port = advertised_port
        self._data: Path | None = None
        self.ready_seconds = 0.0
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{_LOOPBACK}:{self._advertised_port or self.port}"

    @property
    def listen_bootstrap(self) -> str:
        """Where the broker itself listens (past any proxy)."""
        return f"{_LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def _java(self, main: str, *args: str) -> list[str]:
        assert self._dir is not None
        log4j = Path(self._dir.name) / "log4j2.properties"
        return [
            "java", *JVM_OPTS, f"-Dlog4j2.configurationFile={log4j}",
            "-cp", f"{self.libs}/*", main, *args,
        ]  # fmt: skip

    def start(self) -> Self:
        started = time.monotonic()
        self._dir = tempfile.TemporaryDirectory(prefix="meter-kafka-")
        work = Path(self._dir.name)
        (work / "log4j2.properties").write_text(_LOG4J2)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        try:
            self._start_in_tries(work, tries=3)
        except BaseException:
            self.stop()
            raise
        self.ready_seconds = time.monotonic() - started
        return self

    def _start_in_tries(self, work: Path, tries: int) -> None:
        for attempt in range(tries):  # a "free" port may be taken before the JVM binds it
            if self._start_once(work, attempt):
                return
        raise KafkaStartError(f"Apache Kafka did not start in {tries} tries:\n{self._tail()}")

    def _start_once(self, work: Path, attempt: int) -> bool:
        assert self._log is not None
        self.port, controller = self._requested_port or _free_port(), _free_port()
        data = self._data = work / f"data-{attempt}"
        props = {
            **self.settings,
            "listeners": f"PLAINTEXT://{_LOOPBACK}:{self.port},CONTROLLER://{_LOOPBACK}:{controller}",
            "advertised.listeners": f"PLAINTEXT://{self.bootstrap}",
            "controller.quorum.voters": f"1@{_LOOPBACK}:{controller}",
            "log.dirs": str(data),
        }
        config = work / "server.properties"
        config.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
        fmt = subprocess.run(
            self._java("kafka.tools.StorageTool", "format", "-t", _cluster_id(), "-c", str(config)),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            check=False,
        )
        if fmt.returncode != 0:
            raise KafkaStartError(f"kafka-storage format exited {fmt.returncode}:\n{self._tail()}")
        return self._launch(config)

    def _launch(self, config: Path) -> bool:
        """Start the JVM on ``config``; True once ready, False if it exited first."""
        assert self._log is not None
        self._proc = subprocess.Popen(
            self._java("kafka.Kafka", str(config)),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=_pdeathsig_preexec(),  # noqa: PLW1509 - the broker dies with its parent
        )
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                return False
            if not _listening(self.port):
                time.sleep(0.1)
                continue
            try:
                asyncio.run(_create_probe_topic(self.listen_bootstrap))
            except Exception:  # noqa: BLE001 - no controller yet
                time.sleep(0.2)
            else:
                return True
        raise KafkaStartError(
            f"Apache Kafka on {self.bootstrap} not ready within {self.ready_timeout:.0f} s:\n"
            f"{self._tail()}"
        )

    def _tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL the JVM (a crash); its data stays for :meth:`restart`."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(10)

    def restart(self, *, wipe: bool = False, timeout: float = 20.0) -> None:
        """Stop the JVM (SIGTERM; nothing if killed already) and start it again on the same
        ports.  ``wipe``: its data directory deleted and formatted afresh (a new cluster id),
        a broker that lost its disk; else it comes back with every topic, offset and group."""
        assert self._dir is not None and self._data is not None
        self._halt(timeout)
        config = Path(self._dir.name) / "server.properties"
        if wipe:
            shutil.rmtree(self._data)
            fmt = subprocess.run(
                self._java("kafka.tools.StorageTool", "format", "-t", _cluster_id(), "-c",
                           str(config)),
                stdout=self._log, stderr=subprocess.STDOUT, check=False,
            )  # fmt: skip
            if fmt.returncode != 0:
                raise KafkaStartError(f"kafka-storage format exited {fmt.returncode}")
        started = time.monotonic()
        if not self._launch(config):
            raise KafkaStartError(f"Apache Kafka did not start again:\n{self._tail()}")
        self.ready_seconds = time.monotonic() - started

    def _halt(self, timeout: float) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(10)
        self._proc = None

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (a controlled shutdown), SIGKILL if it is not gone within ``timeout``."""
        self._halt(timeout)
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"KafkaBroker({self.bootstrap}, pid={self.pid}, libs={self.libs})"


if __name__ == "__main__":  # python -m tests.integration.kafka: start, time, stop
    t0 = time.monotonic()
    libs = fetch_libs()
    t1 = time.monotonic()
    with KafkaBroker(libs, Path(tempfile.gettempdir()) / f"kafka-{os.getpid()}.log") as b:
        t2 = time.monotonic()
        print(f"jars {t1 - t0:.2f} s, ready {b.ready_seconds:.2f} s on {b.bootstrap}")
    print(f"stopped in {time.monotonic() - t2:.2f} s")
