"""Label review: a decision per training example (keep, relabel to a class, drop), what the run's suspects are
reviewed into; the decisions table and the labels of the corrected data set come from here."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app.store.engine import NotFound
from app.store.models import ClassProbs, Example, Review, Run, utcnow

DECISIONS = ("keep", "relabel", "drop")
MAX_NOTE = 2000


@dataclass
class ReviewRow:
    idx: int
    given_label: int | None
    flipped: bool | None
    decision: str
    label: int | None
    note: str | None
    updated_at: datetime
    source: str | None = None


class Reviews:
    """Mixed into ``Store``, whose ``session`` it uses."""

    def session(self, write: bool = False) -> Session:
        raise NotImplementedError

    def set_review(self, run_id: int, idx: int, decision: str, label: int | None = None,
                   note: str | None = None) -> ReviewRow:
        """Record (or replace) the decision on training example ``idx``; ``label`` only with "relabel", a class of
        the run other than the given one. ValueError names what is wrong; nothing is written then."""
        if decision not in DECISIONS:
            raise ValueError(f"decision must be one of {', '.join(DECISIONS)}, not {decision!r}")
        if (label is not None) != (decision == "relabel"):
            raise ValueError("label goes with decision 'relabel' only" if label is not None
                             else "decision 'relabel' needs the new label")
        if note is not None and (len(note) > MAX_NOTE or "\x00" in note):
            raise ValueError(f"note must be at most {MAX_NOTE} characters without NUL")
        with self.session(write=True) as s, s.begin():
            ex = _example(s, run_id, idx)
            if label is not None:
                classes = _classes(s, run_id)
                if not 0 <= label < classes:
                    raise ValueError(f"label {label} is not a class of run {run_id} (0 to {classes - 1})")
                if label == ex.label:
                    raise ValueError(f"example {idx} is labeled {label} already; decide 'keep'")
            row = s.get(Review, (run_id, idx))
            if row is None:
                row = Review(run_id=run_id, idx=idx)
                s.add(row)
            row.decision, row.label, row.note, row.updated_at = decision, label, note, utcnow()
            s.flush()
            return review_row(row, ex)

    def clear_review(self, run_id: int, idx: int) -> None:
        """Back to unreviewed (no error when it was)."""
        with self.session(write=True) as s, s.begin():
            _example(s, run_id, idx)
            s.execute(delete(Review).where(Review.run_id == run_id, Review.idx == idx))

    def reviews(self, run_id: int) -> list[ReviewRow]:
        """The run's decisions, by example index."""
        with self.session() as s:
            if s.get(Run, run_id) is None:
                raise NotFound(f"run {run_id} not found")
            q = (select(Review, Example).join(Example, (Example.run_id == Review.run_id) & (Example.idx == Review.idx))
                 .where(Review.run_id == run_id).order_by(Review.idx))
            return [review_row(r, e) for r, e in s.execute(q).all()]

    def num_classes(self, run_id: int) -> int:
        """The run's number of classes (what a relabel may choose from)."""
        with self.session() as s:
            if s.get(Run, run_id) is None:
                raise NotFound(f"run {run_id} not found")
            return _classes(s, run_id)

    def reviews_table(self, run_id: int) -> dict[str, list]:
        """The decisions as columns: idx, source, given_label, flipped, decision, label (the new one), note (a note
        that a spreadsheet would run as a formula, =, +, -, @ first, is written as text)."""
        rows = self.reviews(run_id)
        cols = {k: [getattr(r, k) for r in rows] for k in ("idx", "source", "given_label", "flipped", "decision",
                                                           "label")}
        cols["note"] = ["'" + r.note if r.note and r.note[0] in "=+-@\t\r" else r.note for r in rows]
        return cols

    def corrected_labels(self, run_id: int) -> tuple[list[int], list[int]]:
        """(kept indices, their labels) of the training examples after the decisions: dropped ones left out,
        relabeled ones with their new label, the rest as given."""
        with self.session() as s:
            if s.get(Run, run_id) is None:
                raise NotFound(f"run {run_id} not found")
            given = dict(s.execute(select(Example.idx, Example.label).where(Example.run_id == run_id)
                                   .order_by(Example.idx)).all())
            for r in s.scalars(select(Review).where(Review.run_id == run_id)):
                if r.decision == "drop":
                    given.pop(r.idx, None)
                elif r.decision == "relabel":
                    given[r.idx] = r.label
        return list(given), list(given.values())


def _example(s: Session, run_id: int, idx: int) -> Example:
    if s.get(Run, run_id) is None:
        raise NotFound(f"run {run_id} not found")
    ex = s.get(Example, (run_id, idx))
    if ex is None:
        raise NotFound(f"example {idx} of run {run_id} not found")
    return ex


def _classes(s: Session, run_id: int) -> int:
    """The run's number of classes: its config's, its class probabilities', or one past its largest label."""
    run = s.get(Run, run_id)
    data = (run.config or {}).get("data") if isinstance(run.config, dict) else None
    if isinstance(data, dict) and isinstance(data.get("num_classes"), int):
        return data["num_classes"]
    stored = s.scalar(select(ClassProbs.classes).where(ClassProbs.run_id == run_id).limit(1))
    largest = s.scalar(select(func.max(func.coalesce(Example.original_label, Example.label)))
                       .where(Example.run_id == run_id))
    labels = s.scalar(select(func.max(Example.label)).where(Example.run_id == run_id))
    return max(stored or 0, (largest or 0) + 1, (labels or 0) + 1)


def review_row(r: Review, ex: Example) -> ReviewRow:
    return ReviewRow(r.idx, ex.label, ex.flipped, r.decision, r.label, r.note, r.updated_at, ex.source)
