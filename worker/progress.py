"""What a worker prints: a tqdm bar of training steps and plain lines on a terminal; otherwise one JSON object per
line (time, message and the message's fields), for log collectors."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

from tqdm import tqdm


def console_log(tty: bool | None = None):
    """A ``log(msg, **fields)`` for the worker's messages; ``log.structured`` says it keeps the fields."""
    tty = sys.stdout.isatty() if tty is None else tty

    def plain(msg: str, **_fields) -> None:
        tqdm.write(msg)  # above a progress bar, not through it

    def structured(msg: str, **fields) -> None:
        line = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"), "msg": msg, **fields}
        print(json.dumps(line, default=str), flush=True)

    log = plain if tty else structured
    log.structured = not tty
    return log


class _Forward(logging.Handler):
    def __init__(self, log):
        super().__init__(logging.INFO)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        self.log(record.getMessage(), event="library", logger=record.name, level=record.levelname)


def forward_library_logs(log, names: tuple[str, ...] = ("ivon_core",)) -> None:
    """Show the libraries' INFO messages (IVON's kernel compilation: a first step of ~30 s that would look like a
    hang) through the worker's ``log``; a later call replaces the earlier one's."""
    for name in names:
        logger = logging.getLogger(name)
        for h in [h for h in logger.handlers if isinstance(h, _Forward)]:
            logger.removeHandler(h)
        logger.addHandler(_Forward(log))
        logger.setLevel(min(logger.level or logging.INFO, logging.INFO))


class StepBar:
    """Training steps as a tqdm bar (on stderr) when enabled, with the latest evaluation as its postfix."""

    def __init__(self, enabled: bool, total: int, initial: int, desc: str):
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                        file=sys.stderr) if enabled else None

    def update(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def show(self, **values: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
