"""Apache Kafka for the integration tests: one KRaft node (broker and controller in one JVM)
on free loopback ports, its data in a temporary directory.

The jars come from ``deploy/kafka/fetch.sh`` (the version pinned in ``deploy/kafka/pom.xml``,
fetched from Maven Central once into ``.cache/kafka-<version>/libs``).  Start-up is a
``kafka.tools.StorageTool format`` and ``kafka.Kafka server.properties``; the broker is ready
when a client can create a topic on it.  Stop: SIGTERM (a controlled shutdown), then SIGKILL
after a bound.

With ``security=Security(...)`` the node is secured as production runs it: clients connect
over SASL (SCRAM-SHA-256 and SCRAM-SHA-512, users created at storage format time with
``--add-scram``), optionally also over SASL_SSL (a CA and a broker certificate made with
``openssl`` in the broker's directory, PEM key and trust stores), and the
``StandardAuthorizer`` refuses what no ACL allows.  The controller and inter-broker
listeners stay PLAINTEXT on loopback; their principal (``User:ANONYMOUS``) and the admin
user are super users, so a test manages ACLs through :meth:`KafkaBroker.admin_bootstrap`.

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
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError, for_code
from aiokafka.protocol.admin import CreateAclsRequest, DeleteAclsRequest

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


#: SCRAM mechanisms the secured listeners offer (PLAIN is not offered).
SCRAM = ("SCRAM-SHA-256", "SCRAM-SHA-512")


@dataclass(frozen=True)
class Security:
    """How a :class:`KafkaBroker` is secured.

    ``users`` (name -> password) get SCRAM credentials for both mechanisms at format time;
    ``tls`` adds a SASL_SSL listener; ``authorizer`` switches on the StandardAuthorizer
    (super users: the admin user and the PLAINTEXT listeners' ``User:ANONYMOUS``).
    """

    users: dict[str, str] = field(default_factory=dict)
    admin: str = "admin"
    tls: bool = False
    authorizer: bool = True


@dataclass(frozen=True)
class TlsFiles:
    """What a client needs to reach the SASL_SSL listener: the CA that signed the broker."""

    cafile: Path
    keystore: Path


def make_tls_files(work: Path) -> TlsFiles:
    """A CA and a broker certificate for ``127.0.0.1``/``localhost``, signed by it (openssl)."""
    if shutil.which("openssl") is None:
        raise KafkaUnavailableError("openssl is not installed (apt-get install openssl)")
    ca_key, ca, key, csr, cert = (
        work / n for n in ("ca.key", "ca.pem", "broker.key", "broker.csr", "broker.pem")
    )
    ext = work / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    rsa = ["-newkey", "rsa:2048", "-nodes"]
    for cmd in (
        ["req", "-x509", *rsa, "-keyout", ca_key, "-out", ca, "-days", "2",
         "-subj", "/CN=meter-test-ca"],
        ["req", *rsa, "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1"],
        ["x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
         "-out", cert, "-days", "2", "-extfile", ext],
    ):  # fmt: skip
        subprocess.run(["openssl", *map(str, cmd)], capture_output=True, check=True)
    keystore = work / "broker-keystore.pem"  # PEM key store: the key, then the chain
    keystore.write_text(key.read_text() + cert.read_text() + ca.read_text())
    return TlsFiles(cafile=ca, keystore=keystore)


#: Kafka's codes (org.apache.kafka.common.resource.ResourceType, acl.AclOperation).
RESOURCE_TYPES = {"topic": 2, "group": 3, "cluster": 4, "transactional_id": 5}
OPERATIONS = {
    "Read": 3, "Write": 4, "Create": 5, "Delete": 6, "Alter": 7, "Describe": 8,
    "DescribeConfigs": 10, "AlterConfigs": 11, "IdempotentWrite": 12,
}  # fmt: skip
_LITERAL, _PREFIXED, _ALLOW = 3, 4, 3


@dataclass(frozen=True)
class Acl:
    """One ALLOW rule: ``operation`` on the ``resource`` (``topic``, ``group``, ``cluster``)
    named ``name`` (a prefix when ``prefixed``), for ``principal`` from any host."""

    principal: str
    resource: str
    name: str
    operation: str
    prefixed: bool = False

    def __str__(self) -> str:
        pattern = "prefixed" if self.prefixed else "literal"
        return f"{self.principal} {self.operation} on {self.resource} {self.name!r} ({pattern})"

    def _fields(self) -> tuple[int, str, int, str, str, int, int]:
        return (
            RESOURCE_TYPES[self.resource],
            self.name,
            _PREFIXED if self.prefixed else _LITERAL,
            self.principal,
            "*",
            OPERATIONS[self.operation],
            _ALLOW,
        )


async def _admin_send(bootstrap: str, requests: list[Any]) -> list[Any]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    try:
        await admin.start()
        return [await admin._send_request(r) for r in requests]
    finally:
        await admin.close()


def _raise_errors(answers: list[Any], field: str) -> None:
    for answer in answers:
        for result in getattr(answer, field):
            if result[0]:
                raise for_code(result[0])(result[1])


def create_acls(bootstrap: str, acls: list[Acl]) -> None:
    """Add ``acls`` through ``bootstrap`` (a super user's listener)."""
    answers = asyncio.run(_admin_send(bootstrap, [CreateAclsRequest(*a._fields()) for a in acls]))
    _raise_errors(answers, "creation_responses")


def delete_acls(bootstrap: str, acls: list[Acl]) -> None:
    """Remove exactly ``acls`` (each is its own filter)."""
    answers = asyncio.run(_admin_send(bootstrap, [DeleteAclsRequest(*a._fields()) for a in acls]))
    _raise_errors(answers, "filter_responses")


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


def free_port(host: str = _LOOPBACK) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def listening(port: int, host: str = _LOOPBACK) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


def cluster_id() -> str:
    """A random cluster id; never one starting with ``-`` (1 in 64), which the storage tool
    takes for an option ("argument --cluster-id/-t: expected one argument")."""
    while (cid := base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode())[0] == "-":
        pass
    return cid


async def create_probe_topic(bootstrap: str, replicas: int = 1) -> None:
    """Create the probe topic, or find it there: a controller answered and a broker took it."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
    try:
        await admin.start()
        with contextlib.suppress(TopicAlreadyExistsError):
            await admin.create_topics([NewTopic(_READY_PROBE_TOPIC, 1, replicas)])
    finally:
        await admin.close()


def java(
    libs: Path, work: Path, main: str, *args: str, opts: tuple[str, ...] = JVM_OPTS
) -> list[str]:
    """A JVM running ``main`` from the broker's jars, logging as ``work/log4j2.properties``."""
    log4j = work / "log4j2.properties"
    if not log4j.exists():
        log4j.write_text(_LOG4J2)
    return [
        "java", *opts, f"-Dlog4j2.configurationFile={log4j}",
        "-cp", f"{libs}/*", main, *args,
    ]  # fmt: skip


def write_config(path: Path, props: dict[str, str]) -> Path:
    path.write_text("".join(f"{k}={v}\n" for k, v in props.items()))
    return path


def format_storage(
    libs: Path, work: Path, config: Path, cluster: str, log: IO[bytes], *extra: str
) -> None:
    """``kafka-storage format``: the node's log directories, stamped with ``cluster``
    (``extra``: more arguments, e.g. ``--add-scram``)."""
    fmt = subprocess.run(
        java(
            libs,
            work,
            "kafka.tools.StorageTool",
            "format",
            "-t",
            cluster,
            "-c",
            str(config),
            *extra,
        ),
        stdout=log,
        stderr=subprocess.STDOUT,
        check=False,
    )
    if fmt.returncode != 0:
        raise KafkaStartError(f"kafka-storage format exited {fmt.returncode} ({config})")


def launch(
    libs: Path, work: Path, config: Path, log: IO[bytes], opts: tuple[str, ...] = JVM_OPTS
) -> subprocess.Popen[bytes]:
    """``kafka.Kafka config``: one node; it dies with the test process."""
    return subprocess.Popen(
        java(libs, work, "kafka.Kafka", str(config), opts=opts),
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        preexec_fn=_pdeathsig_preexec(),  # noqa: PLW1509 - the broker dies with its parent
    )


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float = 20.0) -> None:
    """SIGTERM (a controlled shutdown), SIGKILL if it is not gone within ``timeout``."""
    if proc is not None and proc.poll() is None:
        proc.send_signal(signal.SIGCONT)  # a paused JVM cannot shut down
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def log_tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-4000:]
    except OSError:
        return ""


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
        security: Security | None = None,
        ready_timeout: float = 90.0,
        port: int = 0,
        advertised_port: int = 0,
    ) -> None:
        self.libs = libs
        self.security = security
        #: With ``security``: the PLAINTEXT listener for the tests' admin (a super user).
        self.admin_port = 0
        #: With ``Security(tls=True)``: the SASL_SSL listener's port and the CA to trust.
        self.tls_port = 0
        self.tls: TlsFiles | None = None
        self.log_path = log_path
        self.settings = {**SETTINGS, **(settings or {})}
        self.ready_timeout = ready_timeout
        self.port = 0
        self._requested_port = port
        self._advertised_port = advertised_port
        self._data: Path | None = None
        #: --add-scram arguments of the storage format (a secured node's users)
        self._scram: list[str] = []
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
    def admin_bootstrap(self) -> str:
        """Where a test reaches the broker as a super user (the PLAINTEXT listener)."""
        return f"{_LOOPBACK}:{self.admin_port or self.port}"

    @property
    def tls_bootstrap(self) -> str:
        return f"{_LOOPBACK}:{self.tls_port}"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self) -> Self:
        started = time.monotonic()
        self._dir = tempfile.TemporaryDirectory(prefix="meter-kafka-")
        work = Path(self._dir.name)
        if self.security is not None and self.security.tls:
            self.tls = make_tls_files(work)
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
        self.port, controller = self._requested_port or free_port(), free_port()
        data = self._data = work / f"data-{attempt}"
        props = {
            **self.settings,
            "listeners": f"PLAINTEXT://{_LOOPBACK}:{self.port},CONTROLLER://{_LOOPBACK}:{controller}",
            "advertised.listeners": f"PLAINTEXT://{self.bootstrap}",
            "controller.quorum.voters": f"1@{_LOOPBACK}:{controller}",
            "log.dirs": str(data),
        }
        scram: list[str] = []
        if self.security is not None:
            props.update(self._secured(controller))
            users = {self.security.admin: "admin-secret", **self.security.users}
            for name, password in users.items():
                for mechanism in SCRAM:
                    scram += ["--add-scram", f"{mechanism}=[name={name},password={password}]"]
        self._scram = scram
        config = write_config(work / "server.properties", props)
        try:
            format_storage(self.libs, work, config, cluster_id(), self._log, *scram)
        except KafkaStartError as exc:
            raise KafkaStartError(f"{exc}:\n{self._tail()}") from None
        return self._launch(config)

    def _launch(self, config: Path) -> bool:
        """Start the JVM on ``config``; True once ready, False if it exited first."""
        assert self._log is not None and self._dir is not None
        self._proc = launch(self.libs, Path(self._dir.name), config, self._log)
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                return False
            if not listening(self.port):
                time.sleep(0.1)
                continue
            try:
                asyncio.run(create_probe_topic(self.admin_bootstrap))
            except Exception:  # noqa: BLE001 - no controller yet
                time.sleep(0.2)
            else:
                return True
        raise KafkaStartError(
            f"Apache Kafka on {self.bootstrap} not ready within {self.ready_timeout:.0f} s:\n"
            f"{self._tail()}"
        )

    def _secured(self, controller: int) -> dict[str, str]:
        """Listeners and settings of a secured node: SASL (and SASL_SSL) for clients,
        PLAINTEXT for the controller, the inter-broker traffic and the tests' admin."""
        assert self.security is not None
        self.admin_port = free_port()
        client = [f"SASL://{_LOOPBACK}:{self.port}", f"PLAINTEXT://{_LOOPBACK}:{self.admin_port}"]
        protocols = "SASL:SASL_PLAINTEXT,PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
        props = {
            "sasl.enabled.mechanisms": ",".join(SCRAM),
            "listener.name.sasl.sasl.enabled.mechanisms": ",".join(SCRAM),
        }
        login = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
        for mechanism in SCRAM:
            props[f"listener.name.sasl.{mechanism.lower()}.sasl.jaas.config"] = login
        if self.tls is not None:
            self.tls_port = free_port()
            client.append(f"TLS://{_LOOPBACK}:{self.tls_port}")
            protocols += ",TLS:SASL_SSL"
            props["listener.name.tls.sasl.enabled.mechanisms"] = ",".join(SCRAM)
            for mechanism in SCRAM:
                props[f"listener.name.tls.{mechanism.lower()}.sasl.jaas.config"] = login
            props["listener.name.tls.ssl.keystore.type"] = "PEM"
            props["listener.name.tls.ssl.keystore.location"] = str(self.tls.keystore)
        if self.security.authorizer:
            props["authorizer.class.name"] = (
                "org.apache.kafka.metadata.authorizer.StandardAuthorizer"
            )
            props["super.users"] = f"User:ANONYMOUS;User:{self.security.admin}"
            props["allow.everyone.if.no.acl.found"] = "false"
        return {
            **props,
            "listeners": ",".join([*client, f"CONTROLLER://{_LOOPBACK}:{controller}"]),
            "advertised.listeners": ",".join(client),
            "listener.security.protocol.map": protocols,
        }

    def _tail(self) -> str:
        return log_tail(self.log_path)

    def kill(self) -> None:
        """SIGKILL the JVM (a crash); its data stays for :meth:`restart`."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(10)

    def restart(self, *, wipe: bool = False, timeout: float = 20.0) -> None:
        """Stop the JVM (SIGTERM; nothing if killed already) and start it again on the same
        ports.  ``wipe``: its data directory deleted and formatted afresh (a new cluster id),
        a broker that lost its disk; else it comes back with every topic, offset and group."""
        assert self._dir is not None and self._data is not None and self._log is not None
        self._halt(timeout)
        work = Path(self._dir.name)
        config = work / "server.properties"
        if wipe:
            shutil.rmtree(self._data)
            format_storage(self.libs, work, config, cluster_id(), self._log, *self._scram)
        started = time.monotonic()
        if not self._launch(config):
            raise KafkaStartError(f"Apache Kafka did not start again:\n{self._tail()}")
        self.ready_seconds = time.monotonic() - started

    def _halt(self, timeout: float) -> None:
        stop_process(self._proc, timeout)
        self._proc = None

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM (a controlled shutdown), SIGKILL if it is not gone within ``timeout``."""
        self._halt(timeout)
        if self._log is not None:
            self._log.close()
            self._log = None
        self.tls = None
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
