"""Job configuration: pydantic models, loaded from JSON, YAML or TOML files or an API payload."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator


class _Strict(BaseModel):
    # every float finite (JSON has no infinity; PostgreSQL refuses it in a JSON column), no unknown keys, no
    # coercion (true is not 1, "5" is not 5): what the schema says is what is accepted
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)


def _no_nul(value: str | None) -> str | None:
    if value is not None and "\x00" in value:
        raise ValueError("must not contain a NUL byte")
    return value


Text = Annotated[str, AfterValidator(_no_nul)]  # PostgreSQL cannot store NUL in text


def _whole(value):
    """JSON Schema's integers include 26.0; bools and fractions stay refused."""
    return int(value) if type(value) is float and value.is_integer() and abs(value) < 2**63 else value


Int = Annotated[int, BeforeValidator(_whole)]


BIG = 10**9  # sizes and counts: bounded, so a typo cannot ask for 2**63 of anything
SEED = Field(0, ge=0, le=2**32 - 1, description="seeds numpy, torch and scikit-learn alike")
# what an evaluation records (worker.trainer), the names early stopping may monitor; test_mc_* with IVON only
MONITORS = ("loo", "loo_se", "loo_sample", "test_nll_se", "train_nll", "train_acc", "loo_capped", "hess_mean",
            "hess_min", "hess_max", "hess_init_share", "loo_raw", "calibration_scale", "calibration_fit",
            "calibration_nll", "calibration_nll_se", "calibration_examples", "calibration_step",
            *(f"test_{m}" for m in ("accuracy", "nll", "ece", "brier")),
            *(f"test_mc_{m}" for m in ("accuracy", "nll", "ece", "brier")))


FILE_SOURCES = ("npz", "csv", "image_folder", "mnist", "cifar10")  # each read by worker.sources.READERS[name]
COVARIANCES = ("optimizer", "optimizer_with_last_layer", "last_layer", "kfac")  # each built by sensitivity.providers


def _required_when(field: str, names: tuple[str, ...], schema: dict) -> dict:
    """JSON Schema: ``field`` a non-empty string when ``name`` is one of ``names`` (what the validator checks)."""
    return {"if": {"properties": {"name": {"enum": list(names)}}, "required": ["name"]},
            "then": {"required": [field], "properties": {field: schema}}}


class DataConfig(_Strict):
    model_config = ConfigDict(json_schema_extra={"allOf": [
        _required_when("path", FILE_SOURCES, {"type": "string", "minLength": 1, "maxLength": 4096}),
        _required_when("factory", ("factory",), {"type": "string", "minLength": 3, "maxLength": 200})]})

    name: Literal[("digits", "synthetic", *FILE_SOURCES, "factory")] = "digits"
    path: Text | None = Field(None, max_length=4096, description="npz: a .npz with x_train, y_train[, x_test, "
                              "y_test]; csv: a file with a header; image_folder: path/<class>/<image>; mnist: the "
                              "folder of its 4 idx files; cifar10: the cifar-10-batches-py folder")
    test_path: Text | None = Field(None, max_length=4096,
                                   description="csv, image_folder: the test set (default: a split)")
    label_column: Text = Field("label", max_length=200,
                               description="csv: the column of labels (integers or class names)")
    image_size: Int | None = Field(None, ge=4, le=512, description="image_folder: resize to squares of this side")
    factory: str | None = Field(None, max_length=200, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
                                description="factory: 'module:function' returning (model, (x, y), (x_test, y_test))")
    num_classes: Int | None = Field(None, ge=2, le=1_000_000,
                                    description="labels must lie in [0, num_classes) (default: max + 1)")
    test_fraction: float = Field(0.2, gt=0, lt=1)
    n_train: Int | None = Field(None, ge=2, le=BIG, description="a stratified subset of the training split")
    n_synthetic: Int = Field(512, ge=8, le=10_000_000)
    standardize: bool | None = Field(
        None, description="scale each feature to zero mean and unit variance, fitted on the training split; "
        "None: on for csv, off for the others")
    memory_map: bool | None = Field(
        None, description="npz: read x_train and x_test from the file as steps and evaluations touch them instead of "
        "holding them in memory (an uncompressed npz, float32 inputs, its own test split, no n_train or "
        "standardize); None: when the file is 256 MiB or more and can be")

    @model_validator(mode="after")
    def _path_for_files(self):
        if self.name in FILE_SOURCES and not self.path:
            raise ValueError(f"data.path is required for name {self.name!r}")
        if self.name == "factory" and not self.factory:
            raise ValueError("data.factory ('module:function') is required for name 'factory'")
        return self


