"""The broker unreachable at start, or for a while: log, retry, never crash, lose nothing."""

from __future__ import annotations

import time

import pytest

from meter.broker import EmbeddedBroker
from meter.kafka import KafkaSettings
from meter.sim.fleet import generate
from tests.integration.harness import Names, WorkerProcess, expected_usage, send, wait_for_usage
from tests.integration.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration


def test_broker_unreachable_at_start(unique: str) -> None:
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
        with EmbeddedBroker(port) as broker:
            settings = KafkaSettings(bootstrap=broker.bootstrap)
            lines = list(generate(3000, seed=31, tenants=20, workloads=10))
            send(settings, names.jobs, lines)
            wait_for_usage(settings, names.usage, expected_usage(lines), workers=[worker])
            assert worker.terminate() == 0, worker.log()
    finally:
        worker.close()


def test_broker_unreachable_for_a_while(unique: str) -> None:
    proxy_port = TcpProxy.reserve_port()
    names = Names(unique)
    lines = list(generate(8000, seed=41, tenants=30, workloads=15))
    with (
        EmbeddedBroker(advertised_port=proxy_port) as broker,
        TcpProxy(broker.port, listen_port=proxy_port) as proxy,
    ):
        settings = KafkaSettings(bootstrap=broker.bootstrap)
        worker = WorkerProcess(broker.bootstrap, names, "outage")
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


def test_stops_promptly_when_the_broker_is_gone(unique: str) -> None:
    """A broker restart loses everything; SIGTERM must still stop the worker quickly."""
    names = Names(unique)
    broker = EmbeddedBroker().start()
    worker = WorkerProcess(broker.bootstrap, names, "orphan")
    try:
        worker.wait_for_log("took home partitions")
        settings = KafkaSettings(bootstrap=broker.bootstrap)
        send(settings, names.jobs, list(generate(500, seed=51, tenants=5, workloads=5)))
        time.sleep(1)
        broker.kill()
        time.sleep(2)
        started = time.monotonic()
        code = worker.terminate(timeout=40)
        took = time.monotonic() - started
        assert code == 0, worker.log()
        assert took < 20, f"took {took:.1f}s to stop\n{worker.log()}"
    finally:
        worker.close()
        broker.stop()
