"""The dashboard in real headless Chromium (Debian's chromium driven by playwright)."""

import shutil

import numpy as np
import pytest

from app.store import Store, make_engine, upgrade
from tests.conftest import free_port, serving

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
pytestmark = pytest.mark.skipif(not shutil.which("chromium"), reason="Debian's chromium is not installed")


@pytest.fixture
def server(tmp_path):
    url = f"sqlite:///{tmp_path / 'd.db'}"
    upgrade(make_engine(url))
    port = free_port()
    with serving(["--db", url, "serve", "--port", str(port)], port) as base:
        yield base, Store(url)


def _write(store, run_id, step, n=200):
    s = np.random.default_rng(step).random(n)
    store.write_evaluation(run_id, step, loo=1.0 / step, metrics={"train_nll": 0.5 / step, "test_nll": 2.0 / step,
                                                                   "test_accuracy": 0.9, "test_ece": 0.05,
                                                                   "loo_capped": step / 1000,
                                                                   "hess_init_share": 0.2 if step < 30 else 0.9},
                           idx=np.arange(n), scores=s, loo_losses=s, prob_label=1 - s)


def _open(playwright, errors: list):
    """Debian's chromium, headless, with a page whose console errors and uncaught exceptions land in ``errors``."""
    browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                         args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
    page = browser.new_page()
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    return browser, page


def _images(n):
    import torch

    from worker.data import Dataset, Thumbnails

    return list(Thumbnails(Dataset(torch.rand(n, 1, 8, 8), torch.zeros(n), torch.rand(1, 64), torch.zeros(1), 10,
                              (1, 8, 8), torch.zeros(n), torch.zeros(n, dtype=torch.bool))))


def test_the_quality_chart_names_the_capped_share_only_once_a_form_with_a_cap_reports_it(server):
    from playwright.sync_api import sync_playwright

    base, store = server
    run = store.create_run("calibrated", {}, enqueue=False)
    store.add_examples(run.id, range(5), labels=[0] * 5, flipped=[False] * 5, thumbnails=_images(5))
    metrics = {"train_nll": 0.5, "test_nll": 0.6, "test_accuracy": 0.9, "test_ece": 0.05, "hess_init_share": 0.2}
    store.write_evaluation(run.id, 10, loo=0.7, metrics=metrics, idx=np.arange(5), scores=np.ones(5),
                           loo_losses=np.ones(5), prob_label=np.ones(5) / 2)  # first order: no loo_capped
    errors = []
    with sync_playwright() as p:
        browser, page = _open(p, errors)
        page.goto(f"{base}/runs/{run.id}")
        page.wait_for_selector("#quality .gtitle")
        assert page.eval_on_selector("#quality .gtitle", "e => e.textContent") == "accuracy, ECE, hess_init's share"
        store.write_evaluation(run.id, 20, loo=0.7, metrics={**metrics, "loo_capped": 0.1}, idx=np.arange(5),
                               scores=np.ones(5), loo_losses=np.ones(5), prob_label=np.ones(5) / 2)
        page.wait_for_function("document.body.dataset.lastStep === '20'", timeout=15000)
        page.wait_for_function("document.querySelector('#quality .gtitle').textContent.includes('capped')")
        browser.close()
    assert errors == []


