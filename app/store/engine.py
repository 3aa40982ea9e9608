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


class NotFound(StoreError, LookupError):
    """An unknown run, step, example, job, hook or token (the API maps it to 404)."""


class Conflict(StoreError):
    """A request the stored state does not allow now (deleting a running run); the API maps it to 409."""


class DatabaseUnavailable(StoreError):
    """The database URL is invalid or the server cannot be reached (the message never shows the password)."""


class WriteRefused(StoreError):
    """The database accepts reads but refuses writes: read-only (a replica, a read-only file or transaction),
    no privilege, or a full disk. Not the job's fault and not fixed by an immediate retry."""


class SchemaOutdated(StoreError):
    """The database schema is older (or newer) than this code."""


class CorruptData(StoreError):
    """Stored bytes that do not decode (per-example records cut short or of an unknown layout)."""


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
        if parsed.database and parsed.database != ":memory:" and not parsed.database.startswith("file:"):
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, connect_args={"timeout": 30}, **kwargs)
        _sqlite_settings(engine)
    elif parsed.get_backend_name() == "postgresql":
        engine = create_engine(parsed, pool_pre_ping=True, pool_size=10, max_overflow=20,
                               connect_args={"connect_timeout": 5}, **kwargs)
    else:
        raise DatabaseUnavailable(f"unsupported database {parsed.get_backend_name()!r} in {redact(url)!r}: "
                                  "use sqlite or postgresql")
    event.listen(engine, "handle_error", _refused_writes)
    return engine


# SQLite result codes READONLY, IOERR (an immutable or vanished file under WAL) and FULL (extended codes keep the
# primary code in the low byte); PostgreSQL SQLSTATEs read_only_sql_transaction, insufficient_privilege, disk_full.
_SQLITE_REFUSED = {8: "the database is read-only", 10: "disk I/O error: the file cannot be written",
                   13: "the disk is full"}
_PG_REFUSED = {"25006": "the database is read-only", "42501": "permission denied", "53100": "the disk is full"}


def _refused_writes(ctx) -> None:
    orig = ctx.original_exception
    reason = _SQLITE_REFUSED.get(getattr(orig, "sqlite_errorcode", -1) & 0xFF)
    if reason is None:
        reason = _PG_REFUSED.get(getattr(orig, "sqlstate", None) or "")
    if reason is not None:
        if ctx.dialect.name == "sqlite":  # a connection opened while the file was read-only stays read-only:
            ctx.is_disconnect = True   # drop the pool's connections, so writes work again once the file does
        detail = str(orig).strip().splitlines()[0][:200]
        raise WriteRefused(f"the database refuses writes ({reason}): {detail}") from orig


# SQLite's own page cache per connection, in KiB (anonymous memory: a worker inserting a large image set's thumbnails
# filled 128 MiB of it; the OS caches the file's pages anyway)
SQLITE_CACHE_KIB = 16384


def _sqlite_settings(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute(f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}")
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
