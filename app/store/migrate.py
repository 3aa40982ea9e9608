"""Schema migrations (Alembic, shipped in ``migrations/``) run programmatically: ``ivon-diag db upgrade``."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

import migrations
from app.store.engine import SchemaOutdated, check_reachable, redact

MIGRATIONS = Path(migrations.__file__).resolve().parent  # the installed package, wherever it lives


def alembic_config(engine: Engine) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return cfg


def head_revision(engine: Engine) -> str | None:
    return ScriptDirectory.from_config(alembic_config(engine)).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> None:
    check_reachable(engine)
    with engine.begin() as conn:
        cfg = alembic_config(engine)
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)


def downgrade(engine: Engine, revision: str = "base") -> None:
    with engine.begin() as conn:
        cfg = alembic_config(engine)
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, revision)


def ensure_current(engine: Engine) -> None:
    """Raise SchemaOutdated unless the database is at this code's head revision (a SQLite file that does not exist
    is named, not created: a mistyped path leaves no empty database behind)."""
    path = engine.url.database if engine.url.get_backend_name() == "sqlite" else None
    if path and path != ":memory:" and not path.startswith("file:") and not Path(path).exists():
        raise SchemaOutdated(f"no database file at {path!r} (none was created): check --db / IVON_DIAG_DB, or create "
                             "it with `ivon-diag db upgrade` (`ivon-diag train` and `demo` create theirs)")
    check_reachable(engine)
    current, head = current_revision(engine), head_revision(engine)
    if current != head:
        where = "an empty database" if current is None else f"revision {current}"
        raise SchemaOutdated(f"database {redact(engine.url.render_as_string(False))!r} is at {where}, this code "
                             f"expects {head}: run `ivon-diag db upgrade`")