def test_run_page_draws_updates_live_and_escapes(server):
    from playwright.sync_api import sync_playwright

    base, store = server
    imgs = _images(200)
    run = store.create_run("<script>window.pwned=1</script></script>", {}, enqueue=False)
    store.add_examples(run.id, range(200), labels=[i % 10 for i in range(200)],
                       flipped=[i % 5 == 0 for i in range(200)], thumbnails=imgs)
    for step in (10, 20):
        _write(store, run.id, step)
    errors = []
    with sync_playwright() as p:
        browser, page = _open(p, errors)
        page.goto(f"{base}/runs/{run.id}")
        page.wait_for_selector("#loss .main-svg")
        page.wait_for_selector("#most .ex img")
        assert page.evaluate("window.pwned") is None
        assert page.inner_text("#run-name") == "<script>window.pwned=1</script></script>"
        from app.api.schemas import LOO_VALIDITY
        page.click("#validity summary")  # one line until opened
        assert LOO_VALIDITY in page.inner_text("#validity")  # how far the LOO holds, as the API says it
        assert page.eval_on_selector_all("#most .ex", "els => els.length") == 24
        # every chart says what it shows (plotly.js ignores string titles: a placeholder used to show instead)
        titles = page.eval_on_selector_all(".gtitle", "els => els.map(e => e.textContent)")
        assert {"NLL: training, test and the LOO estimate", "click an example below for its history",
                "accuracy, ECE, the LOO's capped share, hess_init's share"} <= set(titles)
        assert "Click to enter" not in page.inner_text("body")
        assert "step" in page.eval_on_selector_all("#loss .xtitle", "els => els.map(e => e.textContent)")
        assert page.eval_on_selector_all("#most .ex.flip", "els => els.length") > 0
        assert page.evaluate("document.getElementById('loss').data[2].x.length") == 2
        assert page.is_hidden("#hess-note")  # the curvature was learned (share 0.2): no warning
        page.wait_for_selector("#suspects .ex")  # the first load's galleries are drawn
        _write(store, run.id, 30)  # a new evaluation arrives while the page is open
        page.wait_for_function("document.body.dataset.lastStep === '30'", timeout=15000)
        assert page.evaluate("document.getElementById('loss').data[2].x.length") == 3
        # the LOO's capped share (its warning sign) is drawn and follows live
        assert page.evaluate("document.getElementById('quality').data[2].name") == "loo_capped"
        assert page.evaluate("document.getElementById('quality').data[2].y") == [0.01, 0.02, 0.03]
        # IVON's curvature still mostly hess_init's (0.9 at step 30): the LOO's scale is hess_init's, and the page
        # says so as the evaluation arrives
        assert page.evaluate("document.getElementById('quality').data[3].y") == [0.2, 0.2, 0.9]
        page.wait_for_selector("#hess-note:not([hidden])")  # once the calibration line says it is uncalibrated
        assert "90% its initial value" in page.inner_text("#hess-note")
        # the mislabeled-suspects gallery: ranked by the LOO loss averaged over the evaluations, as the API ranks it
        _, suspects = store.examples_at(run.id, k=24, by="loo_mean")
        page.wait_for_function(f"document.querySelector('#suspects .ex')?.dataset.idx === '{suspects[0].idx}'")
        assert page.eval_on_selector_all("#suspects .ex", "els => els.map(e => +e.dataset.idx)") == \
            [r.idx for r in suspects]
        assert "mean loss=" in page.inner_text("#suspects")
        page.click("#most .ex")
        page.wait_for_function("document.getElementById('history').data.length === 3")
        page.goto(f"{base}/")
        assert "<script>window.pwned" in page.inner_text("#runs")
        page.goto(f"{base}/compare?ids={run.id}")
        page.wait_for_selector("#compare .main-svg")
        browser.close()
    assert errors == []


