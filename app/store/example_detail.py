"""What the store knows of one training example: its labels and class names, where it comes from, its row as read,
its LOO class probabilities and the review's decision; the example page and the API's example route read it here."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sqlalchemy import select

from app.store.class_probs import ClassProbabilities
from app.store.engine import NotFound
from app.store.models import Example, Review, Run
from app.store.reviews import ReviewRow, review_row


@dataclass
class ExampleDetail:
    idx: int
    label: int | None
    label_name: str | None
    flipped: bool | None
    original_label: int | None
    source: str | None
    has_image: bool
    features: dict[str, float] | None  # a tabular row as read, by column name
    probs: list[float] | None  # LOO class probabilities averaged over probs_evals evaluations up to probs_step
    probs_step: int | None
    probs_evals: int | None
    predicted: int | None
    predicted_name: str | None
    review: ReviewRow | None


class ExampleDetails(ClassProbabilities):
    """Mixed into ``Store``, whose ``session`` it uses."""

    def has_images(self, run_id: int) -> bool | None:
        """Whether the run's examples have thumbnails (image data), so that pages ask for them only then; None
        before the worker has stored its examples."""
        with self.session() as s:
            first = s.execute(select(Example.thumbnail.is_not(None)).where(Example.run_id == run_id).limit(1)).first()
        return None if first is None else bool(first[0])

    def get_example(self, run_id: int, idx: int) -> Example:
        with self.session() as s:
            ex = s.get(Example, (run_id, idx))
            if ex is None:
                raise NotFound(f"example {idx} of run {run_id} not found")
            return ex

    def example_detail(self, run_id: int, idx: int) -> ExampleDetail:
        with self.session() as s:
            run = s.get(Run, run_id)
            if run is None:
                raise NotFound(f"run {run_id} not found")
            ex = s.get(Example, (run_id, idx))
            if ex is None:
                raise NotFound(f"example {idx} of run {run_id} not found")
            review = s.get(Review, (run_id, idx))
            names, columns = run.class_names or [], run.feature_names
            features = dict(zip(columns, ex.features)) if ex.features and columns else None
            detail = ExampleDetail(
                ex.idx, ex.label, _name(names, ex.label), ex.flipped, ex.original_label, ex.source,
                ex.thumbnail is not None, features, None, None, None, None, None,
                None if review is None else review_row(review, ex))
        try:
            step, ids, _, table, evals = self.class_probs(run_id)
        except NotFound:  # before the run's first evaluation, or not a classification run
            return detail
        at = int(np.searchsorted(ids, idx))
        if at < len(ids) and ids[at] == idx:
            detail.probs, detail.probs_step, detail.probs_evals = table[at].tolist(), step, int(evals[at])
            detail.predicted = int(table[at].argmax())
            detail.predicted_name = _name(names, detail.predicted)
        return detail


def _name(names: list, k: int | None) -> str | None:
    return str(names[k]) if k is not None and 0 <= k < len(names) else None
