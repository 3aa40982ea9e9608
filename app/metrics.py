"""Prometheus metrics: request latency (middleware), and store gauges read at scrape time.

Under ``ivon-diag serve --workers N`` the server processes share their latency histograms through files in
``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode, which the serve command sets up), so a scrape
answered by any process reports them all."""

from __future__ import annotations

import os
import time

from fastapi import Depends, FastAPI, Response
from prometheus_client import CollectorRegistry, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from app.api.deps import require_read
from app.store import Store


class StoreCollector:
    """Jobs by state, evaluations written, seconds since each running job's last heartbeat."""

    def __init__(self, store: Store):
        self.store = store

    def collect(self):
        jobs = GaugeMetricFamily("ivon_diag_jobs", "jobs by state", labels=["state"])
        for state, n in self.store.jobs_by_state().items():
            jobs.add_metric([state], n)
        yield jobs
        yield GaugeMetricFamily("ivon_diag_evaluations_written", "evaluations in the store",
                                value=self.store.count_evaluations())
        beats = GaugeMetricFamily("ivon_diag_worker_heartbeat_age_seconds", "seconds since a running job's heartbeat",
                                  labels=["worker", "job"])
        for job_id, worker, age in self.store.heartbeat_ages():
            beats.add_metric([worker or "", str(job_id)], age)
        yield beats


class Timing:
    """Request latency by method, route template and status (pure ASGI: no per-request task or body copy)."""

    def __init__(self, app, latency: Histogram):
        self.app, self.latency = app, latency

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t, status = time.perf_counter(), [500]

        async def timed(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, timed)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.latency.labels(scope["method"], route, str(status[0])).observe(time.perf_counter() - t)


def install(app: FastAPI, store: Store) -> None:
    """Add the latency middleware (outermost: call it after every other ``add_middleware``) and /metrics."""
    registry = CollectorRegistry()
    latency = Histogram("ivon_diag_request_seconds", "request latency", ["method", "route", "status"],
                        registry=registry)
    registry.register(StoreCollector(store))

    app.add_middleware(Timing, latency=latency)

    @app.get("/metrics", include_in_schema=False, dependencies=[Depends(require_read)])
    def metrics():
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # every server process's histograms, from their files
            shared = CollectorRegistry()
            multiprocess.MultiProcessCollector(shared)
            shared.register(StoreCollector(store))
            return Response(generate_latest(shared), media_type=CONTENT_TYPE_LATEST)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