def test_a_budgeted_run_shows_its_sample_its_error_bars_and_each_scores_age(server, tmp_path):
    """Slices in rotation: one line says how many examples the LOO came from and how many are scored so far; the LOO
    carries error bars that follow live; a card whose score is older than the step says when it was scored."""
    from playwright.sync_api import sync_playwright

    base, store = server
    run = store.create_run("budgeted", {}, enqueue=False)
    store.add_examples(run.id, range(300), labels=[i % 10 for i in range(300)], flipped=[False] * 300,
                       thumbnails=_images(300))

    def write(step, idx, se):
        s = np.random.default_rng(step).random(len(idx)) + step / 10
        store.write_evaluation(run.id, step, loo=0.5, metrics={"train_nll": 0.3, "test_nll": 0.6, "loo_se": se,
                                                               "loo_sample": float(len(idx))},
                               idx=np.asarray(idx), scores=s, loo_losses=s, prob_label=1 - s / 10, carry=True)

    write(10, range(0, 100), 0.04)
    write(20, range(100, 200), 0.02)
    errors = []
    with sync_playwright() as p:
        browser, page = _open(p, errors)
        page.goto(f"{base}/runs/{run.id}")
        page.wait_for_selector("#loss .main-svg")
        page.wait_for_selector("#least .ex")
        line = page.inner_text("#cadence")
        assert "± 0.02" in line and "sample of 100 of 300" in line and "200 of 300 scored so far" in line
        assert page.evaluate("document.getElementById('loss').data[2].error_y.array") == [0.04, 0.02]
        assert "(scored at step 10)" in page.inner_text("#least")  # the lowest scores: step 10's, carried
        assert page.eval_on_selector_all("#loss .errorbar", "els => els.length") >= 2  # drawn, not only set
        write(30, range(200, 300), 0.01)
        page.wait_for_function("document.body.dataset.lastStep === '30'", timeout=15000)
        page.wait_for_function("document.getElementById('loss').data[2].error_y.array.length === 3")
        assert page.evaluate("document.getElementById('loss').data[2].error_y.array") == [0.04, 0.02, 0.01]
        # an evaluation that screened examples between its slices: the line says how many and how well the screen
        # agreed on the slice; their cards say so
        s = np.linspace(9.0, 5.0, 60)  # above every exact score: the screened ones top the ranking
        store.write_evaluation(run.id, 40, loo=0.5, metrics={"train_nll": 0.3, "test_nll": 0.6, "loo_se": 0.01,
                                                             "loo_sample": 10.0, "screen_spearman": 0.973,
                                                             "screened": 50.0},
                               idx=np.arange(60), scores=s, loo_losses=s, prob_label=np.full(60, 0.2), carry=True,
                               screened=np.arange(60) >= 10)
        page.goto(f"{base}/runs/{run.id}")
        page.wait_for_selector("#most .ex")
        line = page.inner_text("#screening")
        assert "50 more screened at this step" in line and "Spearman 0.973" in line
        caps = page.eval_on_selector_all("#most .ex a", "els => els.map(e => [e.textContent, e.title])")
        assert caps[0][0].startswith("#0 ") and "screened" not in caps[0][0] and not caps[0][1]  # exact
        marked = [(text, title) for text, title in caps if text.endswith(" screened")]
        assert marked and all(int(text[1:].split()[0]) >= 10 and "output layer" in title for text, title in marked)
        page.screenshot(path=str(tmp_path / "budgeted.png"), full_page=True)
        browser.close()
    assert errors == []


def test_suspects_are_reviewed_on_the_page_with_a_write_token(server, tmp_path):
    """A token typed once for the tab: keep, drop and relabel buttons on the suspects, their decisions shown and
    counted; a refused token says so and saves nothing."""
    from playwright.sync_api import sync_playwright

    base, store = server
    run = store.create_run("review", {}, enqueue=False)
    store.add_examples(run.id, range(60), labels=[i % 10 for i in range(60)], flipped=[i < 6 for i in range(60)],
                       thumbnails=_images(60))
    _write(store, run.id, 10, n=60)
    token = store.create_token("reviewer")
    errors = []
    with sync_playwright() as p:
        browser, page = _open(p, errors)
        page.goto(f"{base}/runs/{run.id}")
        page.wait_for_selector("#suspects .ex")
        assert page.inner_text("#review-summary") == "no decisions yet"
        assert page.eval_on_selector_all("#suspects .review button", "els => els.length") == 0  # no token: no buttons
        page.fill("#review-token", "not-a-token")
        page.click("#review-start")
        page.wait_for_selector("#suspects .review button")
        page.click("#suspects .ex >> nth=0 >> text=drop")
        page.wait_for_function("document.getElementById('review-error').textContent.includes('refused')")
        assert store.reviews(run.id) == []
        page.fill("#review-token", token)
        page.click("#review-start")
        page.wait_for_selector("#suspects .review button")
        first, second = page.eval_on_selector_all("#suspects .ex", "els => els.slice(0, 2).map(e => +e.dataset.idx)")
        page.click("#suspects .ex >> nth=0 >> text=drop")
        page.wait_for_function("document.getElementById('review-summary').textContent.startsWith('1 reviewed')")
        label = store.get_example(run.id, second).label
        target = (label + 1) % 10
        page.select_option("#suspects .ex >> nth=1 >> select", str(target))
        page.wait_for_function("document.getElementById('review-summary').textContent.startsWith('2 reviewed')")
        assert [(r.idx, r.decision, r.label) for r in store.reviews(run.id)] == sorted(
            [(first, "drop", None), (second, "relabel", target)])
        page.wait_for_function("[...document.querySelectorAll('#suspects .review b')].slice(0, 2)"
                               f".map(e => e.textContent).join('|') === 'drop|→ {target}'")
        assert page.inner_text("#review-error") == ""
        page.screenshot(path=str(tmp_path / "review.png"), full_page=True)
        browser.close()
    assert [e for e in errors if "(Forbidden)" not in e] == []  # the refused token: the one console error


