"""Label review: a decision per training example (keep, relabel, drop), set with a write token, listed and exported
as a table; the corrected data set itself is written by the CLI (``ivon-diag export RUN --corrected``), which reads
the run's data as the job did."""

from __future__ import annotations

from collections import Counter
from typing import Literal

from fastapi import APIRouter, Depends, HTTPException, Response

from app.api.deps import get_store, require_write
from app.api.routes.common import ERRORS, PREFIX, Idx, RunId, read
from app.api.schemas import ReviewIn, ReviewOut, ReviewsPage
from app.store import Store
from app.store.export import FORMATS, table_bytes

router = APIRouter(prefix=PREFIX, responses=ERRORS, tags=["review"])


@router.put("/runs/{run_id}/examples/{idx}/review", response_model=ReviewOut,
            dependencies=[Depends(require_write)])
def set_review(run_id: RunId, idx: Idx, body: ReviewIn, store: Store = Depends(get_store)):
    """Keep, relabel (to `label`, a class of the run other than the given one) or drop a training example; a
    second call replaces the first. 409 when the label does not fit the run (not one of its classes, or the one
    the example has)."""
    try:
        return store.set_review(run_id, idx, body.decision, body.label, body.note)
    except ValueError as err:  # what the schema cannot know: the run's classes, the example's label
        raise HTTPException(409, str(err)) from None


@router.delete("/runs/{run_id}/examples/{idx}/review", status_code=204, dependencies=[Depends(require_write)])
def clear_review(run_id: RunId, idx: Idx, store: Store = Depends(get_store)):
    """Back to unreviewed."""
    store.clear_review(run_id, idx)
    return Response(status_code=204)


@router.get("/runs/{run_id}/reviews", response_model=ReviewsPage, dependencies=read)
def list_reviews(run_id: RunId, store: Store = Depends(get_store)):
    """Every decision of the run, by example index, with how many there are of each."""
    rows = store.reviews(run_id)
    counts = Counter(r.decision for r in rows)
    return {"total": len(rows), "counts": {d: counts.get(d, 0) for d in ("keep", "relabel", "drop")},
            "items": rows}


@router.get("/runs/{run_id}/reviews.{fmt}", dependencies=read, response_class=Response,
            responses={200: {"content": {media: {} for media in FORMATS.values()}}})
def export_reviews(run_id: RunId, fmt: Literal["csv", "parquet"], store: Store = Depends(get_store)):
    """The decisions as a table: idx, given_label, flipped, decision, label (the new one), note."""
    return Response(table_bytes(store.reviews_table(run_id), fmt), media_type=FORMATS[fmt],
                    headers={"Content-Disposition": f'attachment; filename="run{run_id}_reviews.{fmt}"'})

