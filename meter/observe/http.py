"""The HTTP side of a worker: ``/metrics`` always; the status page with ``meter run``,
``meter demo`` and ``meter worker --status-page``.

- ``GET /metrics``: Prometheus exposition from the registry passed in.
- ``GET /healthz``: 200 when the worker owns its partitions and makes progress; 503
  with a one-line reason otherwise (recovering, fenced, halted, connecting).  Its
  ``month_close`` says ``ok`` or why closes are held (the clock check); a held close
  never makes the worker unready: usage still counts.
- ``GET /``: the live status page (when a usage view is given).
- ``GET /api/usage?month=YYYY-MM[&tenant=T]``: the same document as
  ``meter report --format json``, plus ``months`` (every month seen), ``month``, the
  month's ``status`` (``running``, ``final`` or ``final+corrections``), ``closed_at`` for
  a closed month, and ``license`` when the view has a license source. A month that is
  not ``YYYY-MM`` (01..12, year 0001..9999) is a 400 with ``{"error": "..."}``; no month
  (or an empty one) means this UTC month if it has usage, else the newest that has.
  Every month answer has ``summary`` (tenants, workloads, points, per workload type,
  over every row; ``corrected_summary`` beside ``corrected_usage``); ``&top=N`` keeps the
  rows of the N tenants with the most points (the status page asks for these).
  ``&tenant=T`` is answered from an index (milliseconds at any number of tenants);
  ``&limit=N[&offset=K]`` pages the rows (``total_rows``, ``next_offset``; N up to
  10,000).  A month's whole document is made in a thread once per change and shared by
  concurrent callers, so no client stalls the worker on the same event loop.

The worker serves all of this from a thread of its own (:class:`HttpThread`): its own
event loop accepts connections, parses requests and writes answers, so no client delays
the worker's polling, heartbeats or commits, and a worker busy with a batch still answers
``/healthz``.  What reads the worker's state (the ``/metrics`` walk of its ledgers, the
usage view) runs on the worker's loop and is awaited from the HTTP thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import importlib.resources
import logging
import resource
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from meter.domain.month import parse_month
from meter.observe.snapshot import Coalesced
from meter.observe.usage_view import MonthAnswer, UsageView, top_tenants

log = logging.getLogger(__name__)

T = TypeVar("T")


def build_app(
    registry: CollectorRegistry,
    view: UsageView | None = None,
    health: Callable[[], tuple[bool, str]] = lambda: (True, "ok"),
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    exposition: Callable[[], Coroutine[Any, Any, bytes]] | None = None,
    metrics_max_age: float = 1.0,
    close_held: Callable[[], str] | None = None,
    loop_lag: Callable[[float], None] | None = None,
    worker_loop: asyncio.AbstractEventLoop | None = None,
    cpu_share: CpuShare | None = None,
    metrics_stale_ok: Callable[[], bool] = lambda: False,
) -> web.Application:
    """``now``: the worker's clock (``--clock``), which decides the default month.
    ``exposition``: builds the scrape body without stalling the event loop (the worker's
    ledgers walked in slices); concurrent scrapes share one build, and a body is served
    again for ``metrics_max_age`` seconds.  ``close_held``: why month closes are held
    ("" when they are not), shown by /healthz as ``month_close`` without changing
    readiness (usage still counts).  ``worker_loop``: the worker's event loop when the app
    is served from another (:class:`HttpThread`): the exposition, the usage view and the
    loop-lag timer run there; ``health`` and ``close_held`` are read from the HTTP
    thread, so a busy worker still answers ``/healthz``.  ``cpu_share``: the CPU time
    answers may take (everything but ``/healthz`` waits its turn under it), so clients
    in a loop cannot take the worker's interpreter from it.  ``metrics_stale_ok``: a big
    worker's scrape is answered with the last body while the next is built
    (:class:`~meter.observe.snapshot.Coalesced`)."""
    middlewares: list[Middleware] = [] if cpu_share is None else [cpu_share.middleware]
    app = web.Application(middlewares=middlewares)

    async def on_worker(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
        """``make()`` awaited on the worker's loop (here when it is this one)."""
        if worker_loop is None or worker_loop is asyncio.get_running_loop():
            return await make()
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(make(), worker_loop))

    if loop_lag is not None:
        observe = loop_lag

        async def start_lag(app: web.Application) -> None:
            coro = measure_loop_lag(observe)
            if worker_loop is None:
                app[LAG_TASK] = asyncio.ensure_future(coro)
            else:
                app[LAG_TASK] = asyncio.run_coroutine_threadsafe(coro, worker_loop)

        async def stop_lag(app: web.Application) -> None:
            app[LAG_TASK].cancel()

        app.on_startup.append(start_lag)
        app.on_cleanup.append(stop_lag)

    async def build() -> bytes:
        if exposition is None:
            return generate_latest(registry)
        return await on_worker(exposition)

    body_cache = Coalesced(build, metrics_max_age, stale_ok=metrics_stale_ok)

    async def metrics(_: web.Request) -> web.Response:
        body = await body_cache.get()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    def health_doc() -> dict[str, object]:
        ok, reason = health()
        body: dict[str, object] = {"ready": ok, "reason": reason}
        if close_held is not None:
            body["month_close"] = close_held() or "ok"
        return body

    async def healthz(_: web.Request) -> web.Response:
        try:
            body = health_doc()
        except RuntimeError:
            # The worker changed what health() was reading (a rebalance mid-read, from
            # this thread): read it again on the worker's own loop.
            async def again() -> dict[str, object]:
                return health_doc()

            body = await on_worker(again)
        return web.json_response(body, status=200 if body["ready"] else 503)

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    if view is not None:
        page = importlib.resources.files("meter.observe").joinpath("status.html").read_bytes()

        async def index(_: web.Request) -> web.Response:
            return web.Response(body=page, content_type="text/html", charset="utf-8")

        async def api_usage(request: web.Request) -> web.Response:
            asked = request.query.get("month")
            try:
                chosen = parse_month(asked) if asked else None
                page = paging(request.query)
                top = top_count(request.query)
            except ValueError as exc:
                return web.json_response({"error": str(exc)}, status=400)
            tenant = request.query.get("tenant") or None

            async def read() -> tuple[str, list[str], MonthAnswer, Any]:
                # On the worker's loop: the view is tailed and indexed there.
                months = view.months()
                month = chosen or default_month(months, now())
                answer = await view.month_answer(month, tenant)
                lic = view.license_doc(month) if view.license_doc is not None else None
                return month, months, answer, lic

            month, months, answer, lic = await on_worker(read)
            doc, body = answer.doc, answer.body
            extra: dict[str, Any] = {"month": month, "months": months}
            if lic is not None:
                extra["license"] = lic
            if top is not None:
                doc, body = top_tenants(answer, top), None
            if page is not None:
                doc, body = paged(doc, *page), None
            if body is None:
                return web.json_response({**doc, **extra}, dumps=_dumps)
            # A big document serialized once, off the loop: the few keys of this answer
            # are added to its JSON object, not the whole document serialized again.
            tail = orjson.dumps(extra)
            return web.Response(body=body[:-1] + b"," + tail[1:], content_type="application/json")

        app.router.add_get("/", index)
        app.router.add_get("/api/usage", api_usage)
    return app


