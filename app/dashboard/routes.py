"""Dashboard pages and the Server-Sent Events stream. plotly.js comes from the installed plotly package (offline)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from urllib.parse import parse_qs

import plotly
from fastapi import APIRouter, Depends, Query, Request, Response
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates

from app.api.deps import SESSION_COOKIE, get_store, require_page
from app.api.routes import INT32, RunId
from app.api.routes.common import Idx
from app.api.schemas import (
    HESS_INIT_SCALE,
    INFLUENCE_COVARIANCE,
    INFLUENCE_VALIDITY,
    LOO_MEAN_VALIDITY,
    LOO_VALIDITY,
    SCORE_VALIDITY,
)
from app.store import NotFound, Store
from app.store.calibration import calibration_summary

router = APIRouter()


def js(obj) -> str:
    """JSON safe to embed in a <script> element (no closing tag, no HTML entities)."""
    return json.dumps(obj).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")

templates = Jinja2Templates(directory=str(Path(__file__).with_name("templates")))
templates.env.globals["zip"] = zip  # a tabular row beside its column names
PLOTLY_JS = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
PAGE = 100  # test examples per page
RUNS_PAGE = 100
CURVES = ("train_nll", "test_nll", "loo", "loo_se", "test_accuracy", "test_ece", "loo_capped", "hess_init_share")


@router.get("/static/plotly.min.js", include_in_schema=False)
def plotly_js():
    return FileResponse(PLOTLY_JS, media_type="application/javascript", headers={"Cache-Control": "max-age=86400"})


def _local(path: str) -> str:
    """Where to go after signing in: a path on this server only (no open redirect)."""
    return path if path.startswith("/") and not path.startswith("//") and "\\" not in path else "/"


@router.get("/login", response_class=HTMLResponse, include_in_schema=False)
def login_page(request: Request, next: str = Query("/", max_length=2000)):
    return templates.TemplateResponse(request, "login.html", {"next": _local(next), "error": None})


@router.post("/login", include_in_schema=False)
async def login(request: Request, store: Store = Depends(get_store)):
    """Check a pasted token and keep it in an HttpOnly, SameSite=Strict cookie that only reads accept."""
    body = await request.body()
    form = parse_qs(body.decode("utf-8", "replace"), max_num_fields=4) if len(body) < 8192 else {}
    token, nxt = (form.get("token") or [""])[0].strip(), _local((form.get("next") or ["/"])[0])
    if not token or not await asyncio.to_thread(store.verify_token, token):
        return templates.TemplateResponse(request, "login.html", {"next": nxt, "error": "invalid or revoked token"},
                                          status_code=403)
    response = RedirectResponse(nxt, status_code=303)
    response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https", max_age=7 * 86400)
    return response


@router.post("/logout", include_in_schema=False)
def logout():
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(SESSION_COOKIE)
    return response


@router.get("/", response_class=HTMLResponse, include_in_schema=False, dependencies=[Depends(require_page)])
def runs_page(request: Request, status: str | None = Query(None, pattern="^(queued|running|done|failed|cancelled)?$"),
              tag: str | None = Query(None, pattern=r"^[A-Za-z0-9_.:-]{0,50}$"),
              q: str | None = Query(None, max_length=200, pattern=r"^[^\x00]*$"),
              offset: int = Query(0, ge=0, le=INT32), store: Store = Depends(get_store)):
    """The runs, newest first, a page at a time, with each one's latest LOO and test metrics; filtered by status,
    tag and name."""
    status, tag, q = status or None, tag or None, q or None
    runs = store.list_runs(status=status, limit=RUNS_PAGE, offset=offset, tag=tag, name=q)
    total = store.count_runs(status=status, tag=tag, name=q)
    return templates.TemplateResponse(request, "runs.html", {
        "runs": runs, "latest": store.latest_evaluations([r.id for r in runs]),
        "best": store.best_loo([r.id for r in runs]), "total": total, "offset": offset,
        "page": RUNS_PAGE, "status": status or "", "tag": tag or "", "q": q or ""})


@router.get("/runs/{run_id}", response_class=HTMLResponse, include_in_schema=False,
            dependencies=[Depends(require_page)])
def run_page(request: Request, run_id: RunId, store: Store = Depends(get_store)):
    run = store.get_run(run_id)
    curves = {name: store.curve(run_id, name, max_points=2000) for name in CURVES}
    es = store.early_stop(run_id)
    latest = store.evaluations(run_id, since_step=max(store.latest_step(run_id) or 0, 1) - 1, limit=1)
    return templates.TemplateResponse(request, "run.html", {
        "run": run, "curves_json": js(curves), "stop_step": es.stopped_step if es else None,
        "latest": latest[-1] if latest else None, "classes": store.num_classes(run_id),
        "last_step": store.latest_step(run_id), "images": store.has_images(run_id),
        "loo_validity": LOO_VALIDITY, "score_validity": SCORE_VALIDITY,
        "mean_validity": LOO_MEAN_VALIDITY,
        "calibration": calibration_summary(run.config, latest[-1].metrics if latest else None)})


@router.get("/runs/{run_id}/examples/{idx}", response_class=HTMLResponse, include_in_schema=False,
            dependencies=[Depends(require_page)])
def example_page(request: Request, run_id: RunId, idx: Idx, store: Store = Depends(get_store)):
    """One training example: its image, labels, LOO class probabilities, score history and review."""
    return templates.TemplateResponse(request, "example.html", {
        "run": store.get_run(run_id), "ex": store.example_detail(run_id, idx), "classes": store.num_classes(run_id),
        "mean_validity": LOO_MEAN_VALIDITY})


@router.get("/runs/{run_id}/test", response_class=HTMLResponse, include_in_schema=False,
            dependencies=[Depends(require_page)])
def test_examples_page(request: Request, run_id: RunId, offset: int = Query(0, ge=0, le=INT32),
                       best: bool = Query(False), store: Store = Depends(get_store)):
    """The run's test examples at its latest evaluation, the highest loss first (or the lowest)."""
    run = store.get_run(run_id)
    total, rows = store.test_examples(run_id, limit=PAGE, offset=offset, worst_first=not best)
    return templates.TemplateResponse(request, "test_examples.html", {
        "run": run, "rows": rows, "total": total, "offset": offset, "page": PAGE, "best": best})


