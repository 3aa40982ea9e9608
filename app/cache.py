"""A short-lived cache of API reads (pure ASGI middleware).

Many dashboards and scripts poll the same few runs; the data only changes when a worker writes an evaluation.
Serving a GET under /api/v1 from memory for ``ttl`` seconds (1 by default) bounds how stale an answer can be by
that much, keeps the database's load independent of the number of clients, and takes the hot path off the
thread pool. Only 200 answers of bounded size are kept; the key includes the Authorization header, so an
answer given to one token is never served to a request without it. Concurrent misses of one key make one
database read (the others wait for it). Any write through this process empties the cache when it answers.
Live event streams are never cached.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from dataclasses import dataclass


@dataclass
class _Entry:
    expires: float
    start: dict
    body: bytes
    route: object


class ResponseCache:
    def __init__(self, app, ttl: float = 1.0, max_entries: int = 2048, max_body: int = 1 << 20,
                 prefix: str = "/api/v1/"):
        self.app, self.ttl, self.max_entries, self.max_body, self.prefix = app, ttl, max_entries, max_body, prefix
        self.entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self.inflight: dict[tuple, asyncio.Future] = {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or self.ttl <= 0:
            return await self.app(scope, receive, send)
        if scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, self._clearing(send))
        if scope["method"] != "GET" or not scope["path"].startswith(self.prefix) or scope["path"].endswith("/events"):
            return await self.app(scope, receive, send)
        auth = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        key = (scope["path"], scope["query_string"], auth)
        entry = self._fresh(key)
        if entry is None and key in self.inflight:
            entry = await asyncio.shield(self.inflight[key])
            if entry is None:  # not cacheable (an error, say): ask the app, without making others wait
                return await self.app(scope, receive, send)
        if entry is not None:
            return await self._replay(entry, scope, send)
        fut = asyncio.get_running_loop().create_future()
        self.inflight[key] = fut
        try:
            fut.set_result(await self._fetch(key, scope, receive, send))
        finally:
            if not fut.done():
                fut.set_result(None)
            if self.inflight.get(key) is fut:
                del self.inflight[key]

    def _fresh(self, key) -> _Entry | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        if entry.expires <= time.monotonic():
            del self.entries[key]
            return None
        self.entries.move_to_end(key)
        return entry

    async def _replay(self, entry: _Entry, scope, send) -> None:
        if entry.route is not None:
            scope["route"] = entry.route  # for the latency metric's route label
        await send(entry.start)
        await send({"type": "http.response.body", "body": entry.body})

    async def _fetch(self, key, scope, receive, send) -> _Entry | None:
        start: dict = {}
        parts: list[bytes] = []
        size = 0

        async def capture(message):
            nonlocal size
            if message["type"] == "http.response.start":
                start.update(message)
            elif message["type"] == "http.response.body" and size <= self.max_body:
                parts.append(message.get("body", b""))
                size += len(parts[-1])
            await send(message)

        await self.app(scope, receive, capture)
        if start.get("status") != 200 or size > self.max_body:
            return None
        entry = _Entry(time.monotonic() + self.ttl, start, b"".join(parts), scope.get("route"))
        self.entries[key] = entry
        while len(self.entries) > self.max_entries:
            self.entries.popitem(last=False)
        return entry

    def _clearing(self, send):
        async def wrapped(message):
            if message["type"] == "http.response.start":
                self.entries.clear()  # the write has been committed when its answer starts
            await send(message)

        return wrapped
