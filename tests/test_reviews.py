"""Label review: decisions stored per example (both backends), set and read through the API with a token, set from
the CLI, exported as a table and as a corrected data set that a job trains on again."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from app.store import NotFound, Store, make_engine, upgrade

ROOT = Path(__file__).parents[1]


def _run(store, n=20, classes=4):
    run = store.create_run("review", {"name": "review"}, enqueue=False)
    store.add_examples(run.id, range(n), labels=[i % classes for i in range(n)], flipped=[i == 3 for i in range(n)])
    return run.id


def test_decisions_are_stored_replaced_cleared_and_applied_to_the_labels(store):
    rid = _run(store)
    assert store.set_review(rid, 3, "relabel", 1, note="looks like a one").label == 1
    store.set_review(rid, 5, "drop")
    store.set_review(rid, 7, "keep")
    store.set_review(rid, 7, "drop", note="=HYPERLINK(\"http://x\")")  # replaces the keep
    store.set_review(rid, 9, "keep")
    store.clear_review(rid, 9)
    store.clear_review(rid, 10)  # never reviewed: fine
    rows = store.reviews(rid)
    assert [(r.idx, r.given_label, r.flipped, r.decision, r.label) for r in rows] == [
        (3, 3, True, "relabel", 1), (5, 1, False, "drop", None), (7, 3, False, "drop", None)]
    assert rows[0].updated_at.tzinfo is not None or store.engine.dialect.name == "sqlite"
    keep, labels = store.corrected_labels(rid)
    assert 5 not in keep and 7 not in keep and len(keep) == 18
    assert labels[keep.index(3)] == 1 and labels[keep.index(4)] == 0
    table = store.reviews_table(rid)
    assert table["note"] == ["looks like a one", None, "'=HYPERLINK(\"http://x\")"]  # not run by a spreadsheet


@pytest.mark.parametrize("args,match", [
    ((3, "fix"), "decision must be one of keep, relabel, drop"),
    ((3, "relabel"), "needs the new label"),
    ((3, "keep", 1), "label goes with decision 'relabel' only"),
    ((3, "relabel", 4), r"label 4 is not a class of run \d+ \(0 to 3\)"),
    ((3, "relabel", -1), "is not a class"),
    ((3, "relabel", 3), "labeled 3 already"),
    ((3, "keep", None, "x" * 2001), "note must be at most 2000"),
    ((3, "keep", None, "a\x00b"), "without NUL"),
])
def test_bad_decisions_are_refused_with_the_reason_and_nothing_written(store, args, match):
    rid = _run(store)
    store.set_review(rid, 3, "drop")
    with pytest.raises(ValueError, match=match):
        store.set_review(rid, *args)
    assert [(r.idx, r.decision) for r in store.reviews(rid)] == [(3, "drop")]
    with pytest.raises(NotFound, match="example 99 of run"):
        store.set_review(rid, 99, "drop")
    with pytest.raises(NotFound, match="run 987654 not found"):
        store.set_review(987654, 0, "drop")


def test_the_api_sets_lists_exports_and_clears_decisions_with_a_token(store):
    client = TestClient(create_app(Settings(), store), raise_server_exceptions=False)
    auth = {"Authorization": f"Bearer {store.create_token(f'r{id(client)}')}"}
    rid = _run(store)
    url = f"/api/v1/runs/{rid}/examples/3/review"
    assert client.put(url, json={"decision": "drop"}).status_code == 401  # writes need a token
    r = client.put(url, json={"decision": "relabel", "label": 2, "note": "a two"}, headers=auth)
    assert r.status_code == 200 and r.json()["label"] == 2 and r.json()["updated_at"].endswith("Z")
    assert client.put(f"/api/v1/runs/{rid}/examples/4/review", json={"decision": "drop"}, headers=auth).status_code \
        == 200
    conflict = client.put(url, json={"decision": "relabel", "label": 9}, headers=auth)  # not a class of this run
    assert conflict.status_code == 409 and "label 9 is not a class" in conflict.json()["detail"]
    for body, field in (({"decision": "relabel"}, "label"), ({"decision": "drop", "label": 1}, "label"),
                        ({"decision": "fix"}, "decision"), ({"decision": "keep", "label": "1"}, "label"),
                        ({"decision": "keep", "extra": 1}, "extra"),
                        ({"decision": "keep", "note": "x" * 3000}, "note")):
        bad = client.put(url, json=body, headers=auth)
        assert bad.status_code == 422 and field in str(bad.json()["detail"]), (body, bad.json())
    page = client.get(f"/api/v1/runs/{rid}/reviews").json()
    assert page["total"] == 2 and page["counts"] == {"keep": 0, "relabel": 1, "drop": 1}
    assert [(i["idx"], i["decision"], i["label"]) for i in page["items"]] == [(3, "relabel", 2), (4, "drop", None)]
    csv = client.get(f"/api/v1/runs/{rid}/reviews.csv")
    assert csv.status_code == 200 and csv.text.splitlines()[0] == "idx,source,given_label,flipped,decision,label,note"
    assert csv.text.splitlines()[1] == "3,,3,True,relabel,2,a two"
    assert client.get(f"/api/v1/runs/{rid}/reviews.parquet").status_code == 200
    assert client.delete(url, headers=auth).status_code == 204
    assert client.get(f"/api/v1/runs/{rid}/reviews").json()["total"] == 1
    assert client.put(f"/api/v1/runs/{rid}/examples/77/review", json={"decision": "drop"}, headers=auth).status_code \
        == 404
    assert client.get("/api/v1/runs/987654/reviews").status_code == 404


def test_a_reviewed_run_exports_a_corrected_data_set_that_a_job_trains_on(tmp_path, monkeypatch):
    from worker.service import run_job

    url = f"sqlite:///{tmp_path / 'r.db'}"
    upgrade(make_engine(url))
    store = Store(url)
    config = {"name": "flips", "data": {"name": "digits"}, "model": {"name": "mlp", "hidden": [16]}, "epochs": 2,
              "eval_every": 1000, "label_noise": {"fraction": 0.05}, "early_stopping": {"enabled": False}}
    run = store.create_run("flips", config)
    assert run_job(store, run.id, tmp_path / "ck", log=lambda *_: None) == "done"
    rows = store.examples_table(run.id, store.resolve_step(run.id))
    flipped = sorted(i for i, f in zip(rows["idx"], rows["flipped"]) if f)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "ivon_diag.cli", *args, "--db", url], env=env,
                              capture_output=True, text=True, timeout=120)

    original = {e: store.get_example(run.id, e).original_label for e in flipped}
    for i in flipped[1:-1]:
        store.set_review(run.id, i, "relabel", original[i])
    done = cli("review", str(run.id), str(flipped[0]), "--relabel", str(original[flipped[0]]))
    assert done.returncode == 0 and f"-> {original[flipped[0]]}" in done.stdout, done.stderr
    assert cli("review", str(run.id), str(flipped[-1]), "--drop").returncode == 0
    bad = cli("review", str(run.id), str(flipped[0]), "--relabel", "99")
    assert bad.returncode != 0 and "label 99 is not a class" in bad.stderr
    out = tmp_path / "corrected.npz"
    done = cli("export", str(run.id), "--corrected", str(out))
    assert done.returncode == 0 and f"({len(flipped) - 1} relabeled, 1 dropped)" in done.stderr, done.stderr
    z = np.load(out)
    n = store.get_run(run.id).n_examples  # every training example, the calibration split's too (never scored)
    assert n == len(rows["idx"]) + int(0.05 * n)
    assert len(z["y_train"]) == len(z["x_train"]) == len(z["idx"]) == n - 1 and z["x_train"].shape[1:] == (1, 8, 8)
    assert flipped[-1] not in z["idx"].tolist()
    by_idx = dict(zip(z["idx"].tolist(), z["y_train"].tolist()))
    assert all(by_idx[i] == original[i] for i in flipped[:-1])  # the flips undone
    assert float(z["x_train"].max()) <= 1.0  # the features as read (digits / 16), not standardized
    table = cli("export", str(run.id), "--reviews")
    assert table.returncode == 0 and table.stdout.count("relabel") == len(flipped) - 1
    again = store.create_run("corrected", {**config, "label_noise": {"fraction": 0.0},
                                           "data": {"name": "npz", "path": str(out)}})
    monkeypatch.setenv("IVON_DIAG_DATA_ROOTS", str(tmp_path))
    assert run_job(store, again.id, tmp_path / "ck", log=lambda *_: None) == "done"
    assert store.get_run(again.id).n_examples == n - 1


def test_a_csv_run_keeps_lines_and_class_names_and_exports_a_corrected_csv(tmp_path, monkeypatch):
    """Wine as a CSV with class names: each example knows its line, the run its class names; the corrected CSV is
    the file with the decided lines changed (names stay names), and a job reads it back."""
    from sklearn.datasets import load_wine

    from worker.corrected import write_corrected
    from worker.service import run_job

    monkeypatch.setenv("IVON_DIAG_DATA_ROOTS", str(tmp_path))
    wine = load_wine()
    names = ["barolo", "grignolino", "barbera"]
    lines = [",".join(wine.feature_names) + ",cultivar"]
    lines += [",".join(f"{v:g}" for v in row) + f",{names[y]}" for row, y in zip(wine.data, wine.target)]
    path = tmp_path / "wine.csv"
    path.write_text("\n".join(lines) + "\n")
    url = f"sqlite:///{tmp_path / 'w.db'}"
    upgrade(make_engine(url))
    store = Store(url)
    config = {"data": {"name": "csv", "path": str(path), "label_column": "cultivar"}, "epochs": 2,
              "model": {"name": "mlp", "hidden": [8]}, "eval_every": 1000, "early_stopping": {"enabled": False}}
    run = store.create_run("wine", config)
    assert run_job(store, run.id, tmp_path / "ck", log=lambda *_: None) == "done"
    classes = store.get_run(run.id).class_names
    assert classes == sorted(names)  # labels numbered in the names' sorted order
    ex = store.get_example(run.id, 0)
    line = int(ex.source.split()[1])  # "line N" of the file, the header being line 1
    assert lines[line - 1].endswith("," + classes[ex.label])
    # its row as read (not standardized), named by the header, for the example page
    assert store.get_run(run.id).feature_names == list(wine.feature_names)
    assert ex.features == pytest.approx([float(v) for v in lines[line - 1].split(",")[:-1]], rel=1e-6)
    _, top = store.examples_at(run.id, k=3)
    assert all(r.source.startswith("line ") for r in top)
    drop, relabel = store.get_example(run.id, 1), store.get_example(run.id, 2)
    store.set_review(run.id, 1, "drop")
    store.set_review(run.id, 2, "relabel", (relabel.label + 1) % 3)
    # the API's example route: what the example page shows, by name
    client = TestClient(create_app(Settings(), store), raise_server_exceptions=False)
    d = client.get(f"/api/v1/runs/{run.id}/examples/2/detail").json()
    row = lines[int(d["source"].split()[1]) - 1].split(",")
    assert d["features"] == dict(zip(wine.feature_names, map(float, row[:-1])))  # as written, no float32 digits
    assert list(d["features"]) == list(wine.feature_names) and d["label_name"] == row[-1] == classes[d["label"]]
    assert len(d["probs"]) == 3 and sum(d["probs"]) == pytest.approx(1) and d["probs_evals"] >= 1
    assert d["predicted"] == max(range(3), key=d["probs"].__getitem__)
    assert d["predicted_name"] == classes[d["predicted"]]
    assert d["review"]["decision"] == "relabel" and d["review"]["label"] == (relabel.label + 1) % 3
    assert d["image_url"] is None and d["flipped"] is False  # the job flipped no label
    assert client.get(f"/api/v1/runs/{run.id}/examples/0/detail").json()["review"] is None
    for url in (f"/api/v1/runs/{run.id}/examples/100000/detail", "/api/v1/runs/987654/examples/0/detail"):
        missing = client.get(url)
        assert missing.status_code == 404 and "not found" in missing.json()["detail"]
    out = tmp_path / "fixed.csv"
    counts = write_corrected(store, run.id, out)
    assert counts == {"kept": store.get_run(run.id).n_examples - 1, "relabeled": 1, "dropped": 1}
    fixed = out.read_text().splitlines()
    assert len(fixed) == len(lines) - 1 and fixed[0] == lines[0]
    assert lines[int(drop.source.split()[1]) - 1] not in fixed
    changed = lines[int(relabel.source.split()[1]) - 1].rsplit(",", 1)[0] + "," + classes[(relabel.label + 1) % 3]
    assert changed in fixed
    again = store.create_run("fixed", {**config, "data": {**config["data"], "path": str(out)}})
    assert run_job(store, again.id, tmp_path / "ck", log=lambda *_: None) == "done"
    with pytest.raises(ValueError, match="needs a run on a CSV"):
        digits = store.create_run("digits", {"data": {"name": "digits"}}, enqueue=False)
        write_corrected(store, digits.id, tmp_path / "d.csv")