class ModelConfig(_Strict):
    name: Literal["logreg", "mlp", "cnn", "resnet20"] = "mlp"
    hidden: list[Annotated[Int, Field(ge=1, le=1_000_000)]] = Field(default_factory=lambda: [128], max_length=64)
    norm: Literal["group", "batch", "none"] = "group"


class OptimizerConfig(_Strict):
    name: Literal["ivon", "adamw", "sgd"] = "ivon"
    lr: float = Field(0.5, gt=0, le=1e6)
    ess: float | None = Field(None, gt=0, le=1e15, description="default: the number of training examples")
    hess_init: float = Field(0.3, gt=0, le=1e12)
    beta2: Annotated[float, Field(ge=0, lt=1)] | Literal["matched"] = Field(
        "matched", description="'matched': 1 − 1/total steps (validated); else in [0, 1)")
    weight_decay: float = Field(1e-3, ge=0, le=1e6)
    mc_samples: Int = Field(1, ge=1, le=10_000)
    clip_radius: float | None = Field(None, gt=0, description="None: no clipping (JSON has no infinity)")
    warmup_steps: Int = Field(0, ge=0, le=BIG)
    fused: bool | None = Field(
        None, description="IVON: compiled kernels for large CPU tensors (~25 s to compile once); None: on when every "
        "tensor is on the CPU and one has at least 65,536 elements")
    noise: Literal["auto", "torch", "blocks", "counter"] = Field(
        "auto", description="IVON: 'counter' draws the Gaussian noise from a counter-based generator (inside the "
        "sampling kernel with fused: the fastest CPU step); 'torch': ivon-opt's numbers from torch's generator; "
        "'blocks': torch's generator in parallel blocks (faster, other numbers); 'auto': counter where the fused "
        "kernels run, else torch")



class SensitivityConfig(_Strict):
    form: Literal["auto", "first_order", "corrected", "second_order", "rayleigh", "diagonal"] = Field(
        "auto", description="auto: corrected with a dense covariance, rayleigh with the optimizer's σ² (first order "
        "while the LOO is calibrated: the scale sets the level, docs/calibration.md), first order otherwise; "
        "second_order: the "
        "corrected form's series to two terms (two first-order passes); rayleigh: that series summed as a geometric "
        "series at ΛV's Rayleigh quotient (the same two passes; exact for K = 2 and binary losses); how each tracks "
        "the retrained LOO: docs/validation.md and python -m research.caps")
    max_amplification: Annotated[float, Field(gt=1)] | Literal["auto"] = Field(
        "auto", description="the corrected, second-order and Rayleigh forms' cap on how much the correction may "
        "amplify a residual; auto: 10 with a dense covariance (exact there), 2 otherwise (python -m "
        "research.caps: 10 lets the errors of a diagonal σ² through)")
    covariance: Literal[COVARIANCES] = Field(
        "optimizer", description="optimizer: the optimizer's own σ² (IVON: 1/(N(h + δ))); optimizer_with_last_layer: "
        "that σ² for the body and an exact GGN Laplace for the last Linear layer, refitted at each evaluation; "
        "last_layer: that Laplace alone, the body fixed; kfac: a K-FAC GGN Laplace over every Linear and Conv2d "
        "layer. How each tracks the retrained LOO and the test NLL: docs/validation.md")
    chunk_size: Int = Field(256, ge=1, le=1_000_000)
    subset: Int | None = Field(None, ge=1, le=BIG, description="evaluate a fixed random subset of the training set")
    keep_states: Int = Field(3, ge=0, le=1000, description="the newest evaluations whose weights and posterior "
                             "variance are kept beside the final model, for influence queries at those steps "
                             "(each the size of the model twice; 0: the final model only)")


class LabelNoiseConfig(_Strict):
    fraction: float = Field(0.0, ge=0, lt=1)
    mode: Literal["uniform", "pairs"] = "uniform"
    seed: Int = SEED


