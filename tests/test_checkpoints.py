"""Checkpoints are bound to a run's uid and config: a new database's run 1 never resumes the old run 1's state;
a resume state from elsewhere is refused; an ended run keeps its final model (downloadable) and drops its state."""

import json
import shutil
import subprocess
import sys

import pytest
import torch
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from app.store import Store, make_engine, upgrade
from worker.checkpoints import CheckpointMismatch, Checkpoints
from worker.service import run_job

JOB = {"name": "ck", "data": {"name": "synthetic", "n_synthetic": 120}, "model": {"name": "logreg"}, "epochs": 2,
       "eval_every": 2, "early_stopping": {"enabled": False}}


def _train(tmp_path, db, config: dict):
    path = tmp_path / f"{config['name']}.json"
    path.write_text(json.dumps(config))
    return subprocess.run([sys.executable, "-m", "ivon_diag.cli", "train", str(path), "--db", f"sqlite:///{db}",
                           "--checkpoint-dir", str(tmp_path / "ck")], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)


def test_a_new_database_does_not_resume_the_old_runs_checkpoint(tmp_path):
    """The reported reproduction: train a; remove the database; train b (another architecture) → run 1 again."""
    db = tmp_path / "ivon-diag.db"
    a = _train(tmp_path, db, {**JOB, "name": "a"})
    assert a.returncode == 0, a.stderr
    uid_a = Store(f"sqlite:///{db}").get_run(1).uid
    db.unlink()
    b = _train(tmp_path, db, {**JOB, "name": "b", "model": {"name": "mlp", "hidden": [8]}})
    assert b.returncode == 0, b.stderr
    assert "resumed" not in b.stdout + b.stderr
    run_b = Store(f"sqlite:///{db}").get_run(1)
    assert run_b.status == "done" and run_b.uid != uid_a
    models = {p.parent.name: torch.load(p, weights_only=True)["model"] for p in (tmp_path / "ck").glob("*/model.pt")}
    assert set(models) == {uid_a, run_b.uid}  # both final models kept, each under its own run
    assert "3.weight" in models[run_b.uid] and "3.weight" not in models[uid_a]  # each its own architecture
    assert not list((tmp_path / "ck").glob("*/resume.pt"))  # ended runs keep no resume state


@pytest.fixture
def store(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    upgrade(make_engine(url))
    return Store(url)


def test_another_runs_or_configs_resume_state_is_refused(tmp_path, store):
    stranger = store.create_run("stranger", JOB, enqueue=False)
    run = store.create_run("victim", JOB, enqueue=False)
    foreign = Checkpoints(tmp_path / "ck", stranger.uid, JOB)
    foreign.save_resume({"step": 3})
    mine = Checkpoints(tmp_path / "ck", run.uid, JOB)
    mine.folder.mkdir(parents=True)
    shutil.copy(foreign.resume_path, mine.resume_path)  # copied across by hand
    with pytest.raises(CheckpointMismatch, match="belongs to another run"):
        mine.load_resume()
    assert run_job(store, run.id, tmp_path / "ck", log=lambda *_: None) == "failed"
    assert "belongs to another run" in store.get_run(run.id).error
    Checkpoints(tmp_path / "ck", run.uid, {**JOB, "epochs": 3}).save_resume({"step": 1})
    with pytest.raises(CheckpointMismatch, match="another config"):
        Checkpoints(tmp_path / "ck", run.uid, JOB).load_resume()
    (mine.resume_path).write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointMismatch, match="cannot be read"):
        mine.load_resume()
    with pytest.raises(ValueError, match="invalid run uid"):
        Checkpoints(tmp_path / "ck", "../etc", JOB)


def test_a_pickled_object_in_a_resume_state_is_not_executed(tmp_path, store):
    run = store.create_run("victim", JOB, enqueue=False)
    ck = Checkpoints(tmp_path / "ck", run.uid, JOB)

    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))

    ck.folder.mkdir(parents=True)
    torch.save({"run_uid": run.uid, "config_digest": ck.digest, "x": Boom()}, ck.resume_path)
    with pytest.raises(CheckpointMismatch, match="cannot be read"):
        ck.load_resume()


