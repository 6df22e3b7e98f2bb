"""Composition root: builds every part from Config, starts them in order, stops them in reverse."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import ssl
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from types import TracebackType

import aiohttp
import structlog
from aiohttp import web

from bridge import __version__, sdnotify
from bridge.config import Config
from bridge.control.canary import CanaryResult, ExampleWatch
from bridge.control.lock import RabbitLock
from bridge.control.reconciler import Hooks, Reconciler, targets_from_config
from bridge.dedupe import RecentEvents
from bridge.delivery import Delivery, Replayer
from bridge.errors import BridgeError
from bridge.events import RoutingTable
from bridge.fastpublisher import FastPublisher
from bridge.metrics import Metrics
from bridge.ops import build_ops_app
from bridge.publisher import AmqpPublisher
from bridge.receiver import Receiver, ReceiverHooks
from bridge.spool import SqliteSpool
from bridge.webserver import GuardedAppRunner, GuardedServerRunner

log = structlog.get_logger("bridge.app")

# How often a spool marked unwritable is tried again with a write that changes nothing.
SPOOL_RECHECK_SECONDS = 2.0


class Bridge:
    """The running daemon. `async with Bridge(config) as bridge:` serves until the block ends."""

    def __init__(self, config: Config, *, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics if metrics is not None else Metrics()
        self.routes = RoutingTable(
            {key: tenant.exchanges for key, tenant in config.tenants.items()}
        )
        publisher_class = FastPublisher if config.broker.publisher == "fast" else AmqpPublisher
        self.publisher: FastPublisher | AmqpPublisher = publisher_class(
            config.broker,
            exchanges=sorted(self.routes.all_exchanges(list(config.tenants))),
            on_state_change=self._on_broker_state,
            on_publish=self.metrics.record_publish,
        )
        self.is_draining = False
        self.receiver_port = 0
        self.ops_port = 0
        self._stack = AsyncExitStack()
        # Made in _start(), around the opened spool.
        self._delivery: Delivery | None = None
        self._replayer: Replayer | None = None
        self.watch = ExampleWatch()
        self.reconciler: Reconciler | None = None

    @property
    def delivery(self) -> Delivery:
        assert self._delivery is not None, "the bridge has not started"
        return self._delivery

    def is_ready(self) -> bool:
        """Ready when an event can be accepted now (broker or spool), and not shutting down."""
        return not self.is_draining and self._delivery is not None and self._delivery.can_accept

    def _on_broker_state(self, is_connected: bool) -> None:
        self.metrics.broker_connected.set(1 if is_connected else 0)
        if is_connected and self._replayer is not None:
            self._replayer.wake()

    async def __aenter__(self) -> Bridge:
        log.info("bridge.starting", version=__version__)
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        scheme = "https" if self.config.receiver.tls_cert_file else "http"
        base = f"{scheme}://{self.config.receiver.host}:{self.receiver_port}"
        log.info(
            "bridge.started",
            callback_urls=[f"{base}/one/{tenant}/events" for tenant in self.config.tenants],
            ops_url=f"http://{self.config.ops.host}:{self.ops_port}",
        )
        if not self.config.tenants:
            log.warning("bridge.no_tenants", hint="every callback gets 404; add [tenants.<key>]")
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.is_draining = True
        log.info("bridge.stopping", in_flight=self.delivery.in_flight)
        await self._stack.aclose()
        log.info("bridge.stopped", spooled_events=self.spool.stats().events)

    async def _start(self) -> None:
        config = self.config
        # Ops first and stopped last, so metrics stay scrapeable while draining.
        ops_runner = GuardedAppRunner(
            build_ops_app(metrics=self.metrics, is_ready=self.is_ready), access_log=None
        )
        self.ops_port = await _listen(ops_runner, config.ops.host, config.ops.port, key="ops")
        self._stack.push_async_callback(ops_runner.cleanup)

        # The spool is the promise behind every 200: without it the bridge does not start.
        self.spool: SqliteSpool = await SqliteSpool.open(
            config.spool.dir, max_bytes=config.spool.max_bytes, max_events=config.spool.max_events
        )
        self._stack.push_async_callback(self.spool.close)

        replayer = self._replayer = Replayer(
            self.spool,
            self.publisher,
            publish_timeout_seconds=config.broker.publish_timeout_seconds,
            batch_size=config.spool.replay_batch_size,
            max_attempts=config.spool.max_attempts,
            on_replayed=self.metrics.spool_replayed.inc,
            on_dead_letter=lambda reason: self.metrics.spool_dead_lettered.labels(reason).inc(),
        )
        delivery = self._delivery = Delivery(
            self.publisher,
            self.spool,
            self.routes,
            RecentEvents(
                window_seconds=config.dedupe.window_seconds, max_events=config.dedupe.max_events
            ),
            publish_timeout_seconds=config.broker.publish_timeout_seconds,
            max_in_flight=config.broker.max_in_flight,
            on_spooled=self._on_spooled,
        )
        self.metrics.watch_spool(
            self.spool.stats,
            lambda: delivery.is_spool_writable,
            max_events=config.spool.max_events,
            max_bytes=config.spool.max_bytes,
        )
        self.metrics.broker_blocked.set_function(lambda: 1.0 if self.publisher.is_blocked else 0.0)
        self.metrics.ready.set_function(lambda: 1.0 if self.is_ready() else 0.0)

        # Broker in the background: until it is connected, accepted events are spooled.
        await self.publisher.start()
        self._stack.push_async_callback(self.publisher.close)
        await replayer.start()
        self._stack.push_async_callback(replayer.stop)
        recheck = asyncio.create_task(
            _every(SPOOL_RECHECK_SECONDS, delivery.recheck_spool), name="spool-recheck"
        )
        self._stack.callback(recheck.cancel)

        receiver = config.receiver
        receiver_runner = GuardedServerRunner(
            Receiver(
                delivery=delivery,
                tenants=config.tenants,
                settings=receiver,
                metrics=self.metrics,
                hooks=ReceiverHooks(on_example=self.watch.saw, on_rejected=self.watch.rejected),
            ).server(access_log=None),
            # In-flight handlers get this long to finish once the listener is closed.
            shutdown_timeout=receiver.shutdown_timeout_seconds,
            header_timeout_seconds=receiver.header_timeout_seconds,
            max_connections=receiver.max_connections,
            on_refused=lambda reason: self.metrics.webhook_rejections.labels(reason).inc(),
        )
        self.receiver_port = await _listen(
            receiver_runner,
            receiver.host,
            receiver.port,
            key="receiver",
            ssl_context=_tls_context(config),
        )
        self._stack.push_async_callback(receiver_runner.cleanup)

        # Last, so the platform is only pointed at us once we listen; stopped first.
        if config.control.is_enabled:
            await self._start_control()

    async def _start_control(self) -> None:
        control = self.config.control
        session = aiohttp.ClientSession()
        self._stack.push_async_callback(session.close)
        targets = targets_from_config(
            self.config, session, on_request=self.metrics.record_platform_request
        )
        lock = RabbitLock(
            self.config.broker.url.get_secret_value(),
            control.lock_name,
            on_change=self._on_leadership,
        )
        reconciler = self.reconciler = Reconciler(
            targets,
            self.routes,
            name_prefix=control.name_prefix,
            interval_seconds=control.interval_seconds,
            watch=self.watch,
            canary_interval_seconds=control.canary_interval_seconds,
            canary_timeout_seconds=control.canary_timeout_seconds,
            hooks=MetricsHooks(self.metrics),
            may_write=lambda: lock.is_held,
        )
        await lock.start()
        self._stack.push_async_callback(lock.close)
        await reconciler.start()
        self._stack.push_async_callback(reconciler.stop)

    def _on_leadership(self, is_held: bool) -> None:
        self.metrics.reconciler_leader.set(1 if is_held else 0)
        if is_held and self.reconciler is not None:
            self.reconciler.trigger()

    def _on_spooled(self) -> None:
        self.metrics.spool_appended.inc()
        if self._replayer is not None:
            self._replayer.wake()


class MetricsHooks(Hooks):
    """The reconciler's reports, as metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def run(self, result: str) -> None:
        self._metrics.reconcile_runs.labels(result).inc()
        if result == "success":
            self._metrics.reconcile_last_success.set_to_current_time()

    def action(self, action: str, result: str) -> None:
        self._metrics.reconcile_actions.labels(action, result).inc()

    def canary(self, result: CanaryResult) -> None:
        self._metrics.record_canary(result.event_type, result.is_ok, result.latency_seconds)


