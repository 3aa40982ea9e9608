"""Path and query types shared by the routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from fastapi import Path as PathParam

from app.api.deps import require_read
from app.api.schemas import ERRORS

PREFIX = "/api/v1"  # each resource's router carries it (nested routers would hide the route template from /metrics)

INT32 = 2**31 - 1  # ids, steps and offsets beyond the database's integers are refused with 422, not a 500
RunId = Annotated[int, PathParam(ge=0, le=INT32)]
Idx = Annotated[int, PathParam(ge=0, le=INT32)]
Step = Annotated[int, PathParam(ge=0, le=INT32)]
read = [Depends(require_read)]

__all__ = ["ERRORS", "PREFIX", "INT32", "RunId", "Idx", "Step", "read"]
