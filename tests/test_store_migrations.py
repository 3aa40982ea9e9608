"""Migrations agree with the models; upgrade/downgrade on both backends; outdated schemas and bad URLs."""

import subprocess
import sys
from pathlib import Path

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
    if engine.url.get_backend_name() == "sqlite":  # a missing file is named and not created
        with pytest.raises(SchemaOutdated, match="no database file at .*m.db.*ivon-diag db upgrade"):
            ensure_current(engine)
        assert not Path(engine.url.database).exists()
        with engine.connect():  # an empty file
            pass
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
    cli = [sys.executable, "-m", "ivon_diag.cli"]
    out = subprocess.run([*cli, "--db", url, "db", "upgrade"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert head_revision(make_engine(url)) in out.stdout
    tok = subprocess.run([*cli, "--db", url, "token", "create", "ci"], capture_output=True, text=True, timeout=60)
    assert tok.returncode == 0 and Store(url).verify_token(tok.stdout.strip())
    rev = subprocess.run([*cli, "token", "revoke", "ci", "--db", url], capture_output=True, text=True, timeout=60)
    assert rev.returncode == 0 and not Store(url).verify_token(tok.stdout.strip())
    rev = subprocess.run([*cli, "--db", url, "token", "revoke", "nobody"], capture_output=True, text=True, timeout=60)
    assert rev.returncode == 2 and "token 'nobody' not found" in rev.stderr
    bad = subprocess.run([*cli, "--db", "postgresql://bob:pw@127.0.0.1:1/x", "db", "upgrade"], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "cannot reach database" in bad.stderr and "pw@" not in bad.stderr
    assert "Traceback" not in bad.stderr


def test_0002_keeps_layout_1_records_and_rebuilds_their_means(empty_url):
    """Per-example records written at revision 0001 read after the upgrade; the next evaluation's running means
    cover them; the downgrade rewrites layout-2 records as layout 1, readable by 0001's code."""
    import numpy as np
    from sqlalchemy import text

    from app.store.records import LAYOUTS

    engine = make_engine(empty_url)
    upgrade(engine, "0001")
    store = Store(engine)
    v1 = LAYOUTS[1]
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO runs (name, config, status, stop_requested, created_at) "
                          "VALUES ('old', '{}', 'running', false, CURRENT_TIMESTAMP)"))
        run_id = conn.execute(text("SELECT max(id) FROM runs")).scalar()
        for step, losses in ((1, [1.0, 3.0]), (2, [2.0, float("nan")])):
            rec = np.zeros(2, dtype=v1)
            rec["idx"], rec["rank"], rec["score"], rec["loo"], rec["prob"] = [0, 1], [0, 1], [2.0, 1.0], losses, 0.5
            conn.execute(text("INSERT INTO evaluations (run_id, step, metrics, n_examples, created_at) "
                              "VALUES (:r, :s, '{}', 2, CURRENT_TIMESTAMP)"), {"r": run_id, "s": step})
            for kind in ("rank", "idx"):
                conn.execute(text("INSERT INTO score_chunks (run_id, step, kind, chunk, lo, hi, data) "
                                  "VALUES (:r, :s, :k, 0, 0, 1, :d)"),
                             {"r": run_id, "s": step, "k": kind, "d": rec.tobytes()})
    upgrade(engine)
    _, old = store.examples_at(run_id, step=2, k=2)
    assert [(r.idx, r.loo_loss, r.loo_loss_mean, r.loo_loss_evals) for r in old] == [(0, 2.0, None, 0),
                                                                                   (1, None, None, 0)]
    store.write_evaluation(run_id, 3, loo=1.0, metrics={}, idx=np.array([0, 1]), scores=np.array([1.0, 2.0]),
                           loo_losses=np.array([6.0, 5.0]), prob_label=None)
    table = store.examples_table(run_id, 3)
    assert dict(zip(table["idx"], zip(table["loo_loss_mean"], table["loo_loss_evals"]))) == {0: (3.0, 3), 1: (4.0, 2)}
    # one example's history spans both layouts (old records' own step; the new one's running mean)
    assert [(r.step, r.loo_loss, r.loo_loss_mean, r.scored_step) for r in store.example_history(run_id, 0)] == [
        (1, 1.0, None, 1), (2, 2.0, None, 2), (3, 6.0, 3.0, 3)]
    downgrade(engine, "0001")
    with engine.connect() as conn:
        data = conn.execute(text("SELECT data FROM score_chunks WHERE step = 3 AND kind = 'idx'")).scalar()
    assert np.frombuffer(data, dtype=v1)["loo"].tolist() == [6.0, 5.0]
    upgrade(engine)
    assert store.examples_at(run_id, step=3, k=1)[1][0].idx == 1
    engine.dispose()


def test_0003_gives_unfinished_jobs_their_runs_device(empty_url):
    from sqlalchemy import text

    engine = make_engine(empty_url)
    upgrade(engine, "0002")
    with engine.begin() as conn:
        for name, config, state in (("gpu", '{"device": "cuda"}', "queued"), ("plain", "{}", "queued"),
                                    ("old", '{"device": "cuda:1"}', "done")):
            conn.execute(text("INSERT INTO runs (name, config, status, stop_requested, created_at) "
                              "VALUES (:n, :c, 'queued', false, CURRENT_TIMESTAMP)"), {"n": name, "c": config})
            conn.execute(text("INSERT INTO jobs (run_id, state, attempts, created_at) "
                              "VALUES ((SELECT max(id) FROM runs), :s, 0, CURRENT_TIMESTAMP)"), {"s": state})
    upgrade(engine)
    with engine.connect() as conn:
        got = dict(conn.execute(text("SELECT r.name, j.device FROM jobs j JOIN runs r ON r.id = j.run_id")).all())
    assert got == {"gpu": "cuda", "plain": "auto", "old": "auto"}  # finished jobs are never claimed again
    store = Store(engine)
    runs = {r.name: r.id for r in store.list_runs()}
    assert store.claim_job("w", devices=["auto", "cpu"]).run_id == runs["plain"]
    downgrade(engine, "0002")
    assert "device" not in {c["name"] for c in inspect(engine).get_columns("jobs")}
    engine.dispose()
