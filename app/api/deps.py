"""Request dependencies: the store and the API-token checks."""

from __future__ import annotations

from fastapi import Depends, Header, HTTPException, Request

from app.store import Store


def get_store(request: Request) -> Store:
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


def require_read(request: Request, authorization: str | None = Header(default=None),
                 store: Store = Depends(get_store)) -> None:
    if request.app.state.settings.read_requires_token:
        require_write(authorization, store)
