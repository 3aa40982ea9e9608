"""Per-example results: ranked pages, one example's history and image, exports, the score histogram."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Response
from fastapi import Path as PathParam

from app.api.deps import get_store
from app.api.routes.common import ERRORS, INT32, PREFIX, Idx, RunId, read
from app.api.schemas import ExampleDetailOut, ExampleOut, ExamplesPage, LabelIssuesOut
from app.store import NotFound, Store
from app.store.export import FORMATS, table_bytes

router = APIRouter(prefix=PREFIX, responses=ERRORS, tags=["examples"])


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
    total = store.evaluation_size(run_id, at)
    items = [ExampleOut(**vars(r)) for r in rows]
    if by == "loo_mean":  # the rank in the order asked for, not the score's
        for i, it in enumerate(items):
            it.rank = offset + i if order == "most" else total - 1 - offset - i
    return ExamplesPage(step=at, order=order, by=by, offset=offset, limit=limit, total=total, items=items)


@router.get("/runs/{run_id}/examples/{idx}", response_model=list[ExampleOut], dependencies=read)
def example_history(run_id: RunId, idx: Idx, store: Store = Depends(get_store)):
    return [ExampleOut(**vars(r)) for r in store.example_history(run_id, idx)]


@router.get("/runs/{run_id}/examples/{idx}/detail", response_model=ExampleDetailOut, dependencies=read)
def example_detail(run_id: RunId, idx: Idx, store: Store = Depends(get_store)):
    """One training example: labels and class names, source, tabular row, LOO class probabilities, review."""
    d = store.example_detail(run_id, idx)
    image = f"{PREFIX}/runs/{run_id}/examples/{idx}/image" if d.has_image else None
    fields = {k: v for k, v in vars(d).items() if k not in ("has_image", "review")}
    return ExampleDetailOut(**fields, image_url=image, review=None if d.review is None else vars(d.review))


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


@router.get("/runs/{run_id}/evaluations/{step}/examples.{fmt}", dependencies=read, response_class=Response,
            responses={200: {"content": {media: {} for media in FORMATS.values()}}})
def export_examples(run_id: RunId, step: Annotated[str, PathParam(pattern=r"^(\d{1,10}|latest)$",
                                                                  description="a step, or latest")],
                    fmt: Literal["csv", "parquet"], store: Store = Depends(get_store)):
    """The evaluation's per-example table: idx, rank, score, loo_loss, prob_label, loo_loss_mean, loo_loss_evals,
    scored_step, screened, label, flipped."""
    at = store.resolve_step(run_id, None if step == "latest" else int(step))
    name = f"run{run_id}_step{at}_examples.{fmt}"
    return Response(table_bytes(store.examples_table(run_id, at), fmt), media_type=FORMATS[fmt],
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})


@router.get("/runs/{run_id}/pred_probs.{fmt}", dependencies=read, response_class=Response,
            responses={200: {"content": {media: {} for media in FORMATS.values()}}})
def export_pred_probs(run_id: RunId, fmt: Literal["csv", "parquet"], store: Store = Depends(get_store)):
    """Each training example's LOO class probabilities at the run's latest evaluation (idx, label, p_0 … p_K−1):
    out-of-sample predictions from the one run, in the layout of cleanlab's ``pred_probs``
    (docs/integrations/cleanlab.md)."""
    step, cols = store.class_probs_table(run_id)
    name = f"run{run_id}_step{step}_pred_probs.{fmt}"
    return Response(table_bytes(cols, fmt), media_type=FORMATS[fmt],
                    headers={"Content-Disposition": f'attachment; filename="{name}"'})


@router.get("/runs/{run_id}/label_issues", response_model=LabelIssuesOut, dependencies=read,
            responses={501: {"description": "the cleanlab extra is not installed where the API runs"}})
def label_issues(run_id: RunId, step: int | None = Query(None, ge=0, le=INT32, description="answer only once the "
                 "class probabilities reach this evaluation (404 before); default: whatever they reach"),
                 store: Store = Depends(get_store)):
    """How many training labels cleanlab estimates to be wrong, from the run's LOO class probabilities averaged over
    its evaluations (how far the count holds, calibrated and not: docs/label-issues.md)."""
    try:
        from cleanlab.dataset import overall_label_health_score
        from cleanlab.filter import find_label_issues
    except ModuleNotFoundError:
        raise HTTPException(501, "label-issue estimates need cleanlab: pip install 'ivon-diagnostics[cleanlab]'") \
            from None
    latest = store.latest_evaluations([run_id]).get(run_id)
    calibrated = bool(latest and "calibration_scale" in (latest.metrics or {}))
    try:
        at, _, labels, probs, _ = store.class_probs(run_id)
    except NotFound:
        store.get_run(run_id)  # an unknown run is a 404; a run without class probabilities yet is said
        return {"step": None, "examples": 0, "estimated": None, "health": None, "calibrated": calibrated,
                "line": "no class probabilities yet (a classification run stores them at each evaluation)"}
    if step is not None and at < step:
        raise HTTPException(404, f"Not found: run {run_id}'s class probabilities reach step {at}, not {step}")
    keep = labels >= 0
    labels, probs = labels[keep], probs[keep]
    if len(labels) < 2 or len(set(labels.tolist())) < 2 or labels.max() >= probs.shape[1]:
        raise HTTPException(409, f"run {run_id}: cleanlab needs labelled examples of at least two classes within "
                            f"the model's {probs.shape[1]} outputs")
    flagged = int(find_label_issues(labels, probs, n_jobs=1).sum())
    health = float(overall_label_health_score(labels, probs, verbose=False))
    line = (f"cleanlab estimates {flagged:,} label issues among {len(labels):,} examples (label health "
            f"{health:.3f}) from the LOO class probabilities averaged over the evaluations"
            + ("" if calibrated else "; uncalibrated, they are over-confident and the count is low")
            + " (docs/label-issues.md).")
    return {"step": at, "examples": len(labels), "estimated": flagged, "health": health, "calibrated": calibrated,
            "line": line}


@router.get("/runs/{run_id}/histogram", dependencies=read)
def histogram(run_id: RunId, step: int | None = Query(None, ge=0, le=INT32), bins: int = Query(30, ge=1, le=200),
              store: Store = Depends(get_store)):
    """Histogram of the sensitivity scores at a step (default: the latest)."""
    at, counts, edges = store.score_histogram(run_id, step, bins)
    return {"step": at, "counts": counts, "edges": edges}
