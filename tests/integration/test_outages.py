"""The broker unreachable at start, or for a while: log, retry, never crash, lose nothing.

Each test starts a broker of its own, of the kind its ``broker`` parameter names (the
shared one is left alone): the embedded broker, or an Apache Kafka node that
``tests/integration/kafka.py`` starts on the port the test chose."""

from __future__ import annotations

import time

import pytest

from meter.kafka import KafkaSettings
from meter.sim.fleet import generate
from tests.integration.conftest import BrokerHandle
from tests.integration.harness import (
    Names,
    WorkerProcess,
    expected_usage,
    own_broker,
    read_all,
    revision_faults,
    send,
    wait_for_usage,
)
from tests.integration.kafka import KafkaBroker
from tests.integration.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.integration, pytest.mark.brokers("tansu", "kafka")]


def test_broker_unreachable_at_start(broker: BrokerHandle, unique: str) -> None:
    port = TcpProxy.reserve_port()
    names = Names(unique)
    worker = WorkerProcess(f"127.0.0.1:{port}", names, "early")
    try:
        time.sleep(6)  # nothing listens yet
        assert worker.proc.poll() is None, worker.log()
        log = worker.log()
        retries = log.count("not usable yet")
        # Clear lines, backing off rather than spinning: 0.5 + 1 + 2 + 4 s.
        assert 2 <= retries <= 6, log
        assert f"broker 127.0.0.1:{port} not usable yet" in log
        assert "Traceback" not in log
        with own_broker(broker, unique, port=port) as late:
            settings = KafkaSettings(bootstrap=late.bootstrap)
            lines = list(generate(3000, seed=31, tenants=20, workloads=10))
            send(settings, names.jobs, lines)
            wait_for_usage(settings, names.usage, expected_usage(lines), workers=[worker])
            assert worker.terminate() == 0, worker.log()
    finally:
        worker.close()


def test_broker_unreachable_for_a_while(broker: BrokerHandle, unique: str) -> None:
    proxy_port, port = TcpProxy.reserve_port(), TcpProxy.reserve_port()
    names = Names(unique)
    lines = list(generate(8000, seed=41, tenants=30, workloads=15))
    with (
        TcpProxy(port, listen_port=proxy_port) as proxy,  # connects to the broker on demand
        own_broker(broker, unique, port=port, advertised_port=proxy_port) as behind,
    ):
        settings = KafkaSettings(bootstrap=behind.bootstrap)
        worker = WorkerProcess(behind.bootstrap, names, "outage")
        try:
            worker.wait_for_log("took home partitions")
            send(settings, names.jobs, lines[:4000])
            wait_for_usage(settings, names.usage, expected_usage(lines[:4000]), workers=[worker])
            proxy.pause()
            time.sleep(8)
            assert worker.proc.poll() is None, worker.log()
            proxy.resume()
            send(settings, names.jobs, lines[4000:])
            wait_for_usage(settings, names.usage, expected_usage(lines), workers=[worker])
            assert worker.terminate() == 0, worker.log()
        finally:
            worker.close()
    assert proxy.connections_dropped >= 1


def test_stops_promptly_when_the_broker_is_gone(broker: BrokerHandle, unique: str) -> None:
    """The broker crashes (SIGKILL) under a running worker; SIGTERM must still stop the worker
    quickly."""
    names = Names(unique)
    gone = own_broker(broker, unique).start()
    worker = WorkerProcess(gone.bootstrap, names, "orphan")
    try:
        worker.wait_for_log("took home partitions")
        settings = KafkaSettings(bootstrap=gone.bootstrap)
        send(settings, names.jobs, list(generate(500, seed=51, tenants=5, workloads=5)))
        time.sleep(1)
        gone.kill()
        time.sleep(2)
        started = time.monotonic()
        code = worker.terminate(timeout=40)
        took = time.monotonic() - started
        assert code == 0, worker.log()
        assert took < 20, f"took {took:.1f}s to stop\n{worker.log()}"
    finally:
        worker.close()
        gone.stop()


@pytest.mark.brokers("kafka")  # the embedded broker keeps nothing across a restart: test_faults
def test_a_broker_crash_and_restart_with_its_data_loses_nothing(
    broker: BrokerHandle, unique: str, is_tansu: bool
) -> None:
    """Apache Kafka SIGKILLed under a running worker and started again on its data (a crash,
    then the node back): the worker rides it out, sees no data lost, and the report equals
    `meter rate` over every event; over the whole usage topic no revision goes down."""
    if is_tansu:
        pytest.skip("the embedded broker keeps nothing across a restart (METER_TEST_BROKERS)")
    names = Names(unique)
    lines = list(generate(8000, seed=43, tenants=30, workloads=15))
    with own_broker(broker, unique) as kafka:
        assert isinstance(kafka, KafkaBroker)
        settings = KafkaSettings(bootstrap=kafka.bootstrap)
        worker = WorkerProcess(kafka.bootstrap, names, "crash")
        try:
            worker.wait_for_log("took home partitions")
            send(settings, names.jobs, lines[:4000])
            wait_for_usage(settings, names.usage, expected_usage(lines[:4000]), workers=[worker])
            kafka.kill()
            kafka.restart()
            send(settings, names.jobs, lines[4000:])
            wait_for_usage(settings, names.usage, expected_usage(lines), workers=[worker])
            assert revision_faults(read_all(settings, names.usage)) == []
            assert worker.health()[0] == 200
            log = worker.log()
            assert "lost data" not in log and "Traceback" not in log, log
            assert worker.terminate() == 0, worker.log()
        finally:
            worker.close()
