"""A run's metric series (downsampled curves) and its evaluations."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Query, Response
from fastapi import Path as PathParam

from app.api.deps import get_store
from app.api.routes.common import ERRORS, INT32, PREFIX, RunId, capped, limit_header, read
from app.api.schemas import Curve, EvaluationOut, Point
from app.store import Store
from app.store.job_config import MONITORS

router = APIRouter(prefix=PREFIX, responses=ERRORS, tags=["curves"])


@router.get("/runs/{run_id}/metrics", response_model=list[str], dependencies=read)
def metric_names(run_id: RunId, store: Store = Depends(get_store)):
    """The names of the run's stored metric series (each a ``/metrics/{name}`` curve)."""
    store.get_run(run_id)
    return store.metric_names(run_id)


@router.get("/runs/{run_id}/metrics/{name}", response_model=Curve, dependencies=read)
def curve(
    run_id: RunId,
    name: Annotated[str, PathParam(pattern=r"^[A-Za-z0-9_.:\-]{1,100}$")],
    since_step: int | None = Query(None, ge=-1, le=INT32),
    max_points: int = Query(2000, ge=4, le=INT32, description="capped at 10000"),
    store: Store = Depends(get_store),
):
    store.get_run(run_id)
    if name not in MONITORS and name not in (names := store.metric_names(run_id)):  # a typo: say what exists
        raise HTTPException(404, f"run {run_id} has no metric {name!r} (it has: {', '.join(names) or 'none yet'})")
    return Curve(
        name=name, points=[Point(step=s, value=v) for s, v in store.curve(run_id, name, since_step, max_points)]
    )


@router.get("/runs/{run_id}/evaluations", response_model=list[EvaluationOut], dependencies=read,
            responses=limit_header(10000))
def evaluations(
    response: Response,
    run_id: RunId,
    since_step: int | None = Query(None, ge=-1, le=INT32),
    limit: int = Query(1000, ge=1, le=INT32, description="capped at 10000"),
    store: Store = Depends(get_store),
):
    return store.evaluations(run_id, since_step, capped(response, limit, 10000))