def test_an_example_page_shows_the_image_labels_class_probabilities_history_and_review(server, tmp_path):
    from playwright.sync_api import sync_playwright

    base, store = server
    run = store.create_run("examples", {}, enqueue=False)
    store.add_examples(run.id, range(40), labels=[i % 4 for i in range(40)], flipped=[i == 5 for i in range(40)],
                       original=[2 if i == 5 else i % 4 for i in range(40)], thumbnails=_images(40))
    rng = np.random.default_rng(0)
    for step in (10, 20):
        p = rng.dirichlet(np.ones(4), 40)
        p[5] = [0.05, 0.1, 0.8, 0.05]  # the flipped example: its original class is the LOO prediction
        s = rng.random(40)
        store.write_evaluation(run.id, step, loo=0.5, metrics={}, idx=np.arange(40), scores=s, loo_losses=s,
                               prob_label=1 - s, class_probs=p)
    token = store.create_token("example-page")
    errors = []
    with sync_playwright() as pw:
        browser, page = _open(pw, errors)
        page.goto(f"{base}/runs/{run.id}")
        page.wait_for_selector("#suspects .ex a")
        href = page.get_attribute("#suspects .ex a >> nth=0", "href")
        assert href.startswith(f"/runs/{run.id}/examples/")
        page.goto(f"{base}/runs/{run.id}/examples/5")
        page.wait_for_selector("#probs .main-svg")
        page.wait_for_selector("#history .main-svg")
        summary = page.inner_text("#summary")
        assert "label 1 (flipped on purpose from 2)" in summary and "LOO prediction 2 (0.800)" in summary
        assert "averaged over 2 evaluations up to step 20" in summary
        assert page.evaluate("document.getElementById('probs').data[0].y") == pytest.approx([0.05, 0.1, 0.8, 0.05])
        assert page.evaluate("document.getElementById('history').data[0].x") == [10, 20]
        assert page.inner_text("#current") == "unreviewed"
        page.fill("#review-token", token)
        page.click("#review-start")
        page.wait_for_selector("#current select")
        page.select_option("#current select", "2")
        page.wait_for_function("document.querySelector('#current b').textContent === '→ 2'")
        assert [(r.idx, r.decision, r.label) for r in store.reviews(run.id)] == [(5, "relabel", 2)]
        page.screenshot(path=str(tmp_path / "example.png"), full_page=True)
        assert page.goto(f"{base}/runs/{run.id}/examples/999").status == 404
        browser.close()
    assert [e for e in errors if "(Not Found)" not in e] == []


def test_a_tabular_example_page_shows_its_row_as_read_and_bad_rows_are_refused(server):
    from playwright.sync_api import sync_playwright

    base, store = server
    run = store.create_run("tabular <i>rows</i>", {}, enqueue=False)
    names = ["alcohol", "<b>malic</b>", "ash"]
    rows = np.array([[13.2 + i, 1.78, 2.14e3] for i in range(6)])
    store.add_examples(run.id, range(6), labels=[i % 2 for i in range(6)], sources=[f"line {i + 2}" for i in range(6)],
                       features=rows, feature_names=names)
    for bad, match in ((rows[:, :0], "one row of 1 to 64 numbers"), (rows[:5], "one row of 1 to 64 numbers"),
                       (np.where(rows > 2e3, np.inf, rows), "non-finite"), (rows, "3 names")):
        with pytest.raises(ValueError, match=match):
            store.add_examples(run.id, range(6), features=bad, feature_names=names[:2] if match == "3 names" else names)
    assert store.get_example(run.id, 3).features == pytest.approx([16.2, 1.78, 2140.0])  # refused calls lost nothing
    other = store.create_run("float32 rows", {}, enqueue=False)
    store.add_examples(other.id, [0], labels=[0], features=np.array([[14.13, 0.1, 3]], dtype=np.float32),
                       feature_names=names)
    assert store.get_example(other.id, 0).features == [14.13, 0.1, 3.0]  # a float32 row by its shortest decimals
    errors = []
    with sync_playwright() as pw:
        browser, page = _open(pw, errors)
        page.goto(f"{base}/runs/{run.id}/examples/3")
        table = page.inner_text("#features table")
        assert "alcohol\t16.2" in table and "<b>malic</b>\t1.78" in table and "ash\t2140" in table  # escaped
        assert "line 5" in page.inner_text("#source")
        browser.close()
    assert [e for e in errors if "(Not Found)" not in e] == []


