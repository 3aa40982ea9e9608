"""Request dependencies: the store and the API-token checks."""

from __future__ import annotations

from fastapi import Depends, Header, HTTPException, Request
from starlette.concurrency import run_in_threadpool

from app.store import Store


async def get_store(request: Request) -> Store:  # async: no thread-pool hop for an attribute read
    return request.app.state.store


def _token(authorization: str | None) -> str | None:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip()
    return None


def require_write(authorization: str | None = Header(default=None), store: Store = Depends(get_store)) -> None:
    """Every write needs a valid token: 401 without one, 403 with a wrong or revoked one."""
    token = _token(authorization)
    if token is None:
        raise HTTPException(401, "an API token is required (Authorization: Bearer …)",
                            headers={"WWW-Authenticate": "Bearer"})
    if not store.verify_token(token):
        raise HTTPException(403, "invalid or revoked API token")


async def require_read(request: Request, authorization: str | None = Header(default=None),
                       store: Store = Depends(get_store)) -> None:
    """Open reads cost no thread-pool hop; token-protected ones check the token in the pool."""
    if request.app.state.settings.read_requires_token:
        await run_in_threadpool(require_write, authorization, store)
