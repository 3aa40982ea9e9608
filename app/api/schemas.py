"""Response and request models of the REST API."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from app.store.job_config import Int, JobConfig


def _utc(value: datetime | None) -> datetime | None:
    """The store keeps UTC; SQLite hands it back naive. Always sent with its zone (ISO 8601, ``Z``)."""
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


UTCDatetime = Annotated[datetime, AfterValidator(_utc)]


class ErrorOut(BaseModel):
    detail: str


# The error answers every route may give, documented once (a 422 is FastAPI's validation list everywhere).
ERRORS = {400: {"model": ErrorOut, "description": "a body that is not JSON"},
          401: {"model": ErrorOut, "description": "no token where one is required"},
          403: {"model": ErrorOut, "description": "a wrong or revoked token"},
          404: {"model": ErrorOut, "description": "an unknown run, step, example or hook"},
          409: {"model": ErrorOut, "description": "not now: the run is running"},
          413: {"model": ErrorOut, "description": "a body over IVON_DIAG_MAX_BODY_BYTES"},
          503: {"model": ErrorOut, "description": "the database is unavailable or refuses writes"}}


class RunOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    uid: str = Field(description="unique across databases; names the run's checkpoint folder")
    name: str
    status: str
    config: dict
    created_at: UTCDatetime
    started_at: UTCDatetime | None
    finished_at: UTCDatetime | None
    error: str | None
    stop_requested: bool
    class_names: list[str] | None = Field(None, description="label k's name, where the data names its classes "
                                          "(CSV class names, image folders)")
    tags: list[str] | None = None
    notes: str | None = None


class RunPatch(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str | None = Field(None, min_length=1, max_length=200, pattern=r"^[^\x00]*[^\x00\s][^\x00]*$")
    tags: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.:-]{1,50}$")]] | None = Field(
        None, max_length=20, description="replaces the run's tags")
    notes: str | None = Field(None, max_length=10_000, pattern=r"^[^\x00]*$")


class RunCreate(BaseModel):
    config: JobConfig = Field(description="a job config (see the README); validated before the job is queued")


class CalibrationOut(BaseModel):
    step: int | None = Field(description="the evaluation it describes (the latest); None before the first")
    source: Literal["split", "test", "none", "fixed"] = Field(
        description="split: training examples held out of training; test: the test split; fixed: a given scale")
    mode: Literal["refit", "frozen", "frozen_variance", "fixed"]
    calibrated: bool
    examples: int | None = Field(description="held-out examples the scale was fitted on")
    heldout_nll: float | None
    heldout_nll_se: float | None
    scale: float | None = Field(description="the scale on σ² the LOO is read at")
    fit: float | None = Field(description="the scale that would match the held-out NLL now")
    fitted_step: int | None = Field(description="frozen modes: the last step the scale was fitted at")
    drift: float | None = Field(description="fit / scale: how far the frozen scale is from matching now")
    warning: bool = Field(description="drift beyond ±25%, a held-out NLL too uncertain, or a fit that could not "
                          "reach the held-out NLL: the line says which")
    reached: bool | None = Field(None, description="whether a scale made the LOO equal the held-out NLL at this "
                                 "evaluation (None: uncalibrated, a fixed scale, or a run from before this was "
                                 "recorded)")
    loo_raw: float | None = Field(description="the LOO at σ² as trained (uncalibrated)")
    line: str = Field(description="the calibration in one sentence, as the run page shows it")


class LabelIssuesOut(BaseModel):
    step: int | None = Field(description="the latest evaluation the averaged class probabilities reach")
    examples: int = Field(description="training examples with class probabilities (scored at least once)")
    estimated: int | None = Field(description="examples cleanlab's find_label_issues flags on the LOO class "
                                  "probabilities averaged over the evaluations; None before there are any")
    health: float | None = Field(description="cleanlab's overall label health score (1 − the estimated share "
                                 "mislabeled)")
    calibrated: bool = Field(description="whether the probabilities were read at a calibrated scale; uncalibrated "
                             "they are over-confident and the count is low (docs/label-issues.md)")
    line: str


class Point(BaseModel):
    step: int
    value: float | None


class Curve(BaseModel):
    name: str
    points: list[Point]


# What the shown numbers are, and where their validation lives. Figures belong to docs/validation.md (generated by
# `ivon-diag validate`), never to this file.
HESS_INIT_SCALE = ("an uncalibrated LOO's level follows IVON's hess_init (docs/validation.md): levels of runs that "
                   "differ in it are not comparable")
LOO_VALIDITY = (
    "LOO estimate of the generalization NLL, (1/N) Σ ℓ(y_i, f_i + Δ_i), from the run's posterior, read at the scale "
    "on σ² that matches held-out data (the run's calibration line says on which examples, and whether a frozen scale "
    "still holds); uncalibrated, its level follows IVON's hess_init and the run's length (how far each holds: "
    "docs/calibration.md, docs/validation.md)"
)
SCORE_VALIDITY = "sensitivity ‖Δ_i‖₁ (its ranking against retraining: docs/validation.md)"
LOO_MEAN_VALIDITY = (
    "this example's LOO loss averaged over the run's evaluations up to this step (those that included it, finite "
    "losses only): it ranks mislabeled examples after training has memorized them, where the final loss no longer "
    "does (against flipped labels and cleanlab: docs/validation.md)"
)

INFLUENCE_VALIDITY = (
    "the test example's predicted loss without each training example, minus with it (to first order in the change "
    "of its outputs), from the run's weights and posterior (the final ones, or a kept evaluation's); how far it "
    "follows retraining, per covariance: "
    "docs/influence.md"
)

# how far a run's influence rankings hold, by the job's sensitivity.covariance (docs/influence.md measures each)
_LOOSE = ("with which influence follows retraining loosely; a K-FAC one (job config sensitivity.covariance: kfac) "
          "follows it closer")
INFLUENCE_COVARIANCE = {
    "optimizer": f"the run's covariance is its optimizer's diagonal σ², {_LOOSE}",
    "optimizer_with_last_layer": f"the run's covariance is the optimizer's diagonal σ² beside a last-layer Laplace, "
                                 f"{_LOOSE}",
    "last_layer": f"the run's covariance covers its last layer only, {_LOOSE}",
    "kfac": "the run's covariance is K-FAC, with which influence follows retraining closer than with a diagonal σ², "
            "short of a dense covariance",
}


class EvaluationOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    step: int
    epoch: float | None
    loo: float | None = Field(description=LOO_VALIDITY)
    metrics: dict
    n_examples: int
    wall_time: float | None


class ExampleOut(BaseModel):
    idx: int
    rank: int = Field(description="0 = most sensitive at this step (by=score), or the highest mean LOO loss "
                      "(by=loo_mean)")
    score: float | None = Field(description=SCORE_VALIDITY)
    loo_loss: float | None
    prob_label: float | None = Field(description="leave-one-out probability of the given label, softmax(f_i + Δ_i)_y")
    label: int | None = None
    flipped: bool | None = None
    step: int | None = None
    loo_loss_mean: float | None = Field(None, description=LOO_MEAN_VALIDITY)
    loo_loss_evals: int = Field(0, description="how many evaluations up to this step loo_loss_mean averages")
    source: str | None = Field(None, description="where the example comes from in the data: 'line N' of a CSV, "
                               "'class/file' of an image folder, 'row i' of the source's training arrays")
    scored_step: int | None = Field(None, description="the step whose scoring score and loo_loss come from: "
                                    "earlier than step when the run scores its examples in rotation "
                                    "(diagnostics.budget)")
    screened: bool = Field(False, description="score and loo_loss come from screening: the output layer's share of "
                           "the sensitivities, mapped onto the exact pass's scale, used while it ranks like the exact "
                           "pass on the evaluation's own slice (metric screen_spearman)")


class ExamplesPage(BaseModel):
    step: int
    order: str
    by: str = "score"
    offset: int
    limit: int = Field(description="the page's size after the cap of 1000")
    total: int = Field(0, description="examples in the evaluation")
    items: list[ExampleOut]


class HookCreate(BaseModel):
    url: str = Field(max_length=2000, pattern=r"^[hH][tT][tT][pP][sS]?://[^\x00-\x20/?#]+([/?#][^\x00-\x20]*)?$",
                     description="http(s); public targets only, unless the operator allows others")
    events: list[Literal["evaluation", "early_stop", "finished", "failed", "influence"]] = Field(min_length=1)
    run_id: int | None = Field(None, ge=0, le=2**31 - 1, description="None: every run")


def _no_default(schema: dict) -> None:
    schema.pop("default", None)


class HookOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    url: str
    events: list[str]
    # absent rather than null (the routes leave None out): "no run" is not a run id a client should follow
    run_id: int = Field(None, description="the run it listens to; absent: every run", json_schema_extra=_no_default)
    secret: str = Field(None, description="returned once, at creation: verify X-Ivon-Diag-Signature with it",
                        json_schema_extra=_no_default)


class EarlyStopOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    monitor: str
    mode: str
    best: float | None
    best_step: int | None
    wait: int
    stopped_step: int | None
    reason: str | None


class InfluenceCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # 0 is not false, "3" not a test example

    test: list[Annotated[int, Field(ge=0, le=2**31 - 1)]] = Field(
        min_length=1, max_length=100, description="indices into the run's test split")
    k: int = Field(10, ge=1, le=100, description="proponents and opponents per test example")
    predicted: bool = Field(False, description="the loss at the predicted label instead of the test label")
    step: int | None = Field(None, ge=0, le=2**31 - 1, description="query the run as it was at this evaluation "
                             "(one of the newest its job kept: sensitivity.keep_states); none: the final model")


class InfluenceExample(BaseModel):
    idx: int = Field(description="a training example (its page: /runs/{run_id}/examples/{idx})")
    label: int
    flipped: bool = Field(description="whether the job flipped its label (label_noise)")
    loss_change: float = Field(description=INFLUENCE_VALIDITY)


class InfluenceRow(BaseModel):
    test_idx: int
    label: int
    predicted: int
    target: int = Field(description="the label the loss is taken at")
    loss: float
    step: int | None = Field(None, description="the training step of the weights and posterior queried")
    proponents: list[InfluenceExample] = Field(description="removing them would raise the loss most")
    opponents: list[InfluenceExample] = Field(description="removing them would lower the loss most")


class InfluenceOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    run_id: int
    status: Literal["pending", "running", "done", "failed"]
    request: InfluenceCreate
    result: list[InfluenceRow] | None = Field(description="one row per test example once done")
    error: str | None
    created_at: UTCDatetime
    finished_at: UTCDatetime | None


class ReviewIn(BaseModel):
    # label with relabel only, as the validator below says
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra={"allOf": [{
        "if": {"properties": {"decision": {"const": "relabel"}}, "required": ["decision"]},
        "then": {"required": ["label"],
                 "properties": {"label": {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}}},
        "else": {"properties": {"label": {"type": "null"}}}}]})

    decision: Literal["keep", "relabel", "drop"] = Field(description="keep the example as labeled, relabel it to "
                                                         "`label`, or drop it from the corrected data set")
    label: Int | None = Field(None, ge=0, le=2**31 - 1, description="the new class; with relabel only")
    note: str | None = Field(None, max_length=2000, pattern=r"^[^\x00]*$")

    @model_validator(mode="after")
    def _label_with_relabel(self):
        if (self.label is not None) != (self.decision == "relabel"):
            raise ValueError("label goes with decision 'relabel' only" if self.label is not None
                             else "decision 'relabel' needs the new label")
        return self


class ReviewOut(BaseModel):
    idx: int
    given_label: int | None = Field(description="the label the run trained on")
    flipped: bool | None = Field(description="label noise the job injected on purpose (null for real data)")
    decision: Literal["keep", "relabel", "drop"]
    label: int | None
    note: str | None
    updated_at: UTCDatetime
    source: str | None = Field(None, description="where the example comes from in the data")


class ReviewsPage(BaseModel):
    total: int
    counts: dict[str, int] = Field(description="examples per decision")
    items: list[ReviewOut]


class ExampleDetailOut(BaseModel):
    """One training example as the example page shows it."""

    idx: int
    label: int | None = Field(description="the label the run trained on")
    label_name: str | None = Field(description="its class name, where the data names classes")
    flipped: bool | None = Field(description="whether the job flipped its label on purpose (data.flip)")
    original_label: int | None = Field(description="the label before the job flipped it")
    source: str | None = Field(description="where the example comes from in the data: 'line N' of a CSV, "
                               "'class/file' of an image folder, 'row i' of the source's training arrays")
    image_url: str | None = Field(description="its thumbnail (PNG), for image data")
    features: dict[str, float] | None = Field(description="a tabular example's row as read, before any "
                                              "standardization, by column name")
    probs: list[float] | None = Field(description="each class's leave-one-out probability, averaged over the "
                                      "evaluations that scored it (cleanlab's pred_probs row; null before the first)")
    probs_step: int | None = Field(description="the latest evaluation the probabilities average up to")
    probs_evals: int | None = Field(description="how many evaluations they average")
    predicted: int | None = Field(description="the class of highest LOO probability")
    predicted_name: str | None
    review: ReviewOut | None = Field(description="the review's decision, or null while unreviewed")
