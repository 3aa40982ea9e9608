"""Request dependencies: the store and the API-token checks.

Writes need ``Authorization: Bearer <token>``. With ``IVON_DIAG_READ_REQUIRES_TOKEN`` every read needs a token too:
the header, or the dashboard's session cookie (set by ``/login``; HttpOnly, SameSite=Strict, and never accepted for
a write, so a cross-site request cannot use it)."""

from __future__ import annotations

from fastapi import Depends, Header, HTTPException, Request
from starlette.concurrency import run_in_threadpool

from app.store import Store

SESSION_COOKIE = "ivon_diag_token"


class LoginRequired(Exception):
    """A dashboard page asked for without a valid session: the app redirects to /login."""


async def get_store(request: Request) -> Store:  # async: no thread-pool hop for an attribute read
    return request.app.state.store


def _token(authorization: str | None) -> str | None:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None


def _check(token: str | None, store: Store) -> None:
    if token is None:
        raise HTTPException(401, "an API token is required (Authorization: Bearer …)",
                            headers={"WWW-Authenticate": "Bearer"})
    if not store.verify_token(token):
        raise HTTPException(403, "invalid or revoked API token")


def require_write(authorization: str | None = Header(default=None), store: Store = Depends(get_store)) -> None:
    """Every write needs a valid token in the header: 401 without one, 403 with a wrong or revoked one."""
    _check(_token(authorization), store)


async def require_read(request: Request, authorization: str | None = Header(default=None),
                       store: Store = Depends(get_store)) -> None:
    """Open reads cost no thread-pool hop; token-protected ones check the header or the session cookie."""
    if request.app.state.settings.read_requires_token:
        token = _token(authorization) or request.cookies.get(SESSION_COOKIE)
        await run_in_threadpool(_check, token, store)


async def require_page(request: Request, authorization: str | None = Header(default=None),
                       store: Store = Depends(get_store)) -> None:
    """``require_read`` for dashboard pages: a missing or refused token sends the browser to /login."""
    try:
        await require_read(request, authorization, store)
    except HTTPException as err:
        raise LoginRequired(str(err.detail)) from None
