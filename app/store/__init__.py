"""The store: SQLAlchemy models, engines, migrations and the repository (the only code that speaks SQL)."""

from app.store.engine import (
    Conflict,
    CorruptData,
    DatabaseUnavailable,
    NotFound,
    SchemaOutdated,
    StoreError,
    WriteRefused,
    database_url,
    make_engine,
    redact,
)
from app.store.example_scores import ScoreRow
from app.store.migrate import ensure_current, upgrade
from app.store.repository import Store, finite

__all__ = ["Store", "NotFound", "Conflict", "CorruptData", "ScoreRow", "StoreError", "DatabaseUnavailable",
           "SchemaOutdated", "WriteRefused", "make_engine", "database_url", "redact", "upgrade", "ensure_current",
           "finite"]
