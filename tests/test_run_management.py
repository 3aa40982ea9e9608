"""Runs a practitioner manages: rename, tags and notes (store on both backends, API, CLI), the list filtered by
status, tag and name with each run's latest metrics, and the runs page in Chromium."""

import contextlib
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings
from app.store import NotFound, Store, make_engine, upgrade

ROOT = Path(__file__).parents[1]


def _runs(store, u=""):
    """Three runs; ``u`` makes names unique where tests share the session's PostgreSQL database."""
    a = store.create_run(f"baseline_lr{u}", {}, enqueue=False)
    b = store.create_run(f"Wide net{u}", {}, enqueue=False)
    c = store.create_run(f"50%_off{u}", {}, enqueue=False)
    store.write_evaluation(b.id, 10, loo=0.5, metrics={"test_nll": 0.4, "test_accuracy": 0.9, "loo_se": 0.01})
    store.write_evaluation(b.id, 20, loo=0.3, metrics={"test_nll": 0.35, "test_accuracy": 0.92, "loo_se": 0.01})
    return a, b, c


@contextlib.contextmanager
def _served_page(url: str, errors: list):
    """The dashboard served from ``url`` as a process, and a Chromium page whose console errors land in ``errors``."""
    from playwright.sync_api import sync_playwright

    from tests.conftest import free_port, serving

    port = free_port()
    with serving(["--db", url, "serve", "--port", str(port)], port) as base, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium"),
                                    args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        yield base, browser, page


def test_names_tags_and_notes_are_set_checked_and_filter_the_list(store):
    u = uuid.uuid4().hex[:8]
    a, b, c = _runs(store, u)
    store.update_run(a.id, tags=["lr:0.1", f"sweep_{u}", f"sweep_{u}"], notes="first try")
    store.update_run(b.id, name=f"wide net {u} (final)", tags=[f"sweep-{u}"])
    run = store.get_run(a.id)
    assert run.tags == ["lr:0.1", f"sweep_{u}"] and run.notes == "first try" and run.name == f"baseline_lr{u}"
    assert [r.id for r in store.list_runs(tag=f"sweep_{u}")] == [a.id]  # "_" is no wildcard: sweep-… is not it
    assert [r.id for r in store.list_runs(tag=f"sweep-{u}")] == [b.id]
    assert [r.id for r in store.list_runs(name=f"WIDE NET {u}")] == [b.id]  # any case
    assert [r.id for r in store.list_runs(name=f"%_off{u}")] == [c.id]  # % and _ are literal
    assert store.list_runs(name=f"x_off{u}") == []
    assert store.count_runs(tag=f"sweep_{u}") == 1 and store.count_runs() >= 3
    latest = store.latest_evaluations([a.id, b.id, c.id])
    assert list(latest) == [b.id] and latest[b.id].step == 20 and latest[b.id].metrics["test_nll"] == 0.35
    store.write_evaluation(b.id, 30, loo=0.3, metrics={})  # tied with step 20: the earliest step is the best
    store.write_evaluation(b.id, 40, loo=0.4, metrics={})
    assert store.best_loo([a.id, b.id, c.id]) == {b.id: (20, 0.3)} and store.best_loo([]) == {}
    for kwargs, field in (({"name": ""}, "name"), ({"name": "   "}, "name"), ({"name": "x\x00"}, "name"),
                          ({"tags": ["has space"]}, "tags"), ({"tags": ["t"] * 21}, "tags"),
                          ({"tags": ['a"b']}, "tags"), ({"notes": "x" * 10_001}, "notes")):
        with pytest.raises(ValueError, match=f"^{field}:"):
            store.update_run(a.id, **kwargs)
    assert store.get_run(a.id).tags == ["lr:0.1", f"sweep_{u}"]  # nothing written
    with pytest.raises(NotFound):
        store.update_run(987654, name="x")