def test_a_run_page_before_its_first_evaluation_asks_nothing_it_cannot_have_then_fills_live(server):
    """Before: a queued run's page drew three empty axes and its galleries asked the API for what did not exist
    (4 console 404s); a tabular run's galleries asked for ~70 thumbnails that 404."""
    from playwright.sync_api import sync_playwright

    base, store = server
    run = store.create_run("waiting", {}, enqueue=False)
    errors, failed = [], []
    with sync_playwright() as pw:
        browser, page = _open(pw, errors)
        page.on("response", lambda r: failed.append(r.url) if r.status >= 400 else None)
        page.goto(f"{base}/runs/{run.id}")
        page.wait_for_selector("#loss .main-svg")
        assert page.inner_text("#most") == "no evaluation yet"
        assert "waiting for the run's first evaluation" in page.inner_text("#loss")
        # the worker stores a tabular run's rows (no thumbnails), then its first evaluation arrives live
        store.add_examples(run.id, range(200), labels=[i % 2 for i in range(200)],
                           features=np.ones((200, 2)), feature_names=["a", "b"])
        _write(store, run.id, 10)
        page.wait_for_function("document.body.dataset.lastStep === '10'", timeout=15000)
        page.wait_for_selector("#most .ex")
        assert "waiting" not in page.inner_text("#loss")
        page.goto(f"{base}/runs/{run.id}")  # opened again, knowing the run has no images
        page.wait_for_selector("#most .ex")
        assert page.eval_on_selector_all("#most .ex img", "els => els.length") == 0
        browser.close()
    assert failed == [] and errors == []


def test_a_run_without_stored_examples_asks_once_per_page_whether_it_has_thumbnails(server):
    """Before: a run whose scored examples were never stored (a Tracker run without ``add_examples``) asked one
    example's detail, and got a 404, at every refresh of its galleries."""
    from playwright.sync_api import sync_playwright

    base, store = server
    run = store.create_run("tracked", {}, enqueue=False)
    _write(store, run.id, 10)
    errors, failed = [], []
    with sync_playwright() as pw:
        browser, page = _open(pw, errors)
        page.on("response", lambda r: failed.append(r.url) if r.status >= 400 else None)
        page.goto(f"{base}/runs/{run.id}")
        page.wait_for_selector("#most .ex")
        for step in (20, 30):  # live evaluations refresh the galleries
            _write(store, run.id, step)
            page.wait_for_function(f"document.body.dataset.lastStep === '{step}'", timeout=15000)
            page.wait_for_selector("#most .ex")
        assert "y=–" in page.inner_text("#most")
        assert page.eval_on_selector_all("#most .ex img", "els => els.length") == 0
        browser.close()
    assert len(failed) == 1 and failed[0].endswith("/detail"), failed


