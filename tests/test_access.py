"""What a job may read and import on a worker: data paths confined to IVON_DIAG_DATA_ROOTS (symlinks resolved,
checked before the file is opened), factories only from IVON_DIAG_FACTORY_MODULES (checked before any import),
and errors that never carry the file's contents back to the API."""

import sys

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from app.store import Store, make_engine, upgrade
from worker.config import parse_config
from worker.data import load_dataset
from worker.service import run_job


@pytest.fixture
def roots(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setenv("IVON_DIAG_DATA_ROOTS", str(data))
    secret = tmp_path / "secret.csv"
    secret.write_text("a,label\n1,hunter2\n")
    return data, secret


def _load(**data):
    return load_dataset(parse_config({"data": data}).data, seed=0)


def test_paths_outside_the_data_roots_are_refused_before_opening(roots):
    data, secret = roots
    (data / "link.csv").symlink_to(secret)
    for field, kw in (("data.path", {"path": str(secret)}), ("data.path", {"path": str(data / ".." / "secret.csv")}),
                      ("data.path", {"path": str(data / "link.csv")}), ("data.path", {"path": "/etc/passwd"}),
                      ("data.path", {"path": str(data / ".." / "missing.csv")}),
                      ("data.test_path", {"path": str(data / "x.csv"), "test_path": str(secret)})):
        with pytest.raises(ValueError, match=f"{field} .* is outside the worker's data roots") as err:
            _load(name="csv", **kw)
        assert "hunter2" not in str(err.value) and "not found" not in str(err.value)
    for name in ("npz", "image_folder", "mnist", "cifar10"):
        with pytest.raises(ValueError, match="outside the worker's data roots"):
            _load(name=name, path="/etc")
    (data / "ok.csv").write_text("a,label\n" + "".join(f"{i},{i % 2}\n" for i in range(20)))
    assert _load(name="csv", path=str(data / "ok.csv")).n == 16  # inside: read (a 20% test split)


def test_factories_only_from_allowed_modules_and_nothing_imported_before(tmp_path, monkeypatch, capsys):
    (tmp_path / "sideeffect.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'w').close()\n"
                                            "def make(seed):\n    return None, ([[0.0]], [0]), None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("IVON_DIAG_FACTORY_MODULES", "")
    with pytest.raises(ValueError, match="module 'this' is not in IVON_DIAG_FACTORY_MODULES .*factories are off"):
        _load(name="factory", factory="this:x")
    assert "this" not in sys.modules and capsys.readouterr().out == ""
    monkeypatch.setenv("IVON_DIAG_FACTORY_MODULES", "userfactory, side")
    with pytest.raises(ValueError, match="'sideeffect' is not in .*admits userfactory, side"):
        _load(name="factory", factory="sideeffect:make")  # a prefix of the name is not a prefix of the module
    assert not (tmp_path / "imported").exists()
    monkeypatch.setenv("IVON_DIAG_FACTORY_MODULES", "sideeffect")
    with pytest.raises(ValueError, match="inputs and labels|must return|test"):
        _load(name="factory", factory="sideeffect:make")
    assert (tmp_path / "imported").exists()  # admitted: imported and called


def test_the_reported_disclosure_stores_no_file_content(tmp_path, roots):
    """A write-token holder queued a csv job on /etc/passwd and read its first line back in the run's error."""
    url = f"sqlite:///{tmp_path / 'a.db'}"
    upgrade(make_engine(url))
    store = Store(url)
    token = store.create_token("t")
    client = TestClient(create_app(Settings(db=url), store))
    auth = {"Authorization": f"Bearer {token}"}
    ids = []
    for path in ("/etc/passwd", str(roots[1])):
        r = client.post("/api/v1/runs", headers=auth, json={"config": {"data": {"name": "csv", "path": path}}})
        assert r.status_code == 201
        ids.append(r.json()["id"])
    (roots[0] / "passwd.csv").write_text(roots[1].read_text())  # inside the roots, not a data file
    r = client.post("/api/v1/runs", headers=auth,
                    json={"config": {"data": {"name": "csv", "path": str(roots[0] / "passwd.csv")}}})
    ids.append(r.json()["id"])
    for run_id in ids:
        assert run_job(store, run_id, tmp_path / "ck", log=lambda *_: None) == "failed"
        error = client.get(f"/api/v1/runs/{run_id}").json()["error"]
        assert "root:" not in error and "hunter2" not in error, error
    assert "outside the worker's data roots" in client.get(f"/api/v1/runs/{ids[0]}").json()["error"]
