"""The worker's view of the store: calls retried with backoff while the database is unreachable (a PostgreSQL
restart, a locked SQLite file), so that a run survives it. Every write it retries is idempotent."""

from __future__ import annotations

import time

from sqlalchemy.exc import DBAPIError, OperationalError

from app.store import DatabaseUnavailable, Store


class ResilientStore:
    def __init__(self, store: Store, retry_seconds: float = 120.0, log=print):
        self.store, self.retry_seconds, self.log = store, retry_seconds, log

    def __getattr__(self, name):
        attr = getattr(self.store, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            delay, deadline = 0.25, time.monotonic() + self.retry_seconds
            while True:
                try:
                    return attr(*args, **kwargs)
                except (OperationalError, DatabaseUnavailable) as err:
                    failure = err
                except DBAPIError as err:
                    if not err.connection_invalidated:
                        raise
                    failure = err
                if time.monotonic() > deadline:
                    raise failure
                self.log(f"store.{name}: database unavailable ({str(failure).splitlines()[0][:120]}); retrying")
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

        return call
