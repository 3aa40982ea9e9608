"""Webhooks: register (the URL policy of app.store.urls), list, delete. Every route needs a write token."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError

from app.api.deps import get_store, require_write
from app.api.routes.common import ERRORS, INT32, PREFIX
from app.api.schemas import HookCreate, HookOut
from app.store import Store
from app.store.urls import check_webhook_url

router = APIRouter(prefix=PREFIX, responses=ERRORS, tags=["hooks"])


@router.post("/hooks", response_model=HookOut, status_code=201, dependencies=[Depends(require_write)],
             response_model_exclude_none=True)
def create_hook(body: HookCreate, store: Store = Depends(get_store)):
    """Register a webhook; its HMAC secret is returned in this response only."""
    try:
        check_webhook_url(body.url)
    except ValueError as err:  # the same shape as every other 422
        raise RequestValidationError([{"loc": ("body", "url"), "msg": str(err), "type": "value_error"}]) from None
    if body.run_id is not None:
        store.get_run(body.run_id)
    hook = store.add_hook(body.url, body.events, run_id=body.run_id)
    return _hook_out(hook, hook.secret)


@router.get("/hooks", response_model=list[HookOut], dependencies=[Depends(require_write)],
            response_model_exclude_none=True)
def list_hooks(run_id: int | None = Query(None, ge=0, le=INT32), store: Store = Depends(get_store)):
    return [_hook_out(h) for h in store.hooks_for(run_id)]


def _hook_out(hook, secret: str | None = None) -> HookOut:
    fields = {"id": hook.id, "url": hook.url, "events": hook.events, "run_id": hook.run_id, "secret": secret}
    return HookOut(**{k: v for k, v in fields.items() if v is not None})


@router.delete("/hooks/{hook_id}", status_code=204, dependencies=[Depends(require_write)])
def delete_hook(hook_id: Annotated[int, PathParam(ge=0, le=INT32)], store: Store = Depends(get_store)):
    store.delete_hook(hook_id)
    return Response(status_code=204)
