"""The FastAPI application: REST API, health endpoints, errors mapped without stack traces."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from pathlib import Path
from urllib.parse import quote

import anyio.to_thread
import fastapi_offline
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from app.api.deps import LoginRequired, require_page, require_read
from app.api.routes import ROUTERS
from app.cache import ResponseCache
from app.dashboard import router as dashboard_router
from app.limits import BodyLimit
from app.metrics import install as install_metrics
from app.settings import Settings
from app.store import Conflict, CorruptData, NotFound, SchemaOutdated, Store, StoreError, WriteRefused, ensure_current

log = logging.getLogger("ivon_diag.app")


def _version() -> str:
    """The installed package's version (pyproject.toml), "unknown" from a bare source tree."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ivon-diagnostics")
    except PackageNotFoundError:
        return "unknown"


def create_app(settings: Settings | None = None, store: Store | None = None) -> FastAPI:
    settings = settings or Settings()

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        # Store reads are CPU-bound on SQLite: anyio's 40 threads would only fight over the GIL.
        threads = settings.threads or 2 * (os.cpu_count() or 1)
        anyio.to_thread.current_default_thread_limiter().total_tokens = threads
        yield

    app = FastAPI(title="ivon-diag", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None, description="Generalization and data-sensitivity diagnostics during training.")
    app.state.settings = settings
    app.state.draining = threading.Event()  # set on SIGTERM: live streams end, /readyz says so, requests finish
    app.state.store = store or Store(settings.db)
    app.add_middleware(ResponseCache, ttl=settings.cache_seconds)  # inside CORS: its headers depend on Origin
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins,
                           allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    install_metrics(app, app.state.store)
    for router in ROUTERS:
        app.include_router(router)
    app.include_router(dashboard_router)

    # the schema and its viewers are reads like any other: behind the token when reads are
    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(require_read)])
    def openapi():
        return JSONResponse(app.openapi())

    # Swagger UI and ReDoc from the installed fastapi-offline package: the docs work without a network
    app.mount("/static/docs", StaticFiles(directory=Path(fastapi_offline.__file__).parent / "static"), name="docs")

    @app.get("/docs", include_in_schema=False, dependencies=[Depends(require_page)])
    def swagger():
        return get_swagger_ui_html(openapi_url="/openapi.json", title="ivon-diag API",
                                   swagger_js_url="/static/docs/swagger-ui-bundle.js",
                                   swagger_css_url="/static/docs/swagger-ui.css", swagger_favicon_url="data:,")

    @app.get("/redoc", include_in_schema=False, dependencies=[Depends(require_page)])
    def redoc():
        return get_redoc_html(openapi_url="/openapi.json", title="ivon-diag API", with_google_fonts=False,
                              redoc_js_url="/static/docs/redoc.standalone.js", redoc_favicon_url="data:,")

    @app.exception_handler(LoginRequired)
    async def login_required(request: Request, _: LoginRequired):
        return RedirectResponse(f"/login?next={quote(request.url.path)}", status_code=303)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, err: RequestValidationError):
        # loc, msg and type of each error: never the input back (it may be infinite, NUL-laden or huge)
        detail = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
                  for e in err.errors()]
        return JSONResponse({"detail": detail}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        headers = dict(err.headers or {})
        if err.status_code == 405:  # every method the path serves, not only the first matching route's
            headers["Allow"] = ", ".join(sorted({m for r in app.routes if r.matches(request.scope)[0] != Match.NONE
                                                 for m in getattr(r, "methods", None) or ()}))
        return JSONResponse({"detail": err.detail}, status_code=err.status_code, headers=headers)

    @app.exception_handler(Conflict)
    async def conflict(_: Request, err: Conflict):
        return JSONResponse({"detail": str(err)}, status_code=409)

    @app.exception_handler(NotFound)
    async def not_found(_: Request, err: NotFound):
        return JSONResponse({"detail": str(err)}, status_code=404)

    @app.exception_handler(CorruptData)
    async def corrupt(request: Request, err: CorruptData):  # the database answers; what it holds does not decode
        log.error("corrupt data behind %s: %s", request.url.path, err)
        return JSONResponse({"detail": f"stored data behind this request is corrupt: {err}"}, status_code=500)

    @app.exception_handler(StoreError)
    async def store_error(_: Request, err: StoreError):
        log.error("store error: %s", err)
        if isinstance(err, WriteRefused):  # reads still work: say why writes do not
            return JSONResponse({"detail": str(err).split(":")[0]}, status_code=503)
        return JSONResponse({"detail": "the database is unavailable"}, status_code=503)

    @app.exception_handler(OperationalError)
    async def unavailable(_: Request, err: OperationalError):  # locked, unreachable, I/O: the database's state
        log.error("database error: %s", str(err.orig or err).splitlines()[0][:200])
        return JSONResponse({"detail": "the database is unavailable"}, status_code=503)

    @app.exception_handler(Exception)
    async def internal(_: Request, err: Exception):  # never a stack trace to a client
        log.exception("unhandled error")
        return JSONResponse({"detail": "internal error"}, status_code=500)

    @app.get("/healthz", include_in_schema=False)
    def healthz():
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    def readyz():
        if app.state.draining.is_set():
            return JSONResponse({"status": "draining"}, status_code=503)
        try:
            ensure_current(app.state.store.engine)
        except SchemaOutdated as err:
            return JSONResponse({"status": "schema outdated", "detail": str(err)}, status_code=503)
        except StoreError:
            return JSONResponse({"status": "database unreachable"}, status_code=503)
        return {"status": "ready"}

    return app