def test_read_protection_covers_every_route_and_the_dashboard_works_behind_it(tmp_path):
    """Before: /metrics, /docs, /redoc and /openapi.json stayed open, and the page's fetch and EventSource calls
    carried no token, so a protected dashboard could not work in a browser."""
    import os

    import httpx
    from playwright.sync_api import sync_playwright

    url = f"sqlite:///{tmp_path / 'p.db'}"
    upgrade(make_engine(url))
    store = Store(url)
    run = store.create_run("protected", {}, enqueue=False)
    store.add_examples(run.id, range(200), labels=[i % 10 for i in range(200)], thumbnails=_images(200))
    for step in (10, 20):
        _write(store, run.id, step)
    token = store.create_token("reader")
    port = free_port()
    env = {**os.environ, "IVON_DIAG_READ_REQUIRES_TOKEN": "true"}
    with serving(["--db", url, "serve", "--port", str(port)], port, env) as base:
        bearer = {"Authorization": f"Bearer {token}"}
        reads = ["/metrics", "/docs", "/redoc", "/openapi.json", "/api/v1/runs", f"/api/v1/runs/{run.id}/histogram",
                 f"/api/v1/runs/{run.id}/examples", f"/api/v1/runs/{run.id}/model"]
        for path in reads:
            r = httpx.get(base + path, follow_redirects=False)
            assert r.status_code in (401, 303), (path, r.status_code)
            assert httpx.get(base + path, headers={"Authorization": "Bearer wrong"}).status_code in (403, 303), path
            assert httpx.get(base + path, headers=bearer).status_code in (200, 404), path
        for page_path in ("/", f"/runs/{run.id}", "/compare?ids=1", "/docs"):
            r = httpx.get(base + page_path, follow_redirects=False)
            assert r.status_code == 303 and r.headers["location"].startswith("/login?next=/"), page_path
        assert httpx.get(base + "/healthz").status_code == 200 and httpx.get(base + "/readyz").status_code == 200
        # the session cookie reads, never writes; the sign-in goes nowhere but this server
        r = httpx.post(base + "/login", data={"token": token, "next": "//evil.example/x"}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/"
        cookies = r.cookies
        assert "httponly" in r.headers["set-cookie"].lower() and "samesite=strict" in r.headers["set-cookie"].lower()
        assert httpx.get(base + "/api/v1/runs", cookies=cookies).status_code == 200
        assert httpx.post(base + "/api/v1/runs", json={"config": {}}, cookies=cookies).status_code == 401
        assert httpx.post(base + "/login", data={"token": "wrong"}).status_code == 403
        errors = []
        with sync_playwright() as p:
            browser, page = _open(p, errors)
            page.goto(f"{base}/runs/{run.id}")
            assert "/login" in page.url
            page.fill("input[name=token]", "not-a-token")
            page.click("form button")
            assert "invalid or revoked token" in page.inner_text("#login-error")
            errors.clear()  # the refused sign-in's 403 is the page's own answer
            page.fill("input[name=token]", token)
            page.click("form button")
            page.wait_for_url(f"{base}/runs/{run.id}")
            page.wait_for_selector("#loss .main-svg")
            page.wait_for_selector("#most .ex img, #most .ex")  # the galleries' fetch carried the session
            _write(store, run.id, 30)  # and so does the live stream
            page.wait_for_function("document.body.dataset.lastStep === '30'", timeout=15000)
            page.screenshot(path=str(tmp_path / "protected.png"))
            assert errors == []  # signed in, every fetch and the stream carried the session
            page.click("#logout")  # the open stream's reconnect may meet the 401 before the page leaves
            page.goto(f"{base}/")
            assert "/login" in page.url
            browser.close()


def test_the_api_docs_render_without_a_network(server):
    """Before: /docs loaded Swagger UI from a CDN and stayed blank offline."""
    from playwright.sync_api import sync_playwright

    base, _ = server
    errors, outside = [], []
    with sync_playwright() as p:
        browser, page = _open(p, errors)

        def local_only(route):
            if route.request.url.startswith(base):
                return route.continue_()
            outside.append(route.request.url)
            return route.abort()

        page.route("**/*", local_only)
        page.goto(f"{base}/docs")
        page.wait_for_selector(".swagger-ui .info .title")
        assert "ivon-diag" in page.inner_text(".swagger-ui .info .title")
        page.get_by_text("/api/v1/runs/{run_id}/examples", exact=True).first.wait_for()
        page.goto(f"{base}/redoc")
        page.get_by_text("/api/v1/runs/{run_id}/model").first.wait_for()
        browser.close()
    # ReDoc's bundle asks for its own footer logo; nothing the page needs leaves the machine
    assert [u for u in outside if u != "https://cdn.redoc.ly/redoc/logo-mini.svg"] == []
    # the only console errors: that logo, refused here (its message may not arrive before the page closes)
    assert set(errors) <= {"Failed to load resource: net::ERR_FAILED"} and len(errors) <= len(outside)


def test_test_examples_worst_first_and_one_explained_by_its_training_examples(server):
    from playwright.sync_api import sync_playwright

    base, store = server
    run = store.create_run("<b>influence</b>", {"sensitivity": {"covariance": "optimizer"}}, enqueue=False)
    store.add_examples(run.id, range(50), labels=[i % 10 for i in range(50)], flipped=[i == 7 for i in range(50)],
                       thumbnails=_images(50))
    _write(store, run.id, 40, n=50)
    store.add_test_examples(run.id, [i % 10 for i in range(30)], thumbnails=_images(30))
    probs = np.random.default_rng(0).dirichlet(np.ones(10), 30)
    store.write_test_predictions(run.id, 40, probs)
    losses = -np.log(probs[np.arange(30), np.arange(30) % 10])
    worst = int(np.argmax(losses))
    rows = [{"idx": i, "label": i % 10, "flipped": i == 7, "loss_change": c} for i, c in ((7, 0.5), (3, 0.1))]
    store.record_influence(run.id, {"test": [worst], "k": 2, "predicted": False},
                           [{"test_idx": worst, "label": worst % 10, "predicted": int(probs[worst].argmax()),
                             "target": worst % 10, "loss": float(losses[worst]), "proponents": rows,
                             "opponents": [{**r, "loss_change": -r["loss_change"]} for r in rows]}])
    errors = []
    with sync_playwright() as p:
        browser, page = _open(p, errors)
        page.goto(f"{base}/runs/{run.id}")
        page.click("#test-link")
        first = page.locator("#test-examples tr").nth(1)
        assert first.locator("a").inner_text() == f"#{worst}"  # the highest loss first
        assert float(first.locator("td").nth(5).inner_text()) == pytest.approx(losses[worst], abs=1e-4)
        assert page.locator("#test-examples img").count() == 30
        first.locator("a").click()
        assert "diagonal σ²" in page.inner_text("#influence-covariance")  # how far the rankings hold, said
        assert "flipped" in page.locator("#proponents tr").nth(1).inner_text()
        assert page.locator("#opponents tr").nth(1).locator("td").nth(3).inner_text() == "-0.5"
        page.locator("#proponents a").first.click()
        assert page.url.endswith(f"/runs/{run.id}#example-7")
        page.goto(f"{base}/runs/{run.id}/test/{(worst + 1) % 30}")
        assert "ivon-diag influence" in page.inner_text("#ask")
        assert page.evaluate("window.pwned") is None
        browser.close()
    assert errors == []


def test_the_run_page_says_what_the_loo_is_calibrated_on_and_flags_drift_live(server):
    from playwright.sync_api import sync_playwright

    base, store = server
    run = store.create_run("calibrated", {"calibration": {"mode": "frozen"},
                                          "x": "</pre><script>window.pwned=1</script>"}, enqueue=False)
    store.add_examples(run.id, range(50), labels=[i % 10 for i in range(50)], thumbnails=_images(50))

    def write(step, fit):
        s = np.random.default_rng(step).random(50)
        store.write_evaluation(run.id, step, loo=0.4, metrics={
            "train_nll": 0.2, "test_nll": 0.41, "hess_init_share": 0.95, "loo_raw": 0.1, "calibration_scale": 3.0,
            "calibration_fit": fit, "calibration_nll": 0.4, "calibration_nll_se": 0.02,
            "calibration_examples": 1000.0, "calibration_step": 10.0}, idx=np.arange(50), scores=s, loo_losses=s,
            class_probs=np.eye(10)[(np.arange(50) + (np.arange(50) % 7 == 0)) % 10] * 0.9 + 0.01)

    write(10, 3.0)
    errors = []
    with sync_playwright() as p:
        browser, page = _open(p, errors)
        page.goto(f"{base}/runs/{run.id}")
        page.wait_for_selector("#loss .main-svg")
        line = page.inner_text("#calibration")
        assert "1,000 training examples held out of training" in line and "drift 1.00×" in line
        assert page.get_attribute("#calibration", "class") == ""
        # calibrated: hess_init no longer sets the level, so its warning stays hidden at a share of 0.95
        assert page.is_hidden("#hess-note")
        # cleanlab's count on the averaged class probabilities (8 of the 50 point away from their label)
        page.wait_for_selector("#label-issues:not([hidden])")
        assert "label issues among 50 examples" in page.inner_text("#label-issues")
        page.click("#config summary")  # the run's config, escaped
        assert '"mode": "frozen"' in page.inner_text("#config") and page.evaluate("window.pwned") is None
        write(20, 4.5)  # the held-out data now asks for a scale 1.5 times the frozen one
        page.wait_for_function("document.body.dataset.lastStep === '20'", timeout=15000)
        page.wait_for_function("document.getElementById('calibration').textContent.includes('1.50×')")
        assert page.get_attribute("#calibration", "class") == "status-failed"
        assert page.is_hidden("#hess-note")
        browser.close()
    assert errors == []
