"""The REST API on both backends: reads, token-protected writes, validation, 404s, caps, no stack traces."""

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.main import create_app
from app.settings import Settings


@pytest.fixture
def api(store):
    client = TestClient(create_app(Settings(), store), raise_server_exceptions=False)
    token = store.create_token(f"t{id(client)}")
    return client, store, {"Authorization": f"Bearer {token}"}


def _run_with_data(store):
    run = store.create_run("<script>alert(1)</script>", {"name": "x"}, enqueue=False)
    store.add_examples(
        run.id,
        range(300),
        labels=[i % 10 for i in range(300)],
        flipped=[i % 9 == 0 for i in range(300)],
        thumbnails=[b"\x89PNG fake" if i == 3 else None for i in range(300)],
    )
    for step in (10, 20):
        s = np.random.default_rng(step).random(300)
        store.write_evaluation(
            run.id,
            step,
            loo=0.5 - step / 100,
            metrics={"test_nll": 0.4},
            idx=np.arange(300),
            scores=s,
            loo_losses=s,
            prob_label=1 - s,
        )
    return run


def test_run_page_names_a_device_that_a_queued_job_waits_for(api):
    client, store, _ = api
    gpu = store.create_run("gpu", {"device": "cuda:1"})
    assert "device cuda:1: waits for a worker that has it" in client.get(f"/runs/{gpu.id}").text
    plain = store.create_run("plain", {"device": "auto"})
    assert 'id="device"' not in client.get(f"/runs/{plain.id}").text


def test_reads(api):
    client, store, _ = api
    run = _run_with_data(store)
    assert client.get(f"/api/v1/runs/{run.id}").json()["name"] == "<script>alert(1)</script>"
    assert run.id in [r["id"] for r in client.get("/api/v1/runs", params={"limit": 5000}).json()]
    pts = client.get(f"/api/v1/runs/{run.id}/metrics/loo").json()["points"]
    assert [p["step"] for p in pts] == [10, 20]
    assert client.get(f"/api/v1/runs/{run.id}/metrics/loo", params={"since_step": 10}).json()["points"][0]["step"] == 20
    page = client.get(f"/api/v1/runs/{run.id}/examples", params={"limit": 5000}).json()
    assert page["step"] == 20 and len(page["items"]) == 300 and page["items"][0]["rank"] == 0
    assert page["limit"] == 1000 and page["total"] == 300  # the cap said, and how many there are
    least = client.get(f"/api/v1/runs/{run.id}/examples", params={"order": "least", "limit": 3, "step": 10}).json()
    assert [i["rank"] for i in least["items"]] == [299, 298, 297]
    hist = client.get(f"/api/v1/runs/{run.id}/examples/7").json()
    assert [h["step"] for h in hist] == [10, 20]
    assert {(h["label"], h["flipped"]) for h in hist} == {(7, False)}  # history rows carry the example's labels
    assert [h["loo_loss_evals"] for h in hist] == [1, 2]
    s10, s20 = (np.random.default_rng(step).random(300) for step in (10, 20))
    assert hist[1]["loo_loss_mean"] == pytest.approx((s10[7] + s20[7]) / 2, rel=1e-6)
    suspects = client.get(f"/api/v1/runs/{run.id}/examples", params={"by": "loo_mean", "limit": 5}).json()
    assert suspects["by"] == "loo_mean"
    assert [i["idx"] for i in suspects["items"]] == np.argsort(-(s10 + s20) / 2, kind="stable")[:5].tolist()
    assert [i["rank"] for i in suspects["items"]] == [0, 1, 2, 3, 4]  # the rank by the mean, as asked
    tail = client.get(f"/api/v1/runs/{run.id}/examples", params={"by": "loo_mean", "order": "least", "limit": 2})
    assert [i["rank"] for i in tail.json()["items"]] == [299, 298]
    assert client.get(f"/api/v1/runs/{run.id}/examples", params={"by": "loss"}).status_code == 422
    unevaluated = client.get(f"/api/v1/runs/{run.id}/examples", params={"by": "loo_mean", "step": 15})
    assert unevaluated.status_code == 404 and "no evaluation at step 15" in unevaluated.json()["detail"]
    img = client.get(f"/api/v1/runs/{run.id}/examples/3/image")
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"
    assert client.get(f"/api/v1/runs/{run.id}/examples/4/image").status_code == 404
    with_image = client.get(f"/api/v1/runs/{run.id}/examples/3/detail").json()
    assert client.get(with_image["image_url"]).content == img.content and with_image["features"] is None
    assert client.get(f"/api/v1/runs/{run.id}/examples/4/detail").json()["image_url"] is None
    evals = client.get(f"/api/v1/runs/{run.id}/evaluations?limit=99999")
    assert len(evals.json()) == 2 and evals.headers["X-Limit"] == "10000"  # the cap is said
    assert client.get("/openapi.json").status_code == 200 and client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}


