"""Apache Kafka for the cluster fault tests: three KRaft nodes, each its own JVM process, each
broker and controller in one (combined mode), a static quorum of the three.

Built from the pieces of ``tests/integration/kafka.py`` (the jars, the JVM, the storage format,
the settings).  Each node keeps its data directory and ports for the cluster's life, so it can
be killed, paused, stopped and started again as a node of a real cluster is.  The brokers
listen on ``host`` (loopback, or the host end of a veth pair so a process in a network
namespace reaches them, see ``netns.py``) and advertise it; the controllers listen on
loopback.  Internal topics get three replicas and ``min.insync.replicas`` 2, as in production;
a broker's session with the controller is 4 s (heartbeats every 0.5 s) so a lost broker is
fenced, and its partitions move, within seconds.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self

from aiokafka.admin import AIOKafkaAdminClient

from tests.integration.kafka import (
    _LOOPBACK,
    SETTINGS,
    KafkaStartError,
    cluster_id,
    create_probe_topic,
    format_storage,
    free_port,
    launch,
    listening,
    log_tail,
    stop_process,
    write_config,
)

#: Three JVMs on a small machine: a smaller heap each than the single node's, and only the
#: quick compiler (C1), which starts a node sooner and leaves the cores to the tests.
CLUSTER_JVM_OPTS = (
    "-Xms128m",
    "-Xmx512m",
    "-XX:TieredStopAtLevel=1",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-Djava.awt.headless=true",
)

#: Settings the tests' cluster has only to be quick or small, and why; every other broker
#: setting of the cluster is what production runs (tests/deploy/test_compose.py holds
#: docker-compose.yml to the rest).
TEST_ONLY = {
    "offsets.topic.num.partitions": "fewer partitions of __consumer_offsets start sooner",
    "transaction.state.log.num.partitions": "the same, for the transaction state log",
    "group.min.session.timeout.ms": "the tests' workers use sessions of a few seconds",
    "broker.session.timeout.ms": "a stopped node is noticed in 4 s, not 9",
    "broker.heartbeat.interval.ms": "with the shorter broker session",
}

CLUSTER_SETTINGS = {
    **SETTINGS,
    "offsets.topic.replication.factor": "3",
    "transaction.state.log.replication.factor": "3",
    "transaction.state.log.min.isr": "2",
    "share.coordinator.state.topic.replication.factor": "3",
    "share.coordinator.state.topic.min.isr": "2",
    "default.replication.factor": "3",
    "min.insync.replicas": "2",
    "broker.session.timeout.ms": "4000",
    "broker.heartbeat.interval.ms": "500",
}

_ACTIVE = re.compile(rb"Becoming the active controller at epoch (\d+)")


class KafkaNode:
    """One node: broker and controller in one JVM, its data kept across restarts."""

    def __init__(self, node_id: int, libs: Path, work: Path, log_path: Path) -> None:
        self.node_id = node_id
        self.libs = libs
        self.work = work
        self.log_path = log_path
        self.config = work / "server.properties"
        self.port = 0
        self.controller_port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def start(self) -> None:
        assert not self.alive, f"node {self.node_id} is running"
        if self._log is None:
            self._log = self.log_path.open("ab")
        self.proc = launch(self.libs, self.work, self.config, self._log, CLUSTER_JVM_OPTS)

    def kill(self) -> None:
        """SIGKILL: no controlled shutdown, no flush."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM: a controlled shutdown (leadership moves first), SIGKILL after ``timeout``."""
        stop_process(self.proc, timeout)

    def close(self) -> None:
        """SIGKILL, at the cluster's end: a controlled shutdown of the last node waits for a
        quorum that left with the others, and the data is deleted anyway."""
        if self.alive:
            self.kill()
        if self._log is not None:
            self._log.close()
            self._log = None

    def active_epoch(self) -> int:
        """The last epoch at which this node became the active controller (0: never)."""
        try:
            found = _ACTIVE.findall(self.log_path.read_bytes())
        except OSError:
            return 0
        return int(found[-1]) if found else 0

    def __repr__(self) -> str:
        return f"KafkaNode({self.node_id}, port={self.port}, pid={self.pid})"


