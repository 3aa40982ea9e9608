"""Webhooks and API tokens (only a token's SHA-256 is stored)."""

from __future__ import annotations

import hashlib
import secrets

from sqlalchemy import delete, or_, select, update
from sqlalchemy.orm import Session

from app.store.engine import NotFound
from app.store.models import ApiToken, Hook


class HooksAndTokens:
    """Mixed into ``Store``, whose ``session`` it uses."""

    def session(self, write: bool = False) -> Session:
        raise NotImplementedError

    def add_hook(self, url: str, events: list[str], run_id: int | None = None, secret: str | None = None) -> Hook:
        with self.session(write=True) as s, s.begin():
            hook = Hook(url=url, events=list(events), run_id=run_id, secret=secret or secrets.token_hex(32))
            s.add(hook)
        return hook

    def hooks_for(self, run_id: int | None) -> list[Hook]:
        with self.session() as s:
            return list(s.scalars(select(Hook).where(or_(Hook.run_id.is_(None), Hook.run_id == run_id))))

    def delete_hook(self, hook_id: int) -> None:
        with self.session(write=True) as s, s.begin():
            if s.execute(delete(Hook).where(Hook.id == hook_id)).rowcount == 0:
                raise NotFound(f"hook {hook_id} not found")

    @staticmethod
    def _hash(token: str) -> str:
        return hashlib.sha256(token.encode()).hexdigest()

    def create_token(self, name: str) -> str:
        """A new API token; only its SHA-256 is stored, the plaintext is returned once."""
        token = "ivd_" + secrets.token_urlsafe(32)
        with self.session(write=True) as s, s.begin():
            s.add(ApiToken(name=name, token_hash=self._hash(token)))
        return token

    def verify_token(self, token: str | None) -> bool:
        if not token:
            return False
        with self.session() as s:
            row = s.scalars(select(ApiToken).where(ApiToken.token_hash == self._hash(token),
                                                   ApiToken.revoked.is_(False))).first()
            return row is not None

    def revoke_token(self, name: str) -> None:
        with self.session(write=True) as s, s.begin():
            if s.execute(update(ApiToken).where(ApiToken.name == name).values(revoked=True)).rowcount == 0:
                raise NotFound(f"token {name!r} not found")