def test_the_api_patches_a_run_with_a_token_and_filters_the_list(store):
    client = TestClient(create_app(Settings(), store), raise_server_exceptions=False)
    auth = {"Authorization": f"Bearer {store.create_token(f'm{id(client)}')}"}
    u = uuid.uuid4().hex[:8]
    a, b, _ = _runs(store, u)
    url = f"/api/v1/runs/{a.id}"
    assert client.patch(url, json={"name": "x"}).status_code == 401
    r = client.patch(url, json={"tags": [f"keep{u}", "v2"], "notes": "seed 0"}, headers=auth)
    assert r.status_code == 200 and r.json()["tags"] == [f"keep{u}", "v2"] and r.json()["name"] == f"baseline_lr{u}"
    assert client.patch(url, json={"name": "renamed"}, headers=auth).json()["tags"] == [f"keep{u}", "v2"]
    for body, field in (({"name": ""}, "name"), ({"name": "\x00"}, "name"), ({"name": " \x00 "}, "name"),
                        ({"tags": ["a b"]}, "tags"), ({"tags": "keep"}, "tags"),
                        ({"notes": 5}, "notes"), ({"status": "done"}, "status")):
        bad = client.patch(url, json=body, headers=auth)
        assert bad.status_code == 422 and field in str(bad.json()["detail"]), (body, bad.json())
    assert [r["id"] for r in client.get(f"/api/v1/runs?tag=keep{u}").json()] == [a.id]
    assert [r["id"] for r in client.get(f"/api/v1/runs?q=wide%20net{u}").json()] == [b.id]
    page = client.get(f"/api/v1/runs?q={u}&limit=1")  # the page, how many match (a: renamed), the limit given
    assert len(page.json()) == 1 and page.headers["X-Total-Count"] == "2" and page.headers["X-Limit"] == "1"
    capped = client.get(f"/api/v1/runs?q={u}&limit=100000")
    assert len(capped.json()) == 2 and capped.headers["X-Limit"] == "1000"  # the cap says so
    assert client.get("/api/v1/runs?tag=a%20b").status_code == 422
    assert client.patch("/api/v1/runs/987654", json={"name": "x"}, headers=auth).status_code == 404


def test_the_cli_renames_tags_annotates_and_lists(tmp_path):
    url = f"sqlite:///{tmp_path / 'c.db'}"
    upgrade(make_engine(url))
    store = Store(url)
    a, b, _ = _runs(store)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "ivon_diag.cli", "runs", *args, "--db", url], env=env,
                              capture_output=True, text=True, timeout=120)

    assert cli("rename", str(b.id), "wide-final").returncode == 0
    assert cli("tag", str(b.id), "best", "sweep:3").stdout.strip() == f"run {b.id}: wide-final [best, sweep:3]"
    assert cli("tag", str(b.id), "sweep:3", "--remove").stdout.strip() == f"run {b.id}: wide-final [best]"
    assert cli("note", str(a.id), "diverged at lr 1").returncode == 0 and store.get_run(a.id).notes == \
        "diverged at lr 1"
    listed = cli("list", "--tag", "best")
    assert listed.returncode == 0 and "wide-final [best]" in listed.stdout and "0.3000" in listed.stdout
    assert "0.3500" in listed.stdout and "baseline_lr" not in listed.stdout
    bad = cli("tag", str(b.id), "no spaces please")
    assert bad.returncode != 0 and "tags:" in bad.stderr