#: The largest page of ``/api/usage`` rows.
MAX_PAGE = 10_000


def paging(query: Mapping[str, str]) -> tuple[int, int] | None:
    """``(offset, limit)`` from ``?offset=&limit=``; ``None``: every row (no ``limit``)."""
    if "limit" not in query and "offset" not in query:
        return None
    values = []
    for name, default in (("offset", "0"), ("limit", str(MAX_PAGE))):
        text = query.get(name, default)
        if not text.isdigit() or len(text) > 9:
            raise ValueError(f"{name} {text!r}: expected a whole number")
        values.append(int(text))
    offset, limit = values
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit {limit}: expected 1..{MAX_PAGE}")
    return offset, limit


def top_count(query: Mapping[str, str]) -> int | None:
    """``?top=N``: the N tenants with the most points (1..``MAX_PAGE``); ``None``: all."""
    text = query.get("top")
    if text is None:
        return None
    if not text.isdigit() or not 1 <= int(text[:9]) <= MAX_PAGE:
        raise ValueError(f"top {text!r}: expected a whole number 1..{MAX_PAGE}")
    return int(text)


def paged(doc: dict[str, Any], offset: int, limit: int) -> dict[str, Any]:
    """One page of a month document's ``usage`` rows (tenant, then type order), with
    ``total_rows`` and ``next_offset`` (``null`` on the last page); everything else,
    corrections included, as in the whole document."""
    rows = doc.get("usage", [])
    out = {**doc, "usage": rows[offset : offset + limit], "total_rows": len(rows)}
    out["next_offset"] = offset + limit if offset + limit < len(rows) else None
    return out


