"""Engines for the embedded default (SQLite: WAL, busy timeout, foreign keys) and PostgreSQL (psycopg 3)."""

from __future__ import annotations

import os
from pathlib import Path

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError

DEFAULT_URL = "sqlite:///ivon-diag.db"


class StoreError(Exception):
    """Base of the store's errors."""


class DatabaseUnavailable(StoreError):
    """The database URL is invalid or the server cannot be reached (the message never shows the password)."""


class SchemaOutdated(StoreError):
    """The database schema is older (or newer) than this code."""


def database_url(url: str | None = None) -> str:
    """``url``, else $IVON_DIAG_DB, else a SQLite file in the working directory."""
    return url or os.environ.get("IVON_DIAG_DB") or DEFAULT_URL


def redact(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparseable database URL>"


def make_engine(url: str | None = None, **kwargs) -> Engine:
    """An engine for ``url`` with the project's settings; raises DatabaseUnavailable on a bad URL."""
    url = database_url(url)
    try:
        parsed = make_url(url)
    except ArgumentError as err:
        raise DatabaseUnavailable(f"invalid database URL {redact(url)!r}: expected e.g. sqlite:///file.db or "
                                  "postgresql://user@host/db") from err
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, connect_args={"timeout": 30}, **kwargs)
        _sqlite_settings(engine)
    elif parsed.get_backend_name() == "postgresql":
        engine = create_engine(parsed, pool_pre_ping=True, pool_size=10, max_overflow=20,
                               connect_args={"connect_timeout": 5}, **kwargs)
    else:
        raise DatabaseUnavailable(f"unsupported database {parsed.get_backend_name()!r} in {redact(url)!r}: "
                                  "use sqlite or postgresql")
    return engine


def _sqlite_settings(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA cache_size=-131072")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn):
        # Writers take the write lock up front (BEGIN IMMEDIATE): no "database is locked" on upgrade from read.
        immediate = conn.get_execution_options().get("immediate", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def check_reachable(engine: Engine) -> None:
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except OperationalError as err:
        reason = str(err.orig).strip().splitlines()[0] if err.orig else "connection failed"
        raise DatabaseUnavailable(f"cannot reach database {redact(engine.url.render_as_string(False))!r}: "
                                  f"{reason}") from None