class EarlyStoppingConfig(_Strict):
    enabled: bool = True
    monitor: Literal[MONITORS] = Field("loo", description="an evaluation's metric (test_mc_*: IVON runs only)")
    mode: Literal["min", "max"] = "min"
    patience: Int = Field(3, ge=0, le=BIG)
    min_delta: float = Field(0.0, ge=0)
    min_delta_se: float = Field(1.0, ge=0, le=1e6, description="a sampled monitor (loo with its loo_se) must also "
                                "improve by this many standard errors")
    check_finite: bool = True
    stopping_threshold: float | None = None
    restore_best_weights: bool = True


DEFAULT_BUDGET = 0.15  # bench/overhead.py measures what it costs


class DiagnosticsConfig(_Strict):
    budget: float | None = Field(
        None, gt=0, le=10, description="the evaluations' share of the training time (scoring, test metrics, "
        f"checkpoints): the worker times itself and picks when to evaluate and how many examples to score; None: "
        f"{DEFAULT_BUDGET} when eval_every is not set, else every example at each evaluation (worker.cadence)")
    se_target: float = Field(0.02, gt=0, le=1, description="the LOO estimate's standard error sought, as a share of "
                             "the estimate (examples are scored in a stratified rotation: each slice is a sample)")
    coverage_epochs: float = Field(5.0, gt=0, le=1e6, description="score every example at least once in this many "
                                   "epochs when the budget allows (the run's `coverage period` says what it got)")
    screen: bool = Field(True, description="screen examples between the exact slices (sensitivity.screen: the "
                         "output layer's share of the sensitivities, at about a forward's cost) to score every example "
                         "each coverage_epochs; used only while it ranks like the exact pass on each slice")
    screen_min_spearman: float = Field(0.95, ge=-1, le=1, description="the Spearman correlation with the exact "
                                       "pass on the evaluation's slice that screened scores need to be used")
    test_sample: Int = Field(1000, ge=1, le=BIG, description="with a budget, evaluations before the last measure the "
                             "test metrics (at the posterior mean, no MC) on a fixed stratified subset of this many "
                             "test examples, with test_nll_se; the last evaluation measures the whole test set")


class CalibrationConfig(_Strict):
    source: Literal["split", "test", "none"] = Field(
        "split", description="what the LOO's level is calibrated against: split: a stratified split of the training "
        "set held out of training; test: the job's test split (then the LOO's level is the test NLL's); none: "
        "uncalibrated (σ² as trained: its level follows hess_init, docs/validation.md)")
    mode: Literal["refit", "frozen", "frozen_variance"] = Field(
        "refit", description="refit: the scale is refitted at every evaluation (the LOO's mean then "
        "equals the held-out NLL); frozen: fitted over the first freeze_at of the run, then fixed; "
        "frozen_variance: frozen, and the level of the scaled σ² held there as σ² grows by schedule. How each holds "
        "against held-out truth: docs/calibration.md")
    fraction: float = Field(0.05, gt=0, le=0.5, description="split: the share of the training set held out")
    max_examples: Int = Field(2000, ge=1, le=BIG, description="split: at most this many examples held out")
    min_examples: Int = Field(50, ge=1, le=BIG, description="fewer held-out examples than this: uncalibrated (the "
                              "run says so)")
    freeze_at: float = Field(0.2, gt=0, le=1, description="frozen modes: the share of the run's steps whose "
                             "evaluations fit the scale")
    scale: float | None = Field(None, gt=0, le=1e6, description="a fixed scale on σ² (e.g. another run's "
                                "calibration_scale): no data held out, nothing fitted")


def _positive_count(value: str) -> str:
    if float(re.match(r"\s*([\d.]+)", value).group(1)) <= 0:
        raise ValueError("must be more than 0")
    return value


EVAL_EVERY = r"^\s*\d{1,9}(\.\d{1,6})?\s*(steps?|epochs?)\s*$"


