"""Path and query types shared by the routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Response
from fastapi import Path as PathParam

from app.api.deps import require_read
from app.api.schemas import ERRORS

PREFIX = "/api/v1"  # each resource's router carries it (nested routers would hide the route template from /metrics)

INT32 = 2**31 - 1  # ids, steps and offsets beyond the database's integers are refused with 422, not a 500
RunId = Annotated[int, PathParam(ge=0, le=INT32)]
Idx = Annotated[int, PathParam(ge=0, le=INT32)]
Step = Annotated[int, PathParam(ge=0, le=INT32)]
read = [Depends(require_read)]


def capped(response: Response, limit: int, cap: int) -> int:
    """The limit a list is served with, said in ``X-Limit`` so that a client sees when it was capped."""
    limit = min(limit, cap)
    response.headers["X-Limit"] = str(limit)
    return limit


def limit_header(cap: int, extra: dict | None = None) -> dict:
    """The OpenAPI description of a capped list's headers."""
    headers = {"X-Limit": {"description": f"the page's size after the cap of {cap}", "schema": {"type": "integer"}}}
    return {200: {"headers": {**headers, **(extra or {})}}}

__all__ = ["ERRORS", "PREFIX", "INT32", "RunId", "Idx", "Step", "read", "capped", "limit_header"]