def _dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


LAG_TASK: web.AppKey[asyncio.Future[None] | concurrent.futures.Future[None]] = web.AppKey(
    "loop_lag_task"
)
#: How often the event loop's lag is measured.
LAG_EVERY = 0.1


async def measure_loop_lag(observe: Callable[[float], None]) -> None:
    """Forever: how much later than asked a :data:`LAG_EVERY` timer fires."""
    loop = asyncio.get_running_loop()
    while True:
        asked = loop.time() + LAG_EVERY
        await asyncio.sleep(LAG_EVERY)
        observe(max(0.0, loop.time() - asked))


def default_month(months: list[str], now: datetime) -> str:
    """The UTC month of ``now`` if it has usage, else the newest month that has."""
    this = utc_month(now)
    return this if this in months or not months else months[0]


def utc_month(now: datetime) -> str:
    """``YYYY-MM`` of an aware time, in UTC."""
    t = now.astimezone(UTC)
    return f"{t.year:04d}-{t.month:02d}"


#: Seconds a connection may sit with no request (before its first, or between two):
#: then it is closed (aiohttp's default is an hour).
IDLE_SECONDS = 10.0


def connection_limit() -> int:
    """Connections served at once: at most 256, and at most a quarter of this process's
    file descriptor limit, so the rest stay for Kafka, the state files and the logs."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 256
    return max(8, min(256, soft // 4))


class ConnectionGuard:
    """A protocol factory around aiohttp's that keeps at most ``limit`` connections: when
    a new one comes at the limit, the connection silent the longest with no request in
    progress is closed for it (an idle flood cannot lock out ``/healthz`` or a scrape); with none
    idle, the new one is closed (counted, logged through the repeat filter).  Never
    more, so the file descriptors Kafka needs stay free."""

    def __init__(self, factory: Callable[[], asyncio.Protocol], limit: int) -> None:
        self.factory = factory
        self.limit = limit
        #: admitted connections, least recently active first: protocol -> its transport
        self.conns: dict[_Guarded, asyncio.BaseTransport] = {}
        self.refused = 0
        self.evicted = 0

    @property
    def open(self) -> int:
        return len(self.conns)

    def _evict_idle(self) -> bool:
        for proto, transport in self.conns.items():
            if not proto._request_in_progress:
                self.evicted += 1
                del self.conns[proto]
                transport.close()
                return True
        return False

    def __call__(self) -> asyncio.Protocol:
        return _Guarded(self, self.factory())


class _Guarded(asyncio.Protocol):
    """One connection through a :class:`ConnectionGuard`: aiohttp's protocol, admitted
    or not (it has ``__slots__``, so it is wrapped rather than patched)."""

    def __init__(self, guard: ConnectionGuard, inner: asyncio.Protocol) -> None:
        self.guard = guard
        self.inner = inner
        self.admitted = False

    @property
    def _request_in_progress(self) -> bool:
        return bool(getattr(self.inner, "_request_in_progress", False))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        g = self.guard
        if len(g.conns) >= g.limit and not g._evict_idle():
            g.refused += 1
            log.warning(
                "HTTP: %d connections open, all busy, the most served at once; refusing more",
                len(g.conns),
            )
            transport.close()
            return
        self.admitted = True
        g.conns[self] = transport
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        conns = self.guard.conns
        transport = conns.pop(self, None)
        if transport is not None:
            conns[self] = transport  # the most recently active: evicted last
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.admitted else None

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.conns.pop(self, None)
        if self.admitted:
            self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class GuardedSite(web.TCPSite):
    """A TCP site whose connections pass through a :class:`ConnectionGuard`."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, limit: int) -> None:
        super().__init__(runner, host, port)
        self.limit = limit
        self.guard: ConnectionGuard | None = None

    async def start(self) -> None:
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        self.guard = ConnectionGuard(server, self.limit)
        self._server = await asyncio.get_running_loop().create_server(
            self.guard, self._host, self._port, backlog=self._backlog,
            reuse_address=self._reuse_address,
        )  # fmt: skip