def test_unknown_ids_and_bad_parameters(api):
    client, _, _ = api
    r = client.get("/api/v1/runs/987654")
    assert r.status_code == 404 and "987654" in r.json()["detail"]
    assert client.get("/api/v1/runs/987654/examples").status_code == 404
    assert client.get("/api/v1/runs/987654/examples", params={"by": "loo_mean"}).status_code == 404
    assert client.get("/api/v1/runs/abc").status_code == 422
    bad = client.get("/api/v1/runs", params={"status": "sleeping", "limit": -1})
    assert bad.status_code == 422 and {e["loc"][-1] for e in bad.json()["detail"]} == {"status", "limit"}


def test_writes_need_a_valid_token(api):
    client, store, auth = api
    body = {"config": {"name": "api-run", "data": {"name": "synthetic"}, "epochs": 1}}
    assert client.post("/api/v1/runs", json=body).status_code == 401
    assert client.post("/api/v1/runs", json=body, headers={"Authorization": "Bearer nope"}).status_code == 403
    created = client.post("/api/v1/runs", json=body, headers=auth)
    assert created.status_code == 201 and created.json()["status"] == "queued"
    run_id = created.json()["id"]
    assert store.get_job_for_run(run_id).state == "queued"
    assert client.post(f"/api/v1/runs/{run_id}/stop").status_code == 401
    stopped = client.post(f"/api/v1/runs/{run_id}/stop", headers=auth).json()
    assert stopped["stop_requested"] and stopped["status"] == "cancelled"
    invalid = client.post("/api/v1/runs", json={"config": {"epochs": 0, "model": {"name": "gpt"}}}, headers=auth)
    assert invalid.status_code == 422  # one shape for every 422: FastAPI's list, each error at its field
    assert {tuple(e["loc"]) for e in invalid.json()["detail"]} == {("body", "config", "epochs"),
                                                                  ("body", "config", "model", "name")}


def test_reads_can_require_a_token_and_errors_hide_internals(store):
    client = TestClient(create_app(Settings(read_requires_token=True), store), raise_server_exceptions=False)
    assert client.get("/api/v1/runs").status_code == 401

    def boom(*a, **k):
        raise RuntimeError("secret internals")

    open_client = TestClient(create_app(Settings(), store), raise_server_exceptions=False)
    store.list_runs, original = boom, store.list_runs
    try:
        r = open_client.get("/api/v1/runs")
    finally:
        store.list_runs = original
    assert r.status_code == 500 and "secret" not in r.text and "Traceback" not in r.text


def test_serve_command_answers_over_http(tmp_path):
    import httpx

    from app.store import make_engine, upgrade
    from tests.conftest import free_port, serving

    url = f"sqlite:///{tmp_path / 's.db'}"
    upgrade(make_engine(url))
    port = free_port()
    with serving(["--db", url, "serve", "--port", str(port)], port) as base:
        assert httpx.get(f"{base}/readyz").json() == {"status": "ready"}
        assert httpx.get(f"{base}/api/v1/runs").json() == []


