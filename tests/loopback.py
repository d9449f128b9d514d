"""A loopback TCP server on its own asyncio loop in a daemon thread, for tests.

It works from sync tests and from tests that run their own ``asyncio.run`` loop.
Subclasses (``tests.integration.tcp_proxy.TcpProxy``, ``tests.kafka.sasl_front.SaslFront``)
say what a connection does (``_handle``) and how they shut down (``_shutdown``).
"""

from __future__ import annotations

import asyncio
import socket
import threading
from types import TracebackType
from typing import Self


def reserve_port(host: str = "127.0.0.1") -> int:
    """A port free right now (for a server that must be told its port before it starts)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class LoopbackServer:
    reserve_port = staticmethod(reserve_port)

    def __init__(self, *, listen_port: int = 0, listen_host: str = "127.0.0.1") -> None:
        self.listen_host = listen_host
        self._requested_port = listen_port
        self.port = listen_port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def _thread_name(self) -> str:
        return type(self).__name__

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def _shutdown(self) -> None:
        raise NotImplementedError

    def start(self) -> Self:
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(
                    asyncio.start_server(
                        self._handle, self.listen_host, self._requested_port, reuse_address=True
                    )
                )
                self.port = self._server.sockets[0].getsockname()[1]
            except OSError as exc:
                errors.append(exc)
                ready.set()
                loop.close()
                return
            ready.set()
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(self._shutdown())
                loop.close()

        self._thread = threading.Thread(target=run, name=self._thread_name(), daemon=True)
        self._thread.start()
        ready.wait(10)
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop = None
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
