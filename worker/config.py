"""Job configuration (the models live in ``app.store.job_config``: the API validates payloads with them too)."""

from app.store.job_config import (  # noqa: F401
    CalibrationConfig,
    ConfigError,
    DataConfig,
    EarlyStoppingConfig,
    JobConfig,
    LabelNoiseConfig,
    ModelConfig,
    OptimizerConfig,
    SensitivityConfig,
    load_config,
    parse_config,
)