def test_hooks_endpoints_and_exports(api):
    import io

    import pyarrow.parquet as pq

    client, store, auth = api
    run = _run_with_data(store)
    assert client.post("/api/v1/hooks", json={"url": "http://127.0.0.1:9/x", "events": ["finished"]}).status_code == 401
    made = client.post("/api/v1/hooks", json={"url": "http://93.184.215.14/x", "events": ["finished"],
                                              "run_id": run.id},
                       headers=auth)
    assert made.status_code == 201 and len(made.json()["secret"]) == 64
    listed = client.get("/api/v1/hooks", params={"run_id": run.id}, headers=auth).json()
    assert [h["id"] for h in listed] == [made.json()["id"]] and "secret" not in listed[0]
    refused = client.post("/api/v1/hooks", json={"url": "http://169.254.169.254/", "events": ["failed"]}, headers=auth)
    assert refused.status_code == 422 and "refused" in refused.json()["detail"][0]["msg"]
    assert refused.json()["detail"][0]["loc"] == ["body", "url"]
    assert client.post("/api/v1/hooks", json={"url": "http://x/", "events": ["nope"]}, headers=auth).status_code == 422
    assert client.delete(f"/api/v1/hooks/{made.json()['id']}", headers=auth).status_code == 204
    assert client.delete(f"/api/v1/hooks/{made.json()['id']}", headers=auth).status_code == 404

    csv = client.get(f"/api/v1/runs/{run.id}/evaluations/20/examples.csv")
    assert csv.status_code == 200 and csv.text.splitlines()[0] == \
        "idx,rank,score,loo_loss,prob_label,loo_loss_mean,loo_loss_evals,scored_step,screened,label,flipped,source"
    assert len(csv.text.splitlines()) == 301
    pq_resp = client.get(f"/api/v1/runs/{run.id}/evaluations/20/examples.parquet")
    table = pq.read_table(io.BytesIO(pq_resp.content))
    assert table.num_rows == 300 and table.column("rank").to_pylist()[:3] == [0, 1, 2]
    assert client.get(f"/api/v1/runs/{run.id}/evaluations/15/examples.csv").status_code == 404
    assert client.get(f"/api/v1/runs/{run.id}/evaluations/20/examples.xlsx").status_code == 422


def test_metrics_endpoint_in_prometheus_format(api):
    client, store, _ = api
    run = _run_with_data(store)
    store.enqueue_job(run.id)
    store.claim_job("w-metrics")
    client.get(f"/api/v1/runs/{run.id}")
    text = client.get("/metrics").text
    assert 'ivon_diag_request_seconds_count{method="GET",route="/api/v1/runs/{run_id}",status="200"}' in text
    assert 'ivon_diag_jobs{state="running"}' in text
    assert "ivon_diag_evaluations_written" in text and 'worker="w-metrics"' in text


def test_compare_page_warns_when_runs_differ_in_hess_init(api):
    client, store, _ = api
    a = store.create_run("a", {"optimizer": {"hess_init": 0.1}}, enqueue=False)
    b = store.create_run("b", {"optimizer": {"hess_init": 1.0}}, enqueue=False)
    c = store.create_run("c", {}, enqueue=False)  # the worker's default
    d = store.create_run("d", {"optimizer": {"hess_init": 0.1}}, enqueue=False)
    e = store.create_run("e", {"optimizer": {"hess_init": 0.3}}, enqueue=False)  # the default, written out
    page = client.get("/compare", params={"ids": f"{a.id},{b.id},{c.id},987654"}).text
    assert 'id="hess-warning"' in page
    assert f"run {a.id}: 0.1, run {b.id}: 1, run {c.id}: 0.3 (the default)" in " ".join(page.split())
    assert "Not found: run 987654" in " ".join(page.split())  # an unknown id is said, not dropped silently
    assert 'id="hess-warning"' not in client.get("/compare", params={"ids": f"{a.id},{d.id}"}).text
    assert 'id="hess-warning"' not in client.get("/compare", params={"ids": f"{a.id}"}).text
    assert 'id="hess-warning"' not in client.get("/compare", params={"ids": f"{c.id},{e.id}"}).text
    # calibrated runs take their level from held-out data: their levels compare whatever their hess_init
    for r in (a, b):
        store.write_evaluation(r.id, 10, loo=0.5, metrics={"calibration_scale": 2.0, "loo_raw": 0.1})
    assert 'id="hess-warning"' not in client.get("/compare", params={"ids": f"{a.id},{b.id}"}).text
    assert 'id="hess-warning"' in client.get("/compare", params={"ids": f"{a.id},{b.id},{c.id}"}).text
    # whatever a stored config holds is shown escaped, and a config without an optimizer mapping reads as the default
    odd = store.create_run("odd", {"optimizer": {"hess_init": "<b>x</b>"}}, enqueue=False)
    flat = store.create_run("flat", {"optimizer": "ivon"}, enqueue=False)
    page = client.get("/compare", params={"ids": f"{odd.id},{flat.id}"})
    assert page.status_code == 200 and "&lt;b&gt;x&lt;/b&gt;" in page.text and "<b>x</b>" not in page.text
    assert f"run {flat.id}: not stated" in " ".join(page.text.split())


