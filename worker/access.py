"""What a job may read and import on a worker: data files under the data roots, factories from allowed modules.

A job's config comes from whoever holds an API token; the worker, not the config, decides what it may touch.
- ``IVON_DIAG_DATA_ROOTS``: folders (separated by ``os.pathsep``) that data paths must lie in after symlinks are
  resolved; default: the worker's working directory.
- ``IVON_DIAG_FACTORY_MODULES``: comma-separated module prefixes a ``data.factory`` may name (``mypkg`` admits
  ``mypkg`` and ``mypkg.data``); default: none, so factories are off until the operator names their modules.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_ROOTS_ENV = "IVON_DIAG_DATA_ROOTS"
FACTORY_MODULES_ENV = "IVON_DIAG_FACTORY_MODULES"


def data_roots() -> list[Path]:
    value = os.environ.get(DATA_ROOTS_ENV, "")
    roots = [Path(p).expanduser().resolve() for p in value.split(os.pathsep) if p.strip()]
    return roots or [Path.cwd().resolve()]


def confined(path: str | Path, field: str) -> Path:
    """``path`` resolved (symlinks followed), or ValueError naming ``field`` when it is outside every data root.

    Checked before the file is opened, so the error says nothing about whether the file exists."""
    resolved = Path(path).expanduser().resolve()
    roots = data_roots()
    if not any(resolved.is_relative_to(root) for root in roots):
        raise ValueError(f"{field} {str(path)!r} is outside the worker's data roots ({', '.join(map(str, roots))}); "
                         f"the operator can add a folder to {DATA_ROOTS_ENV}")
    return resolved


def factory_modules() -> list[str]:
    return [m.strip() for m in os.environ.get(FACTORY_MODULES_ENV, "").split(",") if m.strip()]


def check_factory(spec: str) -> None:
    """ValueError unless the factory's module is under one of the allowed prefixes (checked before any import)."""
    module = spec.partition(":")[0]
    allowed = factory_modules()
    if not any(module == p or module.startswith(p + ".") for p in allowed):
        where = f"it admits {', '.join(allowed)}" if allowed else "it is empty, so factories are off"
        raise ValueError(f"data.factory {spec!r}: module {module!r} is not in {FACTORY_MODULES_ENV} ({where}); the "
                         "operator names the module prefixes that jobs may import there")