class KafkaCluster:
    """``with KafkaCluster(libs, log_dir) as c: c.bootstrap``: three nodes, ready."""

    def __init__(
        self,
        libs: Path,
        log_dir: Path,
        *,
        host: str = _LOOPBACK,
        size: int = 3,
        ready_timeout: float = 120.0,
    ) -> None:
        self.libs = libs
        self.log_dir = log_dir
        self.host = host
        self.size = size
        self.ready_timeout = ready_timeout
        self.nodes: list[KafkaNode] = []
        self.ready_seconds = 0.0
        self._dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def bootstrap(self) -> str:
        return ",".join(f"{self.host}:{n.port}" for n in self.nodes)

    def node(self, node_id: int) -> KafkaNode:
        return next(n for n in self.nodes if n.node_id == node_id)

    def start(self) -> Self:
        started = time.monotonic()
        self._dir = tempfile.TemporaryDirectory(prefix="meter-kafka-cluster-")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._start_in_tries(Path(self._dir.name), tries=3)
        except BaseException:
            self.stop()
            raise
        self.ready_seconds = time.monotonic() - started
        return self

    def _start_in_tries(self, work: Path, tries: int) -> None:
        for attempt in range(tries):  # a "free" port may be taken before a JVM binds it
            if self._start_once(work / f"try-{attempt}", attempt):
                return
        raise KafkaStartError(f"the cluster did not start in {tries} tries:\n{self._tails()}")

    def _start_once(self, work: Path, attempt: int) -> bool:
        for n in self.nodes:
            n.close()
        stamp = f"{time.strftime('%H%M%S')}-{attempt}"
        self.nodes = []
        for i in range(1, self.size + 1):
            (work / str(i)).mkdir(parents=True)
            self.nodes.append(
                KafkaNode(i, self.libs, work / str(i), self.log_dir / f"kafka-node{i}-{stamp}.log")
            )
        for n in self.nodes:
            n.port, n.controller_port = free_port(self.host), free_port()
        voters = ",".join(f"{n.node_id}@{_LOOPBACK}:{n.controller_port}" for n in self.nodes)
        cluster = cluster_id()
        for n in self.nodes:
            props = {
                **CLUSTER_SETTINGS,
                "node.id": str(n.node_id),
                "listeners": (
                    f"PLAINTEXT://{self.host}:{n.port},CONTROLLER://{_LOOPBACK}:{n.controller_port}"
                ),
                "advertised.listeners": f"PLAINTEXT://{self.host}:{n.port}",
                "controller.quorum.voters": voters,
                "log.dirs": str(n.work / "data"),
            }
            write_config(n.config, props)
            with n.log_path.open("ab") as log:
                format_storage(self.libs, n.work, n.config, cluster, log)
        for n in self.nodes:
            n.start()
        return self._wait_ready(time.monotonic() + self.ready_timeout, probe=True)

    def _wait_ready(self, deadline: float, *, probe: bool) -> bool:
        while time.monotonic() < deadline:
            if any(not n.alive for n in self.nodes):
                return False
            if not all(listening(n.port, self.host) for n in self.nodes):
                time.sleep(0.2)
                continue
            try:
                if probe:
                    asyncio.run(create_probe_topic(self.bootstrap, replicas=self.size))
                if len(asyncio.run(self._brokers())) == self.size:
                    return True
            except Exception:  # noqa: BLE001 - no controller yet, or a broker not registered
                pass
            time.sleep(0.3)
        raise KafkaStartError(
            f"the cluster on {self.bootstrap} not ready within {self.ready_timeout:.0f} s:\n"
            f"{self._tails()}"
        )

    async def _admin(self) -> AIOKafkaAdminClient:
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000)
        await admin.start()
        return admin

    async def _brokers(self) -> list[Any]:
        admin = await self._admin()
        try:
            desc = await admin.describe_cluster()
            return list(desc["brokers"])
        finally:
            await admin.close()

    async def _partitions(self, topics: list[str] | None) -> list[tuple[str, dict[str, Any]]]:
        admin = await self._admin()
        try:
            found = await admin.describe_topics(topics)
        finally:
            await admin.close()
        return [(t["topic"], p) for t in found for p in t["partitions"]]

    def leaders(self, topic: str) -> dict[int, int]:
        """``{partition: leader node id}`` of ``topic`` as the metadata says now."""
        return {p["partition"]: p["leader"] for _, p in asyncio.run(self._partitions([topic]))}

    def coordinator(self, group: str) -> int:
        """The node id of ``group``'s coordinator (where its members heartbeat)."""

        async def find() -> int:
            admin = await self._admin()
            try:
                return await admin.find_coordinator(group)
            finally:
                await admin.close()

        return asyncio.run(find())

    def active_controller(self) -> KafkaNode:
        """The node that became the active controller last (the highest epoch in the logs)."""
        return max(self.nodes, key=lambda n: n.active_epoch())

    def wait_in_sync(self, timeout: float = 90.0) -> float:
        """Wait until every partition of every topic has all its replicas in sync (nothing
        under-replicated: what a rolling restart waits for between nodes); return how long."""
        started = time.monotonic()
        deadline = started + timeout
        lagging: list[str] = ["(not asked yet)"]
        while time.monotonic() < deadline:
            try:
                parts = asyncio.run(self._partitions(None))
            except Exception:  # noqa: BLE001 - a broker on its way up
                time.sleep(0.3)
                continue
            lagging = [
                f"{t}[{p['partition']}] isr {p['isr']} of {p['replicas']}"
                for t, p in parts
                if sorted(p["isr"]) != sorted(p["replicas"]) or p["leader"] < 0
            ]
            if parts and not lagging:
                return time.monotonic() - started
            time.sleep(0.3)
        raise AssertionError(f"partitions still under-replicated after {timeout:.0f} s: {lagging}")

    def restart(self, node: KafkaNode) -> None:
        """Start a stopped or killed node again, on its ports and data; wait until it is back
        in the cluster's metadata and every partition is in sync again."""
        node.start()
        deadline = time.monotonic() + self.ready_timeout
        while not listening(node.port, self.host):
            if not node.alive or time.monotonic() > deadline:
                raise KafkaStartError(f"{node} did not come back:\n{log_tail(node.log_path)}")
            time.sleep(0.2)
        self._wait_ready(deadline, probe=False)
        self.wait_in_sync(max(1.0, deadline - time.monotonic()))

    def _tails(self) -> str:
        return "\n".join(f"--- node {n.node_id}:\n{log_tail(n.log_path)}" for n in self.nodes)

    def stop(self) -> None:
        for n in self.nodes:
            n.close()
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
        return f"KafkaCluster({self.bootstrap}, nodes={self.nodes})"


if __name__ == "__main__":  # python -m tests.integration.cluster: start, time, stop
    from tests.integration.harness import ARTIFACTS
    from tests.integration.kafka import fetch_libs

    with KafkaCluster(fetch_libs(), ARTIFACTS) as c:
        print(f"ready {c.ready_seconds:.2f} s on {c.bootstrap}; active controller", end=" ")
        print(c.active_controller())
        t0 = time.monotonic()
        c.wait_in_sync()
        took = time.monotonic() - t0
        print(f"in sync after {took:.2f} s; leaders {c.leaders('meter-test-ready')}")
