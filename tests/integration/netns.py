"""A network namespace joined to the host by a veth pair, for cutting one process off.

``with NetNs() as ns``: the namespace ``meter-<pid>`` holds ``ns.inside`` (its end of the pair);
the host end holds ``ns.host``.  A process started with ``ns.wrap`` (``ip netns exec ...``) reaches
the host only through the pair, so servers it must reach listen on ``ns.host``.  ``cut()`` takes
the host end down: the namespace keeps its address and route, and what it sends is dropped
without an answer, as in a real partition (no refused connection, no "network unreachable");
the host keeps reaching ``ns.host`` (a local address).  ``restore()`` brings it up again.

Needs root (``ip netns add``) and iproute2; :func:`unavailable` says why it cannot be made.
Leaving deletes the namespace, and with it the pair, also after a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from types import TracebackType
from typing import Self


def _ip(*args: str, netns: str | None = None) -> None:
    cmd = ["ip", *(("-n", netns) if netns else ()), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=20)
    if done.returncode != 0:
        raise OSError(f"{' '.join(cmd)}: {done.stderr.strip() or done.returncode}")


def unavailable() -> str | None:
    """Why a namespace cannot be made here, or None."""
    if shutil.which("ip") is None:
        return "iproute2 is not installed (apt-get install iproute2)"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    return None


class NetNs:
    """One namespace and its veth pair on a /30 of 10.231.0.0/16 chosen by the process id."""

    def __init__(self, tag: str | None = None) -> None:
        tag = tag or str(os.getpid())
        self.name = f"meter-{tag}"
        self._host_if, self._ns_if = f"mh{tag}"[:15], f"mn{tag}"[:15]
        block = os.getpid() % 16_000 * 4  # 16,000 /30 blocks in 10.231.0.0/16
        self.host = f"10.231.{block // 256}.{block % 256 + 1}"
        self.inside = f"10.231.{block // 256}.{block % 256 + 2}"
        self.wrap = ["ip", "netns", "exec", self.name]

    def __enter__(self) -> Self:
        self.close()  # what a killed run of this process id left behind
        try:
            _ip("netns", "add", self.name)
            _ip("link", "add", self._host_if, "type", "veth", "peer", "name", self._ns_if)
            _ip("link", "set", self._ns_if, "netns", self.name)
            _ip("addr", "add", f"{self.host}/30", "dev", self._host_if)
            _ip("link", "set", self._host_if, "up")
            _ip("addr", "add", f"{self.inside}/30", "dev", self._ns_if, netns=self.name)
            _ip("link", "set", self._ns_if, "up", netns=self.name)
            _ip("link", "set", "lo", "up", netns=self.name)
        except BaseException:
            self.close()
            raise
        return self

    def cut(self) -> None:
        _ip("link", "set", self._host_if, "down")

    def restore(self) -> None:
        _ip("link", "set", self._host_if, "up")

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)
        subprocess.run(["ip", "link", "del", self._host_if], capture_output=True, check=False)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
