"""Response and request models of the REST API."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from app.store.job_config import JobConfig


def _utc(value: datetime | None) -> datetime | None:
    """The store keeps UTC; SQLite hands it back naive. Always sent with its zone (ISO 8601, ``Z``)."""
    return value.replace(tzinfo=timezone.utc) if value is not None and value.tzinfo is None else value


UTCDatetime = Annotated[datetime, AfterValidator(_utc)]


class ErrorOut(BaseModel):
    detail: str


# The error answers every route may give, documented once (a 422 is FastAPI's validation list everywhere).
ERRORS = {400: {"model": ErrorOut, "description": "a body that is not JSON"},
          401: {"model": ErrorOut, "description": "no token where one is required"},
          403: {"model": ErrorOut, "description": "a wrong or revoked token"},
          404: {"model": ErrorOut, "description": "an unknown run, step, example or hook"},
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


class RunCreate(BaseModel):
    config: JobConfig = Field(description="a job config (see the README); validated before the job is queued")


class Point(BaseModel):
    step: int
    value: float | None


class Curve(BaseModel):
    name: str
    points: list[Point]


# How far the shown numbers hold (docs/validation.md); the API and the dashboard both say it.
HESS_INIT_SCALE = ("on digits with weight decay 3e-3 the default was 6.25× at hess_init 0.1, 1.14× at hess_init 0.3 "
                   "and 0.57× at hess_init 1 of the retrained LOO")
LOO_VALIDITY = (
    "LOO estimate of the generalization NLL: (1/N) Σ ℓ(y_i, f_i + Δ_i); by default from IVON's σ² with "
    "β2 matched to the run and the Rayleigh form capped at 2. How far it holds (docs/validation.md, "
    "against retraining without each example): on digits with weight decay 3e-3 it follows the test NLL "
    "over training (Spearman 0.87) at 1.14× the retrained LOO, and across weight decays it picks the test "
    "NLL's best on digits (Pearson 0.97) but not on breast cancer (Pearson -0.94: it picked 1e-5, the test "
    "NLL's best was 0.03; at small decays it sits at the near-zero training loss); on breast cancer with 15% of "
    "the labels flipped it follows (0.82) but at 1.54× the retrained LOO, and partly because σ² grows over the "
    "run as hess_init's remainder decays: with a fixed damping in its place it does not follow (-0.32); with "
    "weak weight decay (1e-4) it is 0.05× the retrained LOO (Spearman 0.15), "
    "and on clean breast cancer, nearly separable, 0.09× (Spearman -0.21 with a nearly flat test NLL): where "
    "the training loss goes to zero it sits far below the true LOO; on breast cancer with stronger decays "
    "(3e-3 to 3e-2; README) it was 0.26× to 2.27×; "
    "with 20% of digits' labels flipped and memorized it does not follow the rising test NLL (Spearman "
    "-0.05, 0.71×). The share of examples whose correction hit the cap (the metric loo_capped) rose with the "
    "test NLL where flipped labels were memorized (Spearman 0.98 on digits, 0.66 on breast cancer) but also "
    "reached 9.0% in a clean run without following it: a rising loo_capped is a sign to inspect, not a "
    "threshold. Its scale is hess_init's: at the end of these runs hess_init's remainder β2^t·hess_init was "
    "0.96 to 0.99 of h (median over parameters; each evaluation records it as hess_init_share, and the run page "
    "warns from 0.5), and " + HESS_INIT_SCALE + " (Spearman 0.43, 0.87, 0.75; the figures above are at 0.3)."
    " Compare LOO values only between evaluations and runs with the same hess_init and run length; "
    "do not stop training on it alone"
)
SCORE_VALIDITY = ("sensitivity ‖Δ_i‖₁; the per-example LOO ranking follows retraining's on digits (Spearman 0.78 to "
                  "0.84, docs/validation.md) and on clean breast cancer (0.88), weakly with 15% flipped labels on "
                  "breast cancer (0.48)")

LOO_MEAN_VALIDITY = (
    "this example's LOO loss averaged over the run's evaluations up to this step (those that included it, finite "
    "losses only); ranks mislabeled examples after training has memorized them, where the final loss no longer "
    "does. How far it holds (docs/validation.md §4: an MLP on digits, 100 epochs, 10 evaluations): AUROC for "
    "flipped labels 1.000 / 0.997 (10% / 30% uniform flips), 0.993 / 0.803 (10% / 30% in class pairs), where the "
    "final LOO self-confidence gave 0.992 / 0.966 / 0.973 / 0.807 and cleanlab on 5-fold cross-validation 0.998 / "
    "0.983 / 0.975 / 0.768 (another seed: 0.999 / 0.997 / 0.996 / 0.781 vs cleanlab's 0.997 / 0.987 / 0.965 / "
    "0.789); the plain training loss averaged alike ranks the same. Under 30% pair flips (ambiguous classes) no "
    "method there reached 0.95")


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
    rank: int = Field(description="0 = most sensitive at this step")
    score: float | None = Field(description=SCORE_VALIDITY)
    loo_loss: float | None
    prob_label: float | None = Field(description="leave-one-out probability of the given label, softmax(f_i + Δ_i)_y")
    label: int | None = None
    flipped: bool | None = None
    step: int | None = None
    loo_loss_mean: float | None = Field(None, description=LOO_MEAN_VALIDITY)
    loo_loss_evals: int = Field(0, description="how many evaluations up to this step loo_loss_mean averages")


class ExamplesPage(BaseModel):
    step: int
    order: str
    by: str = "score"
    offset: int
    limit: int
    items: list[ExampleOut]


class HookCreate(BaseModel):
    url: str = Field(max_length=2000, pattern=r"^[hH][tT][tT][pP][sS]?://[^\x00-\x20/?#]+([/?#][^\x00-\x20]*)?$",
                     description="http(s); public targets only, unless the operator allows others")
    events: list[Literal["evaluation", "early_stop", "finished", "failed"]] = Field(min_length=1)
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
