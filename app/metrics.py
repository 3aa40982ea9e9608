"""Prometheus metrics: request latency (middleware), and store gauges read at scrape time."""

from __future__ import annotations

import time

from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

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


def install(app: FastAPI, store: Store) -> None:
    registry = CollectorRegistry()
    latency = Histogram("ivon_diag_request_seconds", "request latency", ["method", "route", "status"],
                        registry=registry)
    registry.register(StoreCollector(store))

    @app.middleware("http")
    async def timing(request: Request, call_next):
        t = time.perf_counter()
        response = await call_next(request)
        route = request.scope.get("route")
        latency.labels(request.method, getattr(route, "path", "unmatched"), str(response.status_code)).observe(
            time.perf_counter() - t)
        return response

    @app.get("/metrics", include_in_schema=False)
    def metrics():
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
