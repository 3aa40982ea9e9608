"""Service settings from the environment (pydantic-settings); no default secrets."""

from __future__ import annotations

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IVON_DIAG_", extra="ignore")

    db: str | None = None  # IVON_DIAG_DB; default sqlite:///ivon-diag.db
    read_requires_token: bool = False  # IVON_DIAG_READ_REQUIRES_TOKEN
    cors_origins: list[str] = []  # IVON_DIAG_CORS_ORIGINS='["https://…"]'; CORS is off when empty
    max_limit: int = 1000
    threads: int | None = None  # IVON_DIAG_THREADS: blocking reads in parallel (default: 2 per CPU core)
    max_body_bytes: int = 1 << 20  # IVON_DIAG_MAX_BODY_BYTES: larger request bodies get 413
    cache_seconds: float = 1.0  # IVON_DIAG_CACHE_SECONDS: how stale an API read may be (0: no cache)
    checkpoint_dir: str = "checkpoints"  # IVON_DIAG_CHECKPOINT_DIR: where workers keep each run's final model