class JobConfig(_Strict):
    model_config = ConfigDict(json_schema_extra={"allOf": [{  # test_mc_* needs IVON (as the validator says)
        "if": {"properties": {"early_stopping": {"properties": {"monitor": {"pattern": "^test_mc_"}},
                                                 "required": ["monitor"]}}, "required": ["early_stopping"]},
        "then": {"properties": {"optimizer": {"properties": {"name": {"const": "ivon"}}}}}}]})
    name: Text = Field("run", max_length=200, min_length=1)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    epochs: Int = Field(20, ge=1, le=100_000)
    batch_size: Int = Field(64, ge=1, le=10_000_000)
    micro_batches: Int = Field(1, ge=1, le=100_000,
                               description="gradient accumulation: each step's batch in this many pieces")
    eval_every: Annotated[Int, Field(ge=1, le=BIG)] | Annotated[str, Field(pattern=EVAL_EVERY),
                                                               AfterValidator(_positive_count)] | None = Field(
        None, description="a fixed cadence: steps between evaluations (50 or '50 steps') or epochs ('2 epochs', "
        "'0.5 epoch'); None: diagnostics.budget decides")
    diagnostics: DiagnosticsConfig = Field(default_factory=DiagnosticsConfig)
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    eval_mc_samples: Int = Field(8, ge=1, le=10_000)
    sensitivity: SensitivityConfig = Field(default_factory=SensitivityConfig)
    label_noise: LabelNoiseConfig = Field(default_factory=LabelNoiseConfig)
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:\d{1,3})?)$",
        description="where the job trains and evaluates: 'cpu', 'cuda' (under torchrun: the rank's local GPU) or "
        "'cuda:N'; 'auto': the GPU when one is present for every local rank, else the CPU")
    seed: Int = SEED

    @model_validator(mode="after")
    def _monitor_exists(self):
        if self.early_stopping.monitor.startswith("test_mc_") and self.optimizer.name != "ivon":
            raise ValueError(f"early_stopping.monitor {self.early_stopping.monitor!r} needs optimizer.name 'ivon' "
                             "(MC predictions come from IVON's posterior)")
        return self


class ConfigError(ValueError):
    """An invalid configuration; the message lists every offending field."""


def field_path(loc: tuple) -> str:
    """``eval_every`` for pydantic's loc of a union's branch (``eval_every.function-after[...]``)."""
    parts = [str(p) for p in loc if isinstance(p, int) or not any(c in str(p) for c in "[(-") and str(p) not in
             ("int", "str", "float", "bool", "none")]
    return ".".join(parts) or "config"


def parse_config(payload: dict) -> JobConfig:
    try:
        return JobConfig.model_validate(payload)
    except ValidationError as err:
        lines = list(dict.fromkeys(f"{field_path(e['loc'])}: {e['msg']}" for e in err.errors()))
        raise ConfigError("invalid job config:\n  " + "\n  ".join(lines)) from None


def _yaml(text: str):
    """YAML with 1e-3 read as a number, as JSON and TOML read it (PyYAML follows YAML 1.1: a string)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
        r"^[-+]?(?:\d[\d_]*)?\.?\d*(?:[eE][-+]?\d+)$|^[-+]?\d[\d_]*\.\d*$|^[-+]?\.\d+$"),
        list("-+0123456789."))
    return yaml.load(text, Loader=Loader)  # noqa: S506 (a SafeLoader)


def load_config(path: str | Path) -> JobConfig:
    """A JobConfig from a .json, .yaml/.yml or .toml file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            payload = json.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            payload = _yaml(text)
        elif path.suffix == ".toml":
            payload = tomllib.loads(text)
        else:
            raise ConfigError(f"unknown config format {path.suffix!r}: use .json, .yaml or .toml")
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as err:
        raise ConfigError(f"cannot parse {path}: {err}") from None
    except Exception as err:  # yaml errors
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"cannot parse {path}: {err}") from None
    if not isinstance(payload, dict):
        raise ConfigError(f"{path}: the config must be a mapping")
    return parse_config(payload)


def eval_steps(every: int | str | None, steps_per_epoch: int) -> int | None:
    """``eval_every`` in steps (an epoch count rounded to whole steps, at least one); None stays None."""
    if every is None or isinstance(every, int):
        return every
    count, unit = re.match(r"\s*([\d.]+)\s*(\w+)", every).groups()
    return max(1, round(float(count) * (steps_per_epoch if unit.startswith("epoch") else 1)))


def diagnostics_budget(cfg: JobConfig) -> float | None:
    """The budget a job runs under: the one given, the default without a fixed cadence, else None (score all)."""
    if cfg.diagnostics.budget is not None:
        return cfg.diagnostics.budget
    return DEFAULT_BUDGET if cfg.eval_every is None else None