def test_the_final_model_is_downloadable_and_the_resume_state_removed(tmp_path, store):
    run = store.create_run("done", JOB, enqueue=False)
    client = TestClient(create_app(Settings(db=str(store.engine.url), checkpoint_dir=str(tmp_path / "ck")), store))
    assert client.get(f"/api/v1/runs/{run.id}/model").status_code == 404
    assert run_job(store, run.id, tmp_path / "ck", log=lambda *_: None) == "done"
    assert not (tmp_path / "ck" / run.uid / "resume.pt").exists()
    r = client.get(f"/api/v1/runs/{run.id}/model")
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    (tmp_path / "m.pt").write_bytes(r.content)
    model = torch.load(tmp_path / "m.pt", weights_only=True)
    assert model["step"] > 0 and set(model["model"]) == {"1.weight", "1.bias"}
    assert client.get(f"/api/v1/runs/{run.id}").json()["uid"] == run.uid
    assert client.get("/api/v1/runs/999/model").status_code == 404


def test_runs_and_export_commands(tmp_path):
    """`ivon-diag runs list|show|delete` and `ivon-diag export` as processes, with their errors."""
    db = tmp_path / "ivon-diag.db"
    assert _train(tmp_path, db, {**JOB, "name": "kept"}).returncode == 0
    assert _train(tmp_path, db, {**JOB, "name": "gone"}).returncode == 0
    store = Store(f"sqlite:///{db}")
    gone = store.get_run(2)

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "ivon_diag", *args, "--db", f"sqlite:///{db}"],
                              capture_output=True, text=True, timeout=120, cwd=tmp_path)

    listed = cli("runs", "list")
    assert listed.returncode == 0 and [ln.split()[-1] for ln in listed.stdout.splitlines()[1:]] == ["gone", "kept"]
    shown = json.loads(cli("runs", "show", "1").stdout)
    assert shown["name"] == "kept" and shown["last_evaluation"]["step"] == store.latest_step(1)
    assert shown["created_at"].endswith("Z") and "T" in shown["created_at"]  # as the API writes times
    out = cli("export", "1")
    assert out.returncode == 0 and out.stdout.splitlines()[0].startswith("idx,rank,score")
    assert len(out.stdout.splitlines()) == Store(f"sqlite:///{db}").get_run(1).n_examples + 1
    assert cli("export", "1", "--format", "parquet", "--out", str(tmp_path / "t.parquet")).returncode == 0
    assert (tmp_path / "t.parquet").read_bytes()[:4] == b"PAR1"
    bad = cli("export", "1", "--step", "soon")
    assert bad.returncode == 2 and "'soon' is neither a step nor 'latest'" in bad.stderr
    assert "run 9 not found" in cli("export", "9").stderr and "run 9 not found" in cli("runs", "show", "9").stderr
    assert (tmp_path / "ck" / gone.uid / "model.pt").exists()
    assert cli("runs", "delete", "2", "--checkpoint-dir", str(tmp_path / "ck")).returncode == 0
    assert not (tmp_path / "ck" / gone.uid).exists() and [r.id for r in store.list_runs()] == [1]


def test_a_run_deleted_through_the_api_loses_its_checkpoints_at_the_next_idle_worker(tmp_path):
    """The API may not see the workers' disk (compose mounts it read-only there): it leaves the deleted run's uid,
    and a worker, once idle, removes that run's folder; other runs' folders and forged uids are left alone."""
    from app.store.models import DeletedRun

    url = f"sqlite:///{tmp_path / 'd.db'}"
    upgrade(make_engine(url))
    store = Store(url)
    gone, kept = (store.create_run(n, {}, enqueue=False) for n in ("gone", "kept"))
    ck = tmp_path / "ck"
    for run in (gone, kept):
        store.set_run_status(run.id, "done")
        (ck / run.uid / "evaluations").mkdir(parents=True)
        (ck / run.uid / "model.pt").write_bytes(b"weights")
    (tmp_path / "outside").mkdir()
    with store.session(write=True) as s, s.begin():
        s.add(DeletedRun(uid="../outside"))  # not a uid: never a path
    client = TestClient(create_app(Settings(), store))
    auth = {"Authorization": f"Bearer {store.create_token('t')}"}
    assert client.delete(f"/api/v1/runs/{gone.id}", headers=auth).status_code == 204
    assert (ck / gone.uid).is_dir()  # the API process leaves the disk alone
    out = subprocess.run([sys.executable, "-m", "ivon_diag.cli", "--db", url, "worker", "--once", "--checkpoint-dir",
                          str(ck)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert not (ck / gone.uid).exists() and (ck / kept.uid / "model.pt").read_bytes() == b"weights"
    assert (tmp_path / "outside").is_dir() and f"removed the checkpoints of deleted run {gone.uid}" in out.stdout