def test_huge_ids_are_refused_not_crashed(api):
    client, _, _ = api
    huge = 10**30
    for path in (f"/api/v1/runs/{huge}", f"/api/v1/runs/1/examples/{huge}", f"/api/v1/runs/{huge}/metrics/loo"):
        assert client.get(path).status_code == 422
    assert client.get("/compare", params={"ids": f"{huge},abc"}).status_code == 200


def test_oversized_bodies_are_refused_with_413_and_nothing_written(tmp_path):
    import httpx

    from app.store import Store, make_engine, upgrade

    url = f"sqlite:///{tmp_path / 'big.db'}"
    upgrade(make_engine(url))
    store = Store(url)
    token = store.create_token("big")
    client = TestClient(create_app(Settings(max_body_bytes=10_000), store), raise_server_exceptions=False)
    headers = {"Authorization": f"Bearer {token}"}
    big = {"config": {"name": "x" * 50, "padding": "y" * 20_000}}
    r = client.post("/api/v1/runs", json=big, headers=headers)
    assert r.status_code == 413 and "over 10000 bytes" in r.json()["detail"]

    async def chunks():  # no Content-Length: counted as it arrives
        yield b'{"config": {"name": "'
        for _ in range(30):
            yield b"z" * 1000
        yield b'"}}'

    transport = httpx.ASGITransport(app=client.app)

    async def chunked():
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            return await c.post("/api/v1/runs", content=chunks(), headers={**headers,
                                                                          "Content-Type": "application/json"})

    import asyncio

    assert asyncio.run(chunked()).status_code == 413
    assert store.list_runs() == []
    ok = client.post("/api/v1/runs", json={"config": {"name": "small"}}, headers=headers)
    assert ok.status_code == 201


def test_corrupt_per_example_records_get_a_clear_error_and_lose_no_new_evaluation(api, caplog):
    """A chunk cut short: reads that need it answer 500 saying the stored data is corrupt (no stack trace); the
    next evaluation is written whole, its running means restarting (loo_loss_evals says over how many)."""
    from sqlalchemy import select, update

    from app.store.models import ScoreChunk

    client, store, _ = api
    run = _run_with_data(store)
    at_20 = (ScoreChunk.run_id == run.id, ScoreChunk.step == 20)
    with store.session(write=True) as s, s.begin():
        data = s.scalar(select(ScoreChunk.data).where(*at_20, ScoreChunk.kind == "rank", ScoreChunk.chunk == 0))
        s.execute(update(ScoreChunk).where(*at_20).values(data=data[:-5]))  # every chunk of step 20 cut short
    r = client.get(f"/api/v1/runs/{run.id}/examples", params={"step": 20})
    assert r.status_code == 500 and "corrupt" in r.json()["detail"] and "Traceback" not in r.text
    assert client.get(f"/api/v1/runs/{run.id}/examples", params={"step": 10}).status_code == 200
    with caplog.at_level("WARNING", logger="ivon_diag.store"):
        store.write_evaluation(run.id, 30, loo=0.1, metrics={}, idx=np.arange(300), scores=np.ones(300),
                               loo_losses=np.full(300, 2.0), prob_label=None)
    assert "running means restart at step 30" in caplog.text
    page = client.get(f"/api/v1/runs/{run.id}/examples", params={"by": "loo_mean", "limit": 3}).json()
    assert page["step"] == 30 and [(i["loo_loss_mean"], i["loo_loss_evals"]) for i in page["items"]] == [(2.0, 1)] * 3



