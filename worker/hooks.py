"""Hooks: Python callbacks, and webhooks receiving JSON events signed with HMAC-SHA256.

Webhooks are delivered by a background thread with exponential backoff, so training never waits on them.
Link-local and cloud-metadata targets are refused unless ``allow_link_local`` is set.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import queue
import threading
import time
from collections.abc import Callable

import httpx

from app.store.urls import check_webhook_url as check_url

EVENTS = ("evaluation", "early_stop", "finished", "failed")
SIGNATURE_HEADER = "X-Ivon-Diag-Signature"
log = logging.getLogger("ivon_diag.hooks")


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class HookDispatcher:
    """Sends events to Python callbacks (synchronously; errors are logged) and to webhooks (in the background)."""

    def __init__(self, webhooks: list[tuple[str, list[str], str]] | None = None,
                 callbacks: list[Callable[[str, dict], None]] | None = None, retries: int = 5,
                 backoff: float = 0.5, timeout: float = 5.0, allow_link_local: bool = False):
        self.callbacks = list(callbacks or [])
        self.webhooks = []
        for url, events, secret in webhooks or []:
            try:
                check_url(url, allow_link_local)
            except ValueError as err:
                log.warning("webhook skipped: %s", err)
                continue
            self.webhooks.append((url, set(events), secret))
        self.retries, self.backoff, self.timeout = retries, backoff, timeout
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self.delivered = 0
        self.failed = 0

    def emit(self, event: str, payload: dict) -> None:
        if event not in EVENTS:
            raise ValueError(f"unknown event {event!r}")
        message = {"event": event, **payload}
        for cb in self.callbacks:
            try:
                cb(event, message)
            except Exception:  # a user's callback must not kill the run
                log.exception("hook callback failed on %s", event)
        for url, events, secret in self.webhooks:
            if event in events:
                self._queue.put((url, secret, json.dumps(message, default=str).encode()))
                self._start()

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._deliver_forever, name="ivon-hooks", daemon=True)
            self._thread.start()

    def _deliver_forever(self) -> None:
        with httpx.Client(timeout=self.timeout) as client:
            while True:
                item = self._queue.get()
                if item is None:
                    self._queue.task_done()
                    return
                url, secret, body = item
                headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(secret, body)}
                for attempt in range(self.retries):
                    try:
                        r = client.post(url, content=body, headers=headers)
                        if r.status_code < 500 and r.status_code != 429:
                            self.delivered += r.is_success
                            self.failed += not r.is_success
                            break
                    except httpx.HTTPError:
                        pass
                    if attempt == self.retries - 1:
                        self.failed += 1
                        log.warning("webhook %s failed after %d attempts", url, self.retries)
                    else:
                        time.sleep(self.backoff * 2**attempt)
                self._queue.task_done()

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued (at most ``timeout`` seconds), then stop the thread."""
        if self._thread is None:
            return
        self._queue.put(None)
        self._thread.join(timeout)
