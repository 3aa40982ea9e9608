"""Migrations agree with the models; upgrade/downgrade on both backends; outdated schemas and bad URLs."""

import subprocess
import sys

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from app.store import DatabaseUnavailable, SchemaOutdated, Store, ensure_current, make_engine, upgrade
from app.store.migrate import downgrade, head_revision
from app.store.models import Base
from tests.conftest import drop_pg_database, new_pg_database


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_url(request, tmp_path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'm.db'}"
    else:
        url = new_pg_database()
        yield url
        drop_pg_database(url)


def test_upgrade_matches_models_and_downgrade_to_base(empty_url):
    engine = make_engine(empty_url)
    with pytest.raises(SchemaOutdated, match="empty database.*ivon-diag db upgrade"):
        ensure_current(engine)
    upgrade(engine)
    ensure_current(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []
    downgrade(engine, "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    upgrade(engine)
    assert "score_chunks" in inspect(engine).get_table_names()
    engine.dispose()


def test_older_schema_is_reported_with_the_command_to_run(tmp_path):
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = make_engine(url)
    upgrade(engine)
    with engine.begin() as conn:
        conn.exec_driver_sql("UPDATE alembic_version SET version_num = '0000'")
    with pytest.raises(SchemaOutdated, match=f"revision 0000, this code expects {head_revision(engine)}"):
        ensure_current(engine)


def test_bad_urls_name_the_database_without_the_password():
    with pytest.raises(DatabaseUnavailable, match="unsupported database 'mysql'"):
        make_engine("mysql://u:pw@localhost/db")
    with pytest.raises(DatabaseUnavailable, match="invalid database URL") as err:
        make_engine("not a url")
    engine = make_engine("postgresql://alice:s3cret@127.0.0.1:1/nowhere")
    with pytest.raises(DatabaseUnavailable, match=r"cannot reach database 'postgresql\+psycopg://alice:\*\*\*@") as err:
        upgrade(engine)
    assert "s3cret" not in str(err.value)


def test_cli_db_upgrade_and_token(tmp_path):
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    cli = [sys.executable, "-m", "worker.cli"]
    out = subprocess.run([*cli, "--db", url, "db", "upgrade"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert head_revision(make_engine(url)) in out.stdout
    tok = subprocess.run([*cli, "--db", url, "token", "create", "ci"], capture_output=True, text=True, timeout=60)
    assert tok.returncode == 0 and Store(url).verify_token(tok.stdout.strip())
    bad = subprocess.run([*cli, "--db", "postgresql://bob:pw@127.0.0.1:1/x", "db", "upgrade"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "cannot reach database" in bad.stderr and "pw@" not in bad.stderr
    assert "Traceback" not in bad.stderr
