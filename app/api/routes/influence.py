"""Influence queries: which training examples made a finished run's predictions on its test examples. A query is
answered by a worker (the API never loads a model): submit, then read it until it is done."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi import Path as PathParam

from app.api.deps import get_store, require_write
from app.api.routes.common import ERRORS, INT32, PREFIX, RunId, read
from app.api.schemas import InfluenceCreate, InfluenceOut
from app.store import Store

router = APIRouter(prefix=PREFIX, responses=ERRORS, tags=["influence"])


@router.post("/runs/{run_id}/influence", response_model=InfluenceOut, status_code=202,
             dependencies=[Depends(require_write)])
def submit(run_id: RunId, body: InfluenceCreate, store: Store = Depends(get_store)):
    """Queue an influence query; a worker answers it from the run's final weights and posterior, or from an
    evaluation's kept ones with ``step`` (``ivon-diag worker``), once the run has ended; then ``GET /influence/{id}``
    holds the rows (or why there are none: a step not kept says which are)."""
    return store.submit_influence(run_id, body.test, body.k, body.predicted, body.step)


@router.get("/influence/{query_id}", response_model=InfluenceOut, dependencies=read)
def get(query_id: Annotated[int, PathParam(ge=0, le=INT32)], store: Store = Depends(get_store)):
    """One query: pending, running, done (with its rows) or failed (with the reason)."""
    return store.get_influence(query_id)


@router.get("/runs/{run_id}/influence", response_model=list[InfluenceOut], dependencies=read)
def list_queries(run_id: RunId, limit: int = Query(100, ge=1, le=1000), store: Store = Depends(get_store)):
    """The run's queries, newest first."""
    return store.list_influence(run_id, limit)
