"""Runs: list, create (queue a job), get, stop, the final model, the early-stopping state."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse

from app.api.deps import get_store, require_write
from app.api.routes.common import ERRORS, INT32, PREFIX, RunId, capped, limit_header, read
from app.api.schemas import CalibrationOut, EarlyStopOut, RunCreate, RunOut, RunPatch
from app.store import Store
from app.store.calibration import calibration_summary

router = APIRouter(prefix=PREFIX, responses=ERRORS, tags=["runs"])


@router.get("/runs", response_model=list[RunOut], dependencies=read, responses=limit_header(1000, {
    "X-Total-Count": {"description": "runs matching the filters", "schema": {"type": "integer"}}}))
def list_runs(
    response: Response,
    status: Literal["queued", "running", "done", "failed", "cancelled"] | None = None,
    limit: int = Query(100, ge=1, le=INT32, description="capped at 1000"),
    offset: int = Query(0, ge=0, le=INT32),
    tag: str | None = Query(None, pattern=r"^[A-Za-z0-9_.:-]{1,50}$", description="runs carrying this tag"),
    q: str | None = Query(None, max_length=200, pattern=r"^[^\x00]*$", description="runs whose name contains this"),
    store: Store = Depends(get_store),
):
    """Newest first, a page at a time; the headers say how many runs match and the page's capped size."""
    limit = capped(response, limit, 1000)
    response.headers["X-Total-Count"] = str(store.count_runs(status=status, tag=tag, name=q))
    return store.list_runs(status=status, limit=limit, offset=offset, tag=tag, name=q)


@router.post("/runs", response_model=RunOut, status_code=201, dependencies=[Depends(require_write)])
def create_run(body: RunCreate, store: Store = Depends(get_store)):
    """Validate a job config and queue it for a worker."""
    return store.create_run(body.config.name, body.config.model_dump(mode="json"))


@router.get("/runs/{run_id}", response_model=RunOut, dependencies=read)
def get_run(run_id: RunId, store: Store = Depends(get_store)):
    return store.get_run(run_id)


@router.get("/runs/{run_id}/calibration", response_model=CalibrationOut, dependencies=read)
def get_calibration(run_id: RunId, step: int | None = Query(None, ge=0, le=INT32, description="the evaluation at "
                    "this step (default: the latest)"), store: Store = Depends(get_store)):
    """What the run's LOO level is calibrated on at an evaluation: held-out examples, the scale on σ², the drift of
    a frozen scale (docs/calibration.md)."""
    run = store.get_run(run_id)
    if step is None:
        ev = store.latest_evaluations([run_id]).get(run_id)
    else:
        found = store.evaluations(run_id, since_step=step - 1, limit=1)
        ev = found[0] if found and found[0].step == step else None
        if ev is None:
            raise HTTPException(404, f"Not found: run {run_id} has no evaluation at step {step}")
    return {"step": ev.step if ev else None, **calibration_summary(run.config, ev.metrics if ev else None)}


@router.patch("/runs/{run_id}", response_model=RunOut, dependencies=[Depends(require_write)])
def update_run(run_id: RunId, body: RunPatch, store: Store = Depends(get_store)):
    """Rename a run, replace its tags or its notes (fields left out stay as they are)."""
    return store.update_run(run_id, body.name, body.tags, body.notes)


@router.delete("/runs/{run_id}", status_code=204, dependencies=[Depends(require_write)])
def delete_run(run_id: RunId, store: Store = Depends(get_store)):
    """Delete a run that is not running and everything stored for it; the workers remove its checkpoint folder
    (resume state, final model, kept evaluations) from their disks when next idle."""
    store.delete_run(run_id)
    return Response(status_code=204)


@router.post("/runs/{run_id}/stop", response_model=RunOut, dependencies=[Depends(require_write)])
def stop_run(run_id: RunId, store: Store = Depends(get_store)):
    store.request_stop(run_id)
    return store.get_run(run_id)


@router.get("/runs/{run_id}/model", dependencies=read, response_class=FileResponse,
            responses={200: {"content": {"application/octet-stream": {}}}, 404: {"description": "no final model"}})
def final_model(run_id: RunId, request: Request, store: Store = Depends(get_store)):
    """The run's final weights (a ``torch.save`` of ``{"model": state_dict, "step": step}``; load it with
    ``torch.load(path, weights_only=True)``), kept when the run ends; 404 before that."""
    run = store.get_run(run_id)
    path = Path(request.app.state.settings.checkpoint_dir) / run.uid / "model.pt"
    if not path.is_file():
        raise HTTPException(404, f"run {run_id} has no final model (status {run.status})")
    return FileResponse(path, media_type="application/octet-stream", filename=f"run{run_id}_model.pt")


@router.get("/runs/{run_id}/early-stopping", response_model=EarlyStopOut | None, dependencies=read)
def early_stopping(run_id: RunId, store: Store = Depends(get_store)):
    store.get_run(run_id)
    return store.early_stop(run_id)