def test_hostile_numbers_and_nul_bytes_are_refused_on_both_backends(api):
    """Before: Infinity, 1e999 and -Infinity (invalid JSON for PostgreSQL) and a NUL byte in the name gave 500 there,
    and SQLite stored invalid JSON; unbounded sizes and an unknown early-stopping monitor were accepted."""
    client, store, auth = api
    before = len(store.list_runs())
    hostile = ['{"config": {"optimizer": {"lr": Infinity}}}', '{"config": {"optimizer": {"weight_decay": 1e999}}}',
               '{"config": {"early_stopping": {"stopping_threshold": -Infinity}}}',
               '{"config": {"optimizer": {"hess_init": NaN}}}', '{"config": {"name": "a\\u0000b"}}',
               '{"config": {"data": {"name": "csv", "path": "x\\u0000.csv"}}}',
               '{"config": {"model": {"hidden": [-5]}}}',
               '{"config": {"batch_size": 9223372036854775808}}', '{"config": {"data": {"n_synthetic": 1e30}}}',
               '{"config": {"early_stopping": {"monitor": "bogus"}}}', '{"config": {"seed": -1}}']
    fields = ["optimizer.lr", "optimizer.weight_decay", "early_stopping.stopping_threshold", "optimizer.hess_init",
              "name", "data.path", "model.hidden.0", "batch_size", "data.n_synthetic", "early_stopping.monitor", "seed"]
    for body, field in zip(hostile, fields):
        r = client.post("/api/v1/runs", content=body, headers={**auth, "Content-Type": "application/json"})
        assert r.status_code == 422, (body, r.status_code, r.text)
        assert [".".join(map(str, e["loc"][2:])) for e in r.json()["detail"]] == [field], r.text
    assert len(store.list_runs()) == before  # nothing written
    for name in ("a%00b", "x" * 101, "a b"):
        assert client.get(f"/api/v1/runs/1/metrics/{name}").status_code == 422


def test_metric_names_are_listed_and_a_typo_is_a_404_that_names_them(api):
    client, store, _ = api
    run = _run_with_data(store)
    assert client.get(f"/api/v1/runs/{run.id}/metrics").json() == ["loo", "test_nll"]
    r = client.get(f"/api/v1/runs/{run.id}/metrics/test_nl")
    assert r.status_code == 404 and "no metric 'test_nl' (it has: loo, test_nll)" in r.json()["detail"]
    fresh = store.create_run("fresh", {}, enqueue=False)
    assert client.get(f"/api/v1/runs/{fresh.id}/metrics").json() == []
    assert client.get(f"/api/v1/runs/{fresh.id}/metrics/loo").json() == {"name": "loo", "points": []}  # not yet
    assert client.get("/api/v1/runs/987654/metrics").status_code == 404


def test_delete_a_run_and_export_the_latest_evaluation(api):
    client, store, auth = api
    run = _run_with_data(store)
    latest = client.get(f"/api/v1/runs/{run.id}/evaluations/latest/examples.csv")
    assert latest.status_code == 200 and "step20" in latest.headers["content-disposition"]
    assert latest.text == client.get(f"/api/v1/runs/{run.id}/evaluations/20/examples.csv").text
    assert client.get(f"/api/v1/runs/{run.id}/evaluations/newest/examples.csv").status_code == 422
    assert client.delete(f"/api/v1/runs/{run.id}").status_code == 401
    running = store.create_run("busy", {}, enqueue=False)
    store.set_run_status(running.id, "running")  # (claiming could take another test's job on the shared database)
    r = client.delete(f"/api/v1/runs/{running.id}", headers=auth)
    assert r.status_code == 409 and "stop it first" in r.json()["detail"]
    assert client.delete(f"/api/v1/runs/{run.id}", headers=auth).status_code == 204
    assert client.get(f"/api/v1/runs/{run.id}").status_code == 404
    assert client.get(f"/api/v1/runs/{run.id}/evaluations/20/examples.csv").status_code == 404
    assert store.metric_names(run.id) == [] and client.delete(f"/api/v1/runs/{run.id}", headers=auth).status_code == 404


