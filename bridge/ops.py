"""Ops listener on its own port: /healthz, /readyz and /metrics."""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bridge.metrics import Metrics

READINESS: web.AppKey[Callable[[], bool]] = web.AppKey("readiness")
OPS_METRICS = web.AppKey("ops_metrics", Metrics)


def build_ops_app(*, metrics: Metrics, is_ready: Callable[[], bool]) -> web.Application:
    app = web.Application()
    app[READINESS] = is_ready
    app[OPS_METRICS] = metrics
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_endpoint)
    return app


async def healthz(request: web.Request) -> web.Response:
    # Answering at all proves the event loop turns; nothing else belongs in liveness.
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    ready = request.app[READINESS]()
    return web.json_response(
        {"status": "ready" if ready else "not ready"}, status=200 if ready else 503
    )


async def metrics_endpoint(request: web.Request) -> web.Response:
    payload = generate_latest(request.app[OPS_METRICS].registry)
    return web.Response(body=payload, headers={"Content-Type": CONTENT_TYPE_LATEST})
