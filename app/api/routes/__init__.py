"""The REST API under /api/v1, one module per resource; it reads the store (and writes jobs, stop requests and
hooks), and never trains or imports torch."""

from app.api.routes import curves, examples, hooks, influence, live, reviews, runs
from app.api.routes.common import INT32, RunId

ROUTERS = [m.router for m in (runs, curves, examples, reviews, influence, hooks, live)]

__all__ = ["ROUTERS", "INT32", "RunId"]
