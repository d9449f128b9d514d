"""A loopback TCP proxy whose traffic a test can cut and restore.

It runs its own asyncio loop in a daemon thread, so it works from sync tests and from
tests that run their own ``asyncio.run`` loop.  Start Tansu with
``EmbeddedBroker(advertised_port=proxy.port)`` so that *all* client traffic (bootstrap
and the connections made to the advertised address) flows through the proxy.

``pause()`` aborts every open connection and, until ``resume()``, either resets new
connections immediately (``mode="reset"``, like a dead broker) or accepts them and never
forwards a byte (``mode="blackhole"``, like a network partition: clients hang until their
request timeout).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
from collections.abc import Callable
from typing import Any, Literal, Self

from tests.loopback import LoopbackServer

log = logging.getLogger(__name__)

PauseMode = Literal["reset", "blackhole"]


class TcpProxy(LoopbackServer):
    def __init__(
        self,
        target_port: int,
        *,
        target_host: str = "127.0.0.1",
        listen_port: int = 0,
        listen_host: str = "127.0.0.1",
    ) -> None:
        super().__init__(listen_port=listen_port, listen_host=listen_host)
        self.target_host = target_host
        self.target_port = target_port
        self._blackholed: set[asyncio.StreamWriter] = set()
        self._paused: PauseMode | None = None
        self.connections_accepted = 0
        self.connections_dropped = 0

    def _thread_name(self) -> str:
        return f"tcp-proxy-{self.target_port}"

    def start(self) -> Self:
        super().start()
        log.debug("proxy %d -> %s:%d started", self.port, self.target_host, self.target_port)
        return self

    def pause(self, mode: PauseMode = "reset") -> None:
        """Drop all open connections; reset (or blackhole) new ones until resume()."""
        self._call(self._pause, mode)

    def resume(self) -> None:
        self._call(self._resume)

    @property
    def paused(self) -> bool:
        return self._paused is not None

    # ------------------------------------------------------------------ internals
    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None:
            raise RuntimeError("proxy not started")

        async def wrapper() -> None:
            fn(*args)

        asyncio.run_coroutine_threadsafe(wrapper(), loop).result(10)

    def _pause(self, mode: PauseMode) -> None:
        self._paused = mode
        for writer in list(self._writers):
            self._abort(writer)
        log.debug("proxy %d paused (%s)", self.port, mode)

    def _resume(self) -> None:
        self._paused = None
        for writer in list(self._blackholed):  # make hung clients reconnect promptly
            self._abort(writer)
        log.debug("proxy %d resumed", self.port)

    def _abort(self, writer: asyncio.StreamWriter) -> None:
        self._writers.discard(writer)
        self._blackholed.discard(writer)
        sock = writer.get_extra_info("socket")
        if sock is not None:  # RST instead of FIN, like a dead peer host
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()
        self.connections_dropped += 1

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_accepted += 1
        if self._paused == "reset":
            self._abort(writer)
            return
        if self._paused == "blackhole":
            self._writers.add(writer)
            self._blackholed.add(writer)
            return  # keep the socket open (until resume/pause/stop aborts it), forward nothing
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            self._abort(writer)
            return
        if self._paused:  # paused while we were connecting
            self._abort(writer)
            up_writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        await asyncio.gather(
            self._pipe(reader, up_writer, writer), self._pipe(up_reader, writer, up_writer)
        )

    async def _pipe(
        self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, src_writer: asyncio.StreamWriter
    ) -> None:
        try:
            while data := await src.read(65536):
                if self._paused:
                    break
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            for w in (dst, src_writer):
                if w in self._writers:
                    self._abort(w)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            self._abort(writer)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
