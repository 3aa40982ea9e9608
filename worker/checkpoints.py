"""A run's checkpoints, bound to its identity: ``<dir>/<run uid>/resume.pt`` (the state a killed job resumes from),
``<dir>/<run uid>/model.pt`` (the final weights, kept as the run's artifact) and ``<dir>/<run uid>/evaluations/``
(the newest evaluations' weights and posterior, for influence queries at those steps).

Run ids restart with a new database; the uid does not, so a new run never picks up another run's state. Each
resume state also records the run's uid and a digest of its config, checked before anything is loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch

RESUME, MODEL, EVALUATIONS = "resume.pt", "model.pt", "evaluations"


class CheckpointMismatch(RuntimeError):
    """A resume state that belongs to another run or another config."""


def config_digest(config: dict) -> str:
    """SHA-256 of the config's canonical JSON: what a resume state must have been trained with."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def run_folder(checkpoint_dir: str | Path, run_uid: str) -> Path:
    if not run_uid or not all(c in "0123456789abcdef" for c in run_uid):
        raise ValueError(f"invalid run uid {run_uid!r}")  # it names a folder: hex only
    return Path(checkpoint_dir) / run_uid


def evaluation_path(folder: Path, step: int) -> Path:
    return folder / EVALUATIONS / f"step-{int(step):010d}.pt"


def kept_steps(folder: Path) -> list[int]:
    """The steps whose evaluation states are kept, oldest first."""
    found = []
    for path in (folder / EVALUATIONS).glob("step-*.pt"):
        digits = path.stem.removeprefix("step-")
        if digits.isdigit():
            found.append(int(digits))
    return sorted(found)


class Checkpoints:
    def __init__(self, checkpoint_dir: str | Path, run_uid: str, config: dict | None = None):
        """``config``: the run's, which a resume state must match (None: only to end or remove the run's files)."""
        self.folder = run_folder(checkpoint_dir, run_uid)
        self.resume_path, self.model_path = self.folder / RESUME, self.folder / MODEL
        self.run_uid, self.digest = run_uid, None if config is None else config_digest(config)

    def has_resume(self) -> bool:
        return self.resume_path.exists()

    def save_resume(self, state: dict) -> None:
        self._save({**state, "run_uid": self.run_uid, "config_digest": self.digest}, self.resume_path)

    def load_resume(self) -> dict:
        """The resume state, refused with CheckpointMismatch when it is another run's or another config's."""
        try:  # tensors, numbers and containers only: a checkpoint file cannot run code
            state = torch.load(self.resume_path, weights_only=True, map_location="cpu")
        except Exception as err:
            raise CheckpointMismatch(f"checkpoint {self.resume_path} cannot be read ({type(err).__name__}); "
                                     "delete it to start the run again") from None
        if not isinstance(state, dict) or state.get("run_uid") != self.run_uid:
            raise CheckpointMismatch(f"checkpoint {self.resume_path} belongs to another run (uid "
                                     f"{state.get('run_uid') if isinstance(state, dict) else None!r}, this run "
                                     f"{self.run_uid}); refusing to resume from it")
        if state.get("config_digest") != self.digest:
            raise CheckpointMismatch(f"checkpoint {self.resume_path} was written with another config; refusing to "
                                     "resume from it (delete it to start the run again)")
        return state

    def save_model(self, state: dict) -> None:
        self._save(state, self.model_path)

    def save_evaluation(self, step: int, state: dict, keep: int) -> None:
        """An evaluation's weights and posterior (for influence queries at that step); only the newest ``keep``
        stay."""
        if keep < 1:
            return
        self._save(state, evaluation_path(self.folder, step))
        for old in kept_steps(self.folder)[:-keep]:
            evaluation_path(self.folder, old).unlink(missing_ok=True)

    def finish(self) -> None:
        """The run has ended: drop its resume state, keep the final model (and the folder only if it holds one)."""
        self.resume_path.unlink(missing_ok=True)
        self.resume_path.with_suffix(".tmp").unlink(missing_ok=True)
        if self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()

    def remove(self) -> None:
        """Everything the run wrote (its scores are deleted with it)."""
        shutil.rmtree(self.folder, ignore_errors=True)

    @staticmethod
    def _save(state: dict, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)  # atomic: a kill leaves the old or the new file, never half of one


def reap_deleted(store, checkpoint_dir: str | Path, after: int = 0, log=print) -> int:
    """Remove the checkpoint folders of runs deleted since tombstone ``after`` (a run deleted through the API, whose
    process may not see this disk); returns the newest tombstone read, to start from next time."""
    for tomb, uid in store.deleted_uids(after):
        after = tomb
        try:
            folder = run_folder(checkpoint_dir, uid)
        except ValueError:
            continue
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
            log(f"removed the checkpoints of deleted run {uid}")
    return after
