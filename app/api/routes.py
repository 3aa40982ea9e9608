"""REST API under /api/v1: runs, curves, evaluations, examples, early stopping. Reads only the store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse

from app.api.deps import get_store, require_read, require_write
from app.api.schemas import (
    ERRORS,
    Curve,
    EarlyStopOut,
    EvaluationOut,
    ExampleOut,
    ExamplesPage,
    HookCreate,
    HookOut,
    Point,
    RunCreate,
    RunOut,
)
from app.store import Store
from app.store.job_config import MONITORS
from app.store.urls import check_webhook_url

router = APIRouter(prefix="/api/v1", responses=ERRORS)
INT32 = 2**31 - 1  # ids, steps and offsets beyond the database's integers are refused with 422, not a 500
RunId = Annotated[int, PathParam(ge=0, le=INT32)]
Idx = Annotated[int, PathParam(ge=0, le=INT32)]
Step = Annotated[int, PathParam(ge=0, le=INT32)]
read = [Depends(require_read)]


@router.get("/runs", response_model=list[RunOut], dependencies=read)
def list_runs(
    status: Literal["queued", "running", "done", "failed", "cancelled"] | None = None,
    limit: int = Query(100, ge=1, le=INT32, description="capped at 1000"),
    offset: int = Query(0, ge=0, le=INT32),
    store: Store = Depends(get_store),
):
    return store.list_runs(status=status, limit=min(limit, 1000), offset=offset)


@router.post("/runs", response_model=RunOut, status_code=201, dependencies=[Depends(require_write)])
def create_run(body: RunCreate, store: Store = Depends(get_store)):
    """Validate a job config and queue it for a worker."""
    return store.create_run(body.config.name, body.config.model_dump(mode="json"))


@router.get("/runs/{run_id}", response_model=RunOut, dependencies=read)
def get_run(run_id: RunId, store: Store = Depends(get_store)):
    return store.get_run(run_id)


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


@router.get("/runs/{run_id}/evaluations", response_model=list[EvaluationOut], dependencies=read)
def evaluations(
    run_id: RunId,
    since_step: int | None = Query(None, ge=-1, le=INT32),
    limit: int = Query(1000, ge=1, le=INT32, description="capped at 10000"),
    store: Store = Depends(get_store),
):
    return store.evaluations(run_id, since_step, min(limit, 10000))


@router.get("/runs/{run_id}/examples", response_model=ExamplesPage, dependencies=read)
def examples(
    run_id: RunId,
    order: Literal["most", "least"] = "most",
    by: Literal["score", "loo_mean"] = Query("score", description="rank by the sensitivity at the step, or by the "
                                             "LOO loss averaged over the evaluations up to it (likely mislabeled)"),
    step: int | None = Query(None, ge=0, le=INT32),
    limit: int = Query(50, ge=1, le=INT32, description="capped at 1000"),
    offset: int = Query(0, ge=0, le=INT32),
    store: Store = Depends(get_store),
):
    limit = min(limit, 1000)
    at, rows = store.examples_at(run_id, step, limit, offset, least=order == "least", by=by)
    return ExamplesPage(step=at, order=order, by=by, offset=offset, limit=limit,
                        items=[ExampleOut(**vars(r)) for r in rows])


@router.get("/runs/{run_id}/examples/{idx}", response_model=list[ExampleOut], dependencies=read)
def example_history(run_id: RunId, idx: Idx, store: Store = Depends(get_store)):
    return [ExampleOut(**vars(r)) for r in store.example_history(run_id, idx)]


@router.get(
    "/runs/{run_id}/examples/{idx}/image",
    dependencies=read,
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}},
)
def example_image(run_id: RunId, idx: Idx, store: Store = Depends(get_store)):
    ex = store.get_example(run_id, idx)
    if ex.thumbnail is None:
        raise HTTPException(404, f"example {idx} of run {run_id} has no image")
    return Response(ex.thumbnail, media_type="image/png", headers={"Cache-Control": "max-age=86400"})


@router.get("/runs/{run_id}/early-stopping", response_model=EarlyStopOut | None, dependencies=read)
def early_stopping(run_id: RunId, store: Store = Depends(get_store)):
    store.get_run(run_id)
    return store.early_stop(run_id)


@router.post("/hooks", response_model=HookOut, status_code=201, dependencies=[Depends(require_write)],
             response_model_exclude_none=True)
def create_hook(body: HookCreate, store: Store = Depends(get_store)):
    """Register a webhook; its HMAC secret is returned in this response only."""
    try:
        check_webhook_url(body.url)
    except ValueError as err:  # the same shape as every other 422
        raise RequestValidationError([{"loc": ("body", "url"), "msg": str(err), "type": "value_error"}]) from None
    if body.run_id is not None:
        store.get_run(body.run_id)
    hook = store.add_hook(body.url, body.events, run_id=body.run_id)
    return _hook_out(hook, hook.secret)


@router.get("/hooks", response_model=list[HookOut], dependencies=[Depends(require_write)],
            response_model_exclude_none=True)
def list_hooks(run_id: int | None = Query(None, ge=0, le=INT32), store: Store = Depends(get_store)):
    return [_hook_out(h) for h in store.hooks_for(run_id)]


def _hook_out(hook, secret: str | None = None) -> HookOut:
    fields = {"id": hook.id, "url": hook.url, "events": hook.events, "run_id": hook.run_id, "secret": secret}
    return HookOut(**{k: v for k, v in fields.items() if v is not None})


@router.delete("/hooks/{hook_id}", status_code=204, dependencies=[Depends(require_write)])
def delete_hook(hook_id: Annotated[int, PathParam(ge=0, le=INT32)], store: Store = Depends(get_store)):
    store.delete_hook(hook_id)
    return Response(status_code=204)


@router.get("/runs/{run_id}/evaluations/{step}/examples.{fmt}", dependencies=read, response_class=Response,
            responses={200: {"content": {"text/csv": {}, "application/vnd.apache.parquet": {}}}})
def export_examples(run_id: RunId, step: Step, fmt: Literal["csv", "parquet"], store: Store = Depends(get_store)):
    """The evaluation's per-example table: idx, rank, score, loo_loss, prob_label, loo_loss_mean, loo_loss_evals,
    label, flipped."""
    cols = store.examples_table(run_id, step)
    name = f"run{run_id}_step{step}_examples.{fmt}"
    headers = {"Content-Disposition": f'attachment; filename="{name}"'}
    if fmt == "csv":
        import csv
        import io

        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(cols)
        w.writerows(zip(*cols.values()))
        return Response(buf.getvalue(), media_type="text/csv", headers=headers)
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(pa.table(cols), sink)
    return Response(sink.getvalue(), media_type="application/vnd.apache.parquet", headers=headers)
