"""The live stream: Server-Sent Events, one per new evaluation."""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse

from app.api.deps import get_store
from app.api.routes.common import ERRORS, INT32, PREFIX, RunId, read
from app.store import Store

router = APIRouter(prefix=PREFIX, responses=ERRORS, tags=["live"])


@router.get("/runs/{run_id}/events", dependencies=read, tags=["live"],
            response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}},
                                       "description": "`event: evaluation` per new evaluation, then `event: status`"}})
async def events(request: Request, run_id: RunId, since_step: int = Query(-1, ge=-1, le=INT32),
                 store: Store = Depends(get_store)):
    """Server-Sent Events: one ``evaluation`` event per new evaluation (steps after ``since_step``)."""
    store.get_run(run_id)

    async def stream():
        last = since_step
        yield "retry: 2000\n\n"
        draining = request.app.state.draining
        while not draining.is_set() and not await request.is_disconnected():
            evs = await asyncio.to_thread(store.evaluations, run_id, last, 100)
            for ev in evs:
                last = ev.step
                payload = {"step": ev.step, "loo": ev.loo, **{k: v for k, v in ev.metrics.items()}}
                yield f"event: evaluation\nid: {ev.step}\ndata: {json.dumps(payload)}\n\n"
            run = await asyncio.to_thread(store.get_run, run_id)
            if run.status in ("done", "failed", "cancelled") and not evs:
                yield f"event: status\ndata: {json.dumps({'status': run.status})}\n\n"
                return
            for _ in range(10):  # wake often enough to end promptly when the server drains
                if draining.is_set():
                    return
                await asyncio.sleep(0.1)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