@pytest.mark.skipif(not shutil.which("chromium"), reason="Debian's chromium is not installed")
def test_the_runs_page_filters_pages_shows_metrics_and_compares_the_ticked(tmp_path):
    url = f"sqlite:///{tmp_path / 'p.db'}"
    upgrade(make_engine(url))
    store = Store(url)
    a, b, _ = _runs(store)
    store.update_run(b.id, tags=["best", "pair"])
    store.update_run(a.id, tags=["pair"])
    for i in range(105):  # more than a page
        store.create_run(f"bulk {i}", {}, enqueue=False)
    errors = []
    with _served_page(url, errors) as (base, browser, page):
        page.goto(f"{base}/")
        assert "108 runs, 1 to 100" in page.inner_text("#filter")
        assert page.eval_on_selector_all("#runs tr", "els => els.length") == 101
        page.click("#older")
        page.wait_for_selector("#newer")
        assert page.eval_on_selector_all("#runs tr", "els => els.length") == 9
        page.goto(f"{base}/?tag=best")
        row = page.inner_text("#runs tr:nth-child(2)")
        assert "Wide net" in row and "best" in row and "0.3000 ± 0.01" in row and "0.3500" in row and "0.920" in row
        assert page.inner_text("#runs tr:nth-child(2) td.best") == "0.3000 (step 20)"
        page.goto(f"{base}/?q=baseline")
        assert page.eval_on_selector_all("#runs tr", "els => els.length") == 2
        page.goto(f"{base}/?status=done")
        assert "0 runs" in page.inner_text("#filter")
        page.goto(f"{base}/?tag=pair")
        page.check(f".pick[value='{a.id}']")
        page.check(f".pick[value='{b.id}']")
        assert page.get_attribute("#compare-link", "href") == f"/compare?ids={b.id},{a.id}"
        # live: a queued run on the page starts; the row follows without a reload, the ticks stay
        live = store.create_run("live", {}, enqueue=False)
        store.update_run(live.id, tags=["pair"])
        page.goto(f"{base}/?tag=pair")
        page.check(f".pick[value='{a.id}']")
        page.check(f".pick[value='{b.id}']")
        store.set_run_status(live.id, "running")
        store.write_evaluation(live.id, 5, loo=0.7, metrics={"test_nll": 0.8})
        page.wait_for_function("document.body.dataset.refreshed !== undefined", timeout=15000)
        row = page.inner_text(f"#runs tr:has(.pick[value='{live.id}'])")
        assert "running" in row and "0.7000" in row
        assert page.is_checked(f".pick[value='{a.id}']") and page.is_checked(f".pick[value='{b.id}']")
        page.click("#compare-link")
        page.wait_for_selector("#compare .main-svg")
        page.wait_for_selector("#compare-accuracy .main-svg")
        traces = page.evaluate("document.getElementById('compare').data.map(t => [t.name, t.line.color])")
        assert len(traces) == 6 and len({c for _, c in traces[:3]}) == 1 and traces[0][1] != traces[3][1]
        assert [n.endswith(k) for (n, _), k in zip(traces[:3], ("LOO", "test NLL", "training NLL"))] == [True] * 3
        page.screenshot(path=str(tmp_path / "compare.png"), full_page=True)
        page.goto(f"{base}/")
        page.screenshot(path=str(tmp_path / "runs.png"))
        browser.close()
    assert errors == []


@pytest.mark.skipif(not shutil.which("chromium"), reason="Debian's chromium is not installed")
def test_a_run_is_renamed_tagged_annotated_and_deleted_from_its_page(tmp_path):
    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(make_engine(url))
    store = Store(url)
    a, b, _ = _runs(store)
    token = store.create_token("page")
    errors = []
    with _served_page(url, errors) as (base, browser, page):
        page.on("dialog", lambda d: d.accept())
        page.goto(f"{base}/runs/{b.id}")
        page.click("#manage summary")
        page.fill("#m-name", "wide net, final")
        page.fill("#m-tags", "keep  lr:0.1")
        page.fill("#m-notes", "seed 0 <b>only</b>")
        page.click("#m-save")  # no token yet: refused, nothing changed
        page.wait_for_function("document.getElementById('m-error').textContent !== ''")
        assert "token was refused" in page.inner_text("#m-error") and store.get_run(b.id).name == "Wide net"
        page.fill("#m-token", token)
        page.fill("#m-tags", "keep has,comma")
        page.click("#m-save")  # a bad tag: the API's reason, by field, and nothing written
        page.wait_for_function("document.getElementById('m-error').textContent.startsWith('not saved')")
        assert "tags" in page.inner_text("#m-error") or "1:" in page.inner_text("#m-error")
        assert store.get_run(b.id).tags is None
        page.fill("#m-tags", "keep  lr:0.1")
        with page.expect_navigation():
            page.click("#m-save")
        run = store.get_run(b.id)
        assert (run.name, run.tags, run.notes) == ("wide net, final", ["keep", "lr:0.1"], "seed 0 <b>only</b>")
        assert page.inner_text("#run-name") == "wide net, final" and page.inner_text("#notes") == "seed 0 <b>only</b>"
        page.click("#manage summary")
        with page.expect_navigation():
            page.click("#m-delete")  # confirmed in the dialog
        assert page.url == f"{base}/"
        with pytest.raises(NotFound):
            store.get_run(b.id)
        assert store.get_run(a.id).name.startswith("baseline")  # the others stay
        browser.close()
    assert [e for e in errors if "401" not in e and "Unauthorized" not in e and "422" not in e] == []
