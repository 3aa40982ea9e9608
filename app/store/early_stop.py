"""Early stopping's state per run (monitor, best value and step, patience used, the step it stopped at), kept so
that a resumed job continues it and the API can show it."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.store.models import EarlyStopState, finite


class EarlyStopStates:
    """Mixed into ``Store``, whose ``session`` it uses."""

    def session(self, write: bool = False) -> Session:
        raise NotImplementedError

    def save_early_stop(self, run_id: int, **values) -> None:
        with self.session(write=True) as s, s.begin():
            st = s.get(EarlyStopState, run_id)
            if st is None:
                st = EarlyStopState(run_id=run_id, monitor=values.pop("monitor", "loo"), mode=values.pop("mode", "min"))
                s.add(st)
            for k, v in values.items():
                setattr(st, k, finite(v) if k == "best" else v)

    def early_stop(self, run_id: int) -> EarlyStopState | None:
        with self.session() as s:
            return s.get(EarlyStopState, run_id)
