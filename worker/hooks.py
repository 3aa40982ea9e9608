"""Hooks: Python callbacks, and webhooks receiving JSON events signed with HMAC-SHA256.

Each webhook has its own delivery thread with exponential backoff, so training never waits on them and a slow or
dead target never delays another's events. Every connect resolves the host again, checks each address against
the URL policy (``app.store.urls``: no loopback, private, link-local, metadata … unless allowed) and connects to
the checked address itself, so a name that re-resolves between the check and the connect reaches nothing else.
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
from urllib.parse import urlsplit

import httpx

from app.store.urls import allowed_networks, check_webhook_url

EVENTS = ("evaluation", "early_stop", "finished", "failed", "influence")
SIGNATURE_HEADER = "X-Ivon-Diag-Signature"
log = logging.getLogger("ivon_diag.hooks")


def check_url(url: str, allow=None) -> None:
    """The registration check (ValueError when refused)."""
    check_webhook_url(url, allow)


def sign(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def pinned_request(url: str, allow) -> tuple[httpx.URL, dict, dict]:
    """The URL with its host replaced by a checked address, the Host header and the TLS server name to send:
    raises ValueError when the host now resolves to a refused address (or to none)."""
    addrs = check_webhook_url(url, allow)
    if not addrs:
        raise ValueError(f"webhook host {urlsplit(url).hostname!r} does not resolve")
    parsed = httpx.URL(url)
    host = parsed.host
    headers = {"Host": parsed.netloc.decode("ascii")}
    return parsed.copy_with(host=str(addrs[0])), headers, {"sni_hostname": host}


class _Target:
    """One webhook: its queue of signed bodies and the thread that delivers them in order."""

    def __init__(self, url: str, events: set[str], secret: str):
        self.url, self.events, self.secret = url, events, secret
        self.queue: queue.Queue = queue.Queue()
        self.thread: threading.Thread | None = None


class HookDispatcher:
    """Sends events to Python callbacks (synchronously; errors are logged) and to webhooks (in the background)."""

    def __init__(self, webhooks: list[tuple[str, list[str], str]] | None = None,
                 callbacks: list[Callable[[str, dict], None]] | None = None, retries: int = 5,
                 backoff: float = 0.5, timeout: float = 5.0, allow: str | None = None):
        self.callbacks = list(callbacks or [])
        self.allow = allowed_networks(allow)
        self.targets: list[_Target] = []
        for url, events, secret in webhooks or []:
            try:
                check_url(url, self.allow)
            except ValueError as err:
                log.warning("webhook skipped: %s", err)
                continue
            self.targets.append(_Target(url, set(events), secret))
        self.retries, self.backoff, self.timeout = retries, backoff, timeout
        self._closing = threading.Event()  # set by close(): retries stop waiting, what is left is dropped
        self.delivered = 0
        self.failed = 0
        self._count = threading.Lock()

    @property
    def webhooks(self) -> list[tuple[str, set[str], str]]:
        return [(t.url, t.events, t.secret) for t in self.targets]

    def emit(self, event: str, payload: dict) -> None:
        if event not in EVENTS:
            raise ValueError(f"unknown event {event!r}")
        message = {"event": event, **payload}
        for cb in self.callbacks:
            try:
                cb(event, message)
            except Exception:  # a user's callback must not kill the run
                log.exception("hook callback failed on %s", event)
        body = None
        for target in self.targets:
            if event in target.events:
                body = body or json.dumps(message, default=str).encode()
                target.queue.put(body)
                if target.thread is None:
                    target.thread = threading.Thread(target=self._deliver_forever, args=(target,),
                                                     name="ivon-hook", daemon=True)
                    target.thread.start()

    def _deliver_forever(self, target: _Target) -> None:
        with httpx.Client(timeout=self.timeout, follow_redirects=False, trust_env=False) as client:
            while not self._closing.is_set() and (body := target.queue.get()) is not None:
                ok = self._deliver(client, target, body)
                with self._count:
                    self.delivered += ok
                    self.failed += not ok

    def _deliver(self, client: httpx.Client, target: _Target, body: bytes) -> bool:
        headers = {"Content-Type": "application/json", SIGNATURE_HEADER: sign(target.secret, body)}
        for attempt in range(self.retries):
            try:
                url, host, ext = pinned_request(target.url, self.allow)
            except ValueError as err:  # refused now (re-resolved elsewhere) or gone: no connect at all
                log.warning("webhook not sent: %s", err)
                return False
            try:
                r = client.post(url, content=body, headers={**headers, **host}, extensions=ext)
                if r.status_code < 500 and r.status_code != 429:
                    return r.is_success
            except httpx.HTTPError:
                pass
            if attempt < self.retries - 1 and self._closing.wait(self.backoff * 2**attempt):
                break  # closing: no more waiting on this target
        log.warning("webhook %s failed after %d attempts", target.url, attempt + 1)
        return False

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued (at most ``timeout`` seconds in all, every target in parallel), then stop."""
        for t in self.targets:
            t.queue.put(None)
        deadline = time.monotonic() + timeout
        for t in self.targets:
            if t.thread is not None:
                t.thread.join(max(0.0, deadline - time.monotonic()))
        self._closing.set()
        for t in self.targets:  # woken from their backoff, they count what they held and stop
            if t.thread is not None:
                t.thread.join(0.5)
        with self._count:
            for t in self.targets:  # never sent: counted, not silently lost
                self.failed += sum(1 for body in list(t.queue.queue) if body is not None)