async def serve(
    app: web.Application, host: str, port: int, limit: int | None = None
) -> tuple[web.AppRunner, int]:
    """Start serving; returns the runner (``await runner.cleanup()`` to stop) and the port.
    At most ``limit`` connections at once (default :func:`connection_limit`); a
    connection idle for :data:`IDLE_SECONDS` is closed."""
    runner = web.AppRunner(app, access_log=None, keepalive_timeout=IDLE_SECONDS)
    await runner.setup()
    site = GuardedSite(runner, host, port, connection_limit() if limit is None else limit)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    server = site._server
    assert server is not None
    actual = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    return runner, int(actual)


#: The share of one core the HTTP thread may use for answers other than ``/healthz``.
HTTP_CPU_SHARE = 0.1


class CpuShare:
    """A budget of the HTTP thread's own CPU time (``time.thread_time``): ``share`` of
    the time that passes, ``burst`` seconds of it held at most.  A request waits for
    its turn while the thread has used more than its share, so clients asking in a loop
    get slower answers instead of the worker getting less of the interpreter (one GIL);
    ``/healthz`` never waits."""

    def __init__(
        self,
        share: float = HTTP_CPU_SHARE,
        burst: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
        cpu: Callable[[], float] = time.thread_time,
    ) -> None:
        self.share = share
        self.burst = burst
        self._clock = clock
        self._cpu = cpu
        self._credit = burst
        self._at: float | None = None
        self._used = 0.0
        self._gate: asyncio.Lock | None = None
        #: seconds requests waited for their turn (for tests and the bench)
        self.waited = 0.0

    def _settle(self) -> float:
        now, used = self._clock(), self._cpu()
        if self._at is not None:
            earned = (now - self._at) * self.share - (used - self._used)
            self._credit = min(self.burst, self._credit + earned)
        self._at, self._used = now, used
        return self._credit

    async def turn(self) -> None:
        """Return when the thread is within its share (at once, mostly)."""
        if self._settle() >= 0:
            return
        if self._gate is None:
            self._gate = asyncio.Lock()
        async with self._gate:  # one waiter at a time: the next settles after it ran
            while (credit := self._settle()) < 0:
                pause = -credit / self.share
                self.waited += pause
                await asyncio.sleep(pause)

    @web.middleware
    async def middleware(
        self,
        request: web.Request,
        handler: Handler,
    ) -> web.StreamResponse:
        if request.path != "/healthz":
            await self.turn()
        return await handler(request)


class HttpThread:
    """An app served from a thread of its own, with its own event loop: what a client
    does (a flood of connections, a slow reader, ten scrapes at once) costs that loop,
    never the worker's, whose polling, heartbeats and commits go on.  ``await start()``
    returns the port; ``await cleanup()`` stops serving and ends the thread (the same
    call as an :class:`aiohttp.web.AppRunner`'s)."""

    def __init__(self, app: web.Application, host: str, port: int, limit: int | None = None):
        self._serve = lambda: serve(app, host, port, limit)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    async def start(self) -> int:
        caller = asyncio.get_running_loop()
        started: asyncio.Future[int] = caller.create_future()

        def settle(outcome: int | BaseException) -> None:
            if started.done():
                return
            if isinstance(outcome, BaseException):
                started.set_exception(outcome)
            else:
                started.set_result(outcome)

        def run() -> None:
            loop = self._loop = asyncio.new_event_loop()
            try:
                self._runner, port = loop.run_until_complete(self._serve())
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                loop.close()
                caller.call_soon_threadsafe(settle, exc)
                return
            caller.call_soon_threadsafe(settle, port)
            try:
                loop.run_forever()
            finally:
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.close()

        self._thread = threading.Thread(target=run, name="meter-http", daemon=True)
        self._thread.start()
        return await started

    async def cleanup(self) -> None:
        loop, runner, thread = self._loop, self._runner, self._thread
        if loop is None or runner is None or thread is None or loop.is_closed():
            return
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(runner.cleanup(), loop))
        loop.call_soon_threadsafe(loop.stop)
        await asyncio.to_thread(thread.join, 10)
