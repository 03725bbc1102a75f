"""The collector process: gRPC ingest, the standard health service, and `/metrics`.

`Collector.serve()` runs it in the foreground (the CLI); `Collector.running()` runs it on a
background thread for in-process use (`thermoscope demo`, the Ray actor, tests). Addresses
default to loopback; port 0 picks a free port, read back from `grpc_port` / `metrics_port`.

Its state belongs to its event loop. Other threads use `attach`, `detach` and `snapshot`,
which run on that loop and return once done.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import math
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, ProcessCollector

from thermoscope.science.derive import Reading
from thermoscope.wire.contract import SERVICE, VERSION, split_address

from .exposition.export import MetricsExporter, metrics_app
from .ingest import keepalive, reaper
from .ingest.server import Telemetry
from .security import Security
from .settings import DEFAULTS, CollectorSettings
from .state.job import Job
from .state.store import EventStore
from .state.stream import Stream
from .web.app import web_app
from .web.recorder import Recorder

log = logging.getLogger("thermoscope.collector")

#: gRPC's own limit, as a multiple of the contract limit (`max_message_bytes`): gRPC refuses a
#: larger message from its length prefix, before buffering it; one between the two is read and
#: refused with our status, and counted.
GRPC_LIMIT_FACTOR = 2
#: How long `attach`, `detach` and `snapshot` wait for the collector's event loop.
LOOP_TIMEOUT = 30.0

T = TypeVar("T")


class ListenError(OSError):
    """The collector cannot listen on an address it was given (taken, or not this machine's)."""


def _cannot_bind(address: str) -> str | None:
    """Why `address` ("host:port") cannot be listened on (taken, not this machine's), or None: a
    socket bound and closed at once, as gRPC's are (SO_REUSEADDR). Any free port (0) can be."""
    host, port = split_address(address)
    if port == 0:
        return None
    try:
        family, kind, proto, _, where = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(where)
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


class Collector:
    """Receives agents' streams, merges them per job and serves Prometheus metrics."""

    def __init__(
        self,
        grpc_address: str | None = None,
        metrics_address: str | None = None,
        *,
        settings: CollectorSettings = DEFAULTS,
        active: bool = True,
        security: Security | None = None,
        on_reading: Callable[[str, Reading], None] | None = None,
        **flat: Any,
    ) -> None:
        """`settings`: what `thermoscope collector`'s flags set (`settings.CollectorSettings`:
        addresses, window, limits, database, intervals); the addresses given first and the flat
        keywords of those flags (`window=`, `db=`, `max_jobs=`, ...) change them
        (`CollectorSettings.with_flat`), so `Collector(grpc, metrics, db=None)` keeps working.
        `active`: False starts with every job paused (`attach(job)` picks the ones to watch);
        `security`: tokens, TLS, basic auth (`security.Security`); `on_reading`: told
        (job_id, reading) at each merged step, on the collector's event loop.

        With a database, `checkpoint_interval` seconds pass between two checkpoints of the jobs'
        state (see `state.checkpoint.Checkpointer`): with agents' spools, a kill -9 of the
        collector loses and double-counts nothing; events and history rows commit at each
        checkpoint. Each refusal of input ends the stream with its gRPC status and is counted in
        `thermoscope_frames_rejected_total{reason}` (see `settings.Limits`); layer (and site)
        series beyond `max_series_per_job` are folded into one `__other__` series, counted in
        `thermoscope_layers_folded{job_id}` (see `exposition.export`)."""
        addresses = {"grpc": grpc_address, "metrics": metrics_address}
        settings = settings.with_flat(**{k: v for k, v in addresses.items() if v is not None}, **flat)
        self.settings = settings
        self.grpc_address, self.metrics_address = settings.grpc, settings.metrics
        # tokens, TLS, basic auth (`security.Security`): exposure checked and files read here, first
        self.security = security or Security()
        self._guard = self.security.load(split_address(settings.grpc)[0], split_address(settings.metrics)[0])
        self.jobs: dict[str, Job] = {}
        self.store = (
            EventStore(settings.db, history_interval=settings.history_interval, retention=settings.retention)
            if settings.db is not None
            else None
        )
        # the web page's recent history of each job, beside the caller's own callback
        self.recorder = Recorder(self.jobs)
        record = self.recorder.record
        if on_reading is not None:
            told = on_reading

            def record(job_id: str, reading: Reading) -> None:
                self.recorder.record(job_id, reading)
                told(job_id, reading)

        self.telemetry = Telemetry(self.jobs, settings, store=self.store, active=active, on_reading=record)
        # process_* metrics (CPU, memory, fds), rendered by prometheus_client; described at
        # registration so that `name[]` collects them only when it names one
        process = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=process)
        self._guard.register_metrics(process)  # basic auth's refusals and hashes, if it guards /metrics
        self.exporter = MetricsExporter(
            self.jobs,
            self.telemetry.rejected,
            VERSION,
            settings.phase_layers,
            max_series=settings.max_series_per_job,
            nonfinite=self.telemetry.nonfinite.counts,
            extra=process,
        )
        self.grpc_port: int | None = None
        self.metrics_port: int | None = None
        self._server: grpc.aio.Server | None = None
        self._health: health.aio.HealthServicer | None = None
        self._http = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._checkpoints: asyncio.Task | None = None
        self._rotation: asyncio.Task | None = None  # watches the security files
        self._reaper: asyncio.Task | None = None  # closes the connections grpc keeps reading (a PING flood's)

    @property
    def metrics_url(self) -> str:
        host, _ = split_address(self.metrics_address)
        return f"{self._guard.metrics_scheme}://{host}:{self.metrics_port}/metrics"

    @property
    def page_url(self) -> str:
        """The web page's address (docs/web.md), on the /metrics port."""
        return self.metrics_url.removesuffix("metrics")

    @property
    def grpc_target(self) -> str:
        host, _ = split_address(self.grpc_address)
        return f"{host}:{self.grpc_port}"

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        server = grpc.aio.server(
            interceptors=self._guard.interceptors(self.telemetry.rejected),
            options=[
                ("grpc.max_receive_message_length", GRPC_LIMIT_FACTOR * self.settings.max_message_bytes),
                ("grpc.so_reuseport", 0),
                *keepalive.server_options(self.settings),  # frozen clients closed, agents' pings allowed
            ],
        )
        server.add_generic_rpc_handlers((self.telemetry.handler(self.settings.max_message_bytes),))
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        taken = _cannot_bind(self.grpc_address)  # before gRPC tries: it logs its own `E...` lines
        if taken is not None:
            raise ListenError(f"cannot listen for gRPC on {self.grpc_address}: {taken}")
        try:
            self.grpc_port = self._guard.add_port(server, self.grpc_address)
        except RuntimeError:  # all gRPC says is "Failed to bind" (the TLS files were checked before)
            self.grpc_port = 0
        if not self.grpc_port:
            raise ListenError(
                f"cannot listen for gRPC on {self.grpc_address}: the port is taken, or the host is "
                "not an address of this machine"
            )
        host, port = split_address(self.metrics_address)
        try:
            self._http, _ = self._guard.start_metrics(
                host, port, web_app(self.jobs, self.recorder, metrics_app(self.exporter))
            )
        except OSError as exc:
            raise ListenError(
                f"cannot listen for /metrics on {self.metrics_address}: {exc.strerror or exc}"
            ) from None
        self.metrics_port = self._http.server_port
        await server.start()
        self._server = server
        self._reaper = asyncio.create_task(reaper.reap(self.grpc_port, self.telemetry.peers_calling))
        if self.store is not None:
            self.telemetry.checkpointer.on_failing = self._set_serving_by_checkpoints
            checkpoints = self.telemetry.checkpointer.every(self.settings.checkpoint_interval)
            self._checkpoints = asyncio.create_task(checkpoints)
        await self._set_serving_by_checkpoints(False)
        if self._guard.rotation.files():
            self._rotation = asyncio.create_task(self._guard.rotation.watch())
        log.info(
            "collector: gRPC on %s, metrics at %s, page at %s",
            self.grpc_target,
            self.metrics_url,
            self.page_url,
        )

    async def _set_serving_by_checkpoints(self, failing: bool) -> None:
        """Health says NOT_SERVING while checkpoints fail (a full disk): frames are then acked but
        not durable, and a load balancer or orchestrator should send agents elsewhere; SERVING
        again once one commits (until the collector shuts down, which keeps NOT_SERVING)."""
        status = health_pb2.HealthCheckResponse
        for name in ("", SERVICE):
            await self._health.set(name, status.NOT_SERVING if failing else status.SERVING)

    async def stop(self, grace: float = 2.0, hold: float = 0.0) -> None:
        """Shut down gracefully: health says NOT_SERVING, open streams are drained (each ends
        with OK once the frames it read are merged and acknowledged; its agent reconnects to a
        successor), then the server stops (calls left after `grace` s are cancelled, still not
        counted as lost ranks), /metrics closes and the database is closed with every row
        committed. `hold`: the least seconds health says NOT_SERVING before the port closes,
        so that health checkers see it."""
        started = time.monotonic()
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        self.telemetry.drain()
        while self.telemetry.open_streams and time.monotonic() - started < grace:
            await asyncio.sleep(0.02)
        await asyncio.sleep(max(0.0, hold - (time.monotonic() - started)))
        if self._server is not None:
            await self._server.stop(max(0.1, grace - (time.monotonic() - started)))
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self._checkpoints is not None:
            self._checkpoints.cancel()
        if self._rotation is not None:
            self._rotation.cancel()
        if self._reaper is not None:
            self._reaper.cancel()
        if self.store is not None:
            await self.telemetry.checkpointer.checkpoint()
            self.store.close()

    async def serve(self, grace: float = 5.0, hold: float = 0.5) -> None:
        """Run until SIGTERM or SIGINT (Ctrl-C), then `stop(grace, hold)`: returns once shut down.
        SIGHUP reloads the security files (`reload`)."""
        await self.start()
        loop = asyncio.get_running_loop()
        signalled = asyncio.Event()
        handled = []
        for sig, handler in (
            (signal.SIGTERM, signalled.set),
            (signal.SIGINT, signalled.set),
            (signal.SIGHUP, self.reload),
        ):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not the main thread
                loop.add_signal_handler(sig, handler)
                handled.append(sig)
        try:
            await signalled.wait()
            log.info("collector: shutting down (draining %d streams)", self.telemetry.open_streams)
        finally:
            for sig in handled:
                loop.remove_signal_handler(sig)
            await self.stop(grace, hold)
        log.info("collector: stopped")

    def reload(self) -> bool:
        """Read the tokens, passwords and TLS files again and use them from now on, all or none:
        False (logged) if one cannot be used, and the previous ones stay (`reload.Rotation`)."""
        return self._guard.rotation.reload()

    # -- from any thread ---------------------------------------------------------------------------

    def attach(self, job: str | None = None, *, token: str | None = None) -> None:
        """Let `job` stream (None: every job, dropping per-job choices); its agents resume at once.
        With a tokens file, `token` must cover the job (PermissionError, logged, otherwise)."""
        self._admit("attach", job, True, token)

    def detach(self, job: str | None = None, *, token: str | None = None) -> None:
        """Pause `job` (None: every job, dropping per-job choices): its agents stop sampling at once.
        With a tokens file, `token` must cover the job (PermissionError, logged, otherwise)."""
        self._admit("detach", job, False, token)

    def _admit(self, action: str, job: str | None, active: bool, token: str | None) -> None:
        """Authorize, log who, then attach or detach: they act on production jobs."""
        try:
            who = self._guard.authorize(action, job, token)
        except PermissionError as exc:
            log.warning("refused: %s", exc)
            raise
        log.info("%s %s, asked by %s", action, f"job {job}" if job is not None else "every job", who)
        self._on_loop(self.telemetry.admit, job, active)

    def checkpoint(self) -> None:
        """Commit every job's state, history rows and events now, instead of at the next
        `checkpoint_interval` (e.g. before reading the database from the same process)."""
        loop = self._loop
        if loop is not None and loop.is_running():
            done = asyncio.run_coroutine_threadsafe(self.telemetry.checkpointer.checkpoint(), loop)
            done.result(LOOP_TIMEOUT)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        """Every known job's state, JSON-able: the collector's view for a CLI or an actor.

        `{job_id: {"active", "agents_connected", "last_step" (-1: none merged), "frames_received",
        "frames_late", "energy", "layer_entropy": {layer: nats}, "ranks": {rank: {"stale",
        "finished", "last_step", "frames", "run_id", "host", "local_rank", "node",
        "world_size"}}}}`; undefined numbers are None. `ranks` holds every rank that ever
        streamed: streaming (neither flag), stale, or finished (its stream ended cleanly); a
        rank's numbers are its last stream's.
        """
        return self._on_loop(self._snapshot)

    def _snapshot(self) -> dict[str, dict[str, Any]]:
        jobs = {}
        for job_id, job in self.jobs.items():
            live = job.liveness()
            ranks = [(rank, (s, stale, False)) for rank, (s, stale) in live.ranks.items()]
            ranks += [(rank, (s, False, True)) for rank, s in live.finished.items()]
            ranks.sort(key=lambda item: item[0])
            reading = job.reading
            entropy = (
                {} if reading is None else dict(zip(reading.layer_names, reading.layer_entropy, strict=True))
            )
            jobs[job_id] = {
                "active": self.telemetry.active(job_id),
                "agents_connected": live.connected,
                "last_step": job.merged_step,
                "frames_received": job.frames_received,
                "frames_late": job.frames_late,
                "energy": None if reading is None else _number(reading.energy),
                "layer_entropy": {name: _number(h) for name, h in entropy.items()},
                "ranks": {rank: _rank(s, stale, finished) for rank, (s, stale, finished) in ranks},
            }
        return jobs

    def _on_loop(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` on the collector's event loop and return its result.

        Before `start` and after the loop stopped nothing else touches the state: it runs here.
        """
        loop = self._loop
        if loop is None or loop.is_closed() or not loop.is_running():
            return fn(*args)
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:  # no loop runs on this thread
            here = None
        if here is loop:
            return fn(*args)
        done: concurrent.futures.Future[T] = concurrent.futures.Future()

        def call() -> None:
            try:
                done.set_result(fn(*args))
            except BaseException as exc:
                done.set_exception(exc)

        loop.call_soon_threadsafe(call)
        return done.result(timeout=LOOP_TIMEOUT)

    @contextlib.contextmanager
    def running(self) -> Iterator[Collector]:
        """Run on a background thread with its own event loop for the duration of the block."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="thermoscope-collector", daemon=True)
        thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self.start(), loop).result(timeout=30)
            yield self
        finally:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self.stop(), loop).result(timeout=30)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)
            loop.close()


def _rank(s: Stream, stale: bool, finished: bool) -> dict[str, Any]:
    return {
        "stale": stale,
        "finished": finished,
        "last_step": s.last_step,
        "frames": s.frames,
        "run_id": s.run_id,
        "host": s.host,
        "local_rank": s.local_rank,
        "node": s.node,
        "world_size": s.world_size,
    }


def _number(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None