def test_calibration_endpoint_says_what_the_level_is_calibrated_on(api):
    client, store, _ = api
    run = store.create_run("cal", {"calibration": {"mode": "frozen_variance"}}, enqueue=False)
    r = client.get(f"/api/v1/runs/{run.id}/calibration")
    assert r.status_code == 200 and r.json()["step"] is None and not r.json()["calibrated"]
    assert "no evaluation yet" in r.json()["line"]
    store.write_evaluation(run.id, 40, loo=0.52, metrics={
        "loo_raw": 0.12, "calibration_scale": 3.0, "calibration_fit": 4.5, "calibration_nll": 0.5,
        "calibration_nll_se": 0.03, "calibration_examples": 500.0, "calibration_step": 20.0})
    assert client.get(f"/api/v1/runs/{run.id}/calibration", params={"step": 39}).status_code == 404
    body = client.get(f"/api/v1/runs/{run.id}/calibration", params={"step": 40}).json()
    assert body["step"] == 40 and body["calibrated"] and body["examples"] == 500 and body["fitted_step"] == 20
    assert body["drift"] == 1.5 and body["warning"] and body["loo_raw"] == 0.12
    assert "500 training examples held out of training" in body["line"] and "drift 1.50×" in body["line"]
    assert client.get("/api/v1/runs/987654/calibration").status_code == 404
    page = client.get(f"/runs/{run.id}").text
    assert 'id="calibration"' in page and "drift 1.50×" in page and 'data-calibrated="yes"' in page


def test_label_issues_are_estimated_by_cleanlab_on_the_averaged_class_probabilities(api):
    from cleanlab.filter import find_label_issues

    client, store, _ = api
    run = store.create_run("li", {}, enqueue=False)
    rng = np.random.default_rng(0)
    labels = np.arange(300) % 3
    store.add_examples(run.id, range(300), labels=labels.tolist())
    body = client.get(f"/api/v1/runs/{run.id}/label_issues").json()
    assert body["estimated"] is None and body["step"] is None and "no class probabilities yet" in body["line"]
    probs = np.full((300, 3), 0.05)
    probs[np.arange(300), labels] = 0.9
    wrong = rng.choice(300, 30, replace=False)  # 30 examples whose probabilities point elsewhere
    probs[wrong] = np.roll(probs[wrong], 1, axis=1)
    probs += rng.random(probs.shape) * 0.05
    probs /= probs.sum(1, keepdims=True)
    store.write_evaluation(run.id, 10, loo=0.5, metrics={"calibration_scale": 2.0}, idx=np.arange(300),
                           scores=np.ones(300), loo_losses=np.ones(300), class_probs=probs)
    assert client.get(f"/api/v1/runs/{run.id}/label_issues", params={"step": 11}).status_code == 404
    body = client.get(f"/api/v1/runs/{run.id}/label_issues", params={"step": 10}).json()
    expected = int(find_label_issues(labels, store.class_probs(run.id)[3], n_jobs=1).sum())
    assert body["step"] == 10 and body["examples"] == 300 and body["estimated"] == expected
    assert 20 <= expected <= 40 and 0.8 < body["health"] < 0.95 and body["calibrated"]
    assert f"cleanlab estimates {expected} label issues among 300 examples" in body["line"]
    assert "uncalibrated" not in body["line"]
    assert client.get("/api/v1/runs/987654/label_issues").status_code == 404


def test_the_api_states_the_installed_version(api):
    from importlib.metadata import version

    client, _, _ = api
    assert client.get("/openapi.json").json()["info"]["version"] == version("ivon-diagnostics")