async def _every(seconds: float, action: Callable[[], Awaitable[None]]) -> None:
    while True:
        await asyncio.sleep(seconds)
        try:
            await action()
        except Exception:  # task root: log and keep going
            log.exception("background.failed", action=getattr(action, "__name__", repr(action)))


async def _listen(
    runner: web.BaseRunner,
    host: str,
    port: int,
    *,
    key: str,
    ssl_context: ssl.SSLContext | None = None,
) -> int:
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise BridgeError(
            f"cannot listen on {host}:{port} ({exc.strerror}); set {key}.port/{key}.host"
            f" or BRIDGE_{key.upper()}__PORT"
        ) from None
    # With port 0 the kernel picks one; tests read it back from here.
    return int(runner.addresses[-1][1])


def _tls_context(config: Config) -> ssl.SSLContext | None:
    receiver = config.receiver
    if receiver.tls_cert_file is None or receiver.tls_key_file is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(receiver.tls_cert_file, receiver.tls_key_file)
    return context


async def serve(config: Config) -> int:
    """Run until SIGTERM or SIGINT; a second signal stops waiting for in-flight work."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    main_task = asyncio.current_task()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            log.warning("bridge.forced_stop", signal=signal.Signals(signum).name)
            if main_task is not None:
                main_task.cancel()
            return
        log.info("bridge.signal_received", signal=signal.Signals(signum).name)
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    # Pinged from the event loop from here on: a loop stuck anywhere stops the pings.
    watchdog = sdnotify.Watchdog()
    watchdog.start()
    try:
        async with Bridge(config):
            sdnotify.ready()  # the receiver listens: a Type=notify unit is active only now
            await stop.wait()
            sdnotify.stopping()  # the ordered shutdown runs as the block exits
    except asyncio.CancelledError:
        return 1
    finally:
        await watchdog.stop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(signum)
    return 0