@router.get("/runs/{run_id}/test/{idx}", response_class=HTMLResponse, include_in_schema=False,
            dependencies=[Depends(require_page)])
def test_example_page(request: Request, run_id: RunId, idx: Idx, store: Store = Depends(get_store)):
    """One test example and the training examples that pushed its prediction (its answered influence queries)."""
    run = store.get_run(run_id)
    ex = store.test_example(run_id, idx)
    answer, pending = None, False
    for q in store.list_influence(run_id, limit=200):  # the newest answer that includes this example
        if idx in q.request.get("test", []):
            if q.status == "done" and answer is None:
                answer = next(r for r in q.result if r["test_idx"] == idx)
            pending = pending or q.status in ("pending", "running")
    sens = run.config.get("sensitivity") if isinstance(run.config, dict) else None  # a job's (a Tracker's: none)
    covariance = INFLUENCE_COVARIANCE.get(sens.get("covariance")) if isinstance(sens, dict) else None
    return templates.TemplateResponse(request, "test_example.html", {
        "run": run, "ex": ex, "answer": answer, "pending": pending, "influence_validity": INFLUENCE_VALIDITY,
        "influence_covariance": covariance})


@router.get("/runs/{run_id}/test/{idx}/image", include_in_schema=False, dependencies=[Depends(require_page)])
def test_image(run_id: RunId, idx: Idx, store: Store = Depends(get_store)):
    ex = store.test_example(run_id, idx)
    if ex.thumbnail is None:
        raise NotFound(f"test example {idx} of run {run_id} has no image")
    return Response(ex.thumbnail, media_type="image/png", headers={"Cache-Control": "max-age=86400"})


@router.get("/compare", response_class=HTMLResponse, include_in_schema=False, dependencies=[Depends(require_page)])
def compare_page(request: Request, ids: str = Query("", description="comma-separated run ids"),
                 store: Store = Depends(get_store)):
    try:
        run_ids = [int(x) for x in ids.split(",") if x.strip()]
        run_ids = [r for r in run_ids if 0 <= r <= INT32][:10]
    except ValueError:
        run_ids = []
    data, hess_inits, missing = {}, {}, []
    for rid in run_ids:
        try:
            run = store.get_run(rid)
        except NotFound:
            missing.append(rid)
            continue
        data[f"{rid}: {run.name}"] = {n: store.curve(rid, n, max_points=2000) for n in COMPARED}
        hess_inits[rid] = _hess_init(run.config)
    # an uncalibrated LOO's scale follows IVON's hess_init (docs/validation.md): levels of runs that differ in it
    # are not comparable; calibrated ones take their level from held-out data
    latest = store.latest_evaluations(list(hess_inits))
    uncalibrated = any(r not in latest or "calibration_scale" not in (latest[r].metrics or {}) for r in hess_inits)
    differ = uncalibrated and len({h[0] for h in hess_inits.values()}) > 1
    return templates.TemplateResponse(request, "compare.html", {"data_json": js(data), "ids": ids,
                                                                "hess_inits": hess_inits if differ else None,
                                                                "missing": missing,
                                                                "hess_init_scale": HESS_INIT_SCALE})


COMPARED = ("loo", "test_nll", "train_nll", "test_accuracy")


def _hess_init(config) -> tuple[object, str]:
    """(the hess_init a run trained with, how to say it): a job's config as the worker reads it, its default filled
    in; another config (a Tracker's) as stored, or "not stated"."""
    from app.store.job_config import ConfigError, parse_config

    opt = config.get("optimizer") if isinstance(config, dict) else None
    given = opt.get("hess_init") if isinstance(opt, dict) else None
    try:
        value = parse_config(config).optimizer.hess_init
    except (ConfigError, AttributeError, TypeError):
        return (repr(given), "not stated" if given is None else str(given))
    return (value, f"{value:g}" + (" (the default)" if given is None else ""))
