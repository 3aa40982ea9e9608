"""Keep freed memory in the process's heap instead of handing it back to the OS after every large free.

A sensitivity pass allocates and frees the same activation-sized tensors part after part, and training does so
batch after batch. glibc returns freed memory at the top of its heap once it exceeds a trim threshold (128 KiB to
64 MiB, adapted on the fly), so the next part page-faults it in again, zero-filled by the kernel. Measured on the
2-core CI machine (``python bench/sensitivity.py --cases malloc``, see the README): the first-order pass of a
ResNet-20 took 2.44 s with glibc's defaults and 1.43 s with the settings here; the epoch it is compared with 0.53 s
either way. The price: the process keeps up to ``trim_bytes`` of freed memory (its RSS does not shrink after a
pass), the same trade PyTorch's CPU tuning guide makes by recommending jemalloc or tcmalloc.

The worker's commands apply it at start (``IVON_DIAG_MALLOC=system`` keeps glibc's defaults). A library user's
own process can call :func:`keep_heap`, or set ``MALLOC_TRIM_THRESHOLD_`` and ``MALLOC_MMAP_THRESHOLD_``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_MAX = 32 << 20  # the largest mmap threshold glibc accepts on 64-bit


def keep_heap(trim_bytes: int = 1 << 30, mmap_bytes: int = MMAP_MAX) -> bool:
    """Retain up to ``trim_bytes`` of freed heap and serve allocations below ``mmap_bytes`` from it (glibc only).

    Returns whether the settings took effect: False off Linux, with another C library (musl), or when
    ``IVON_DIAG_MALLOC=system``. Bad values raise ValueError."""
    if not 0 < mmap_bytes <= MMAP_MAX:
        raise ValueError(f"mmap_bytes must be in (0, {MMAP_MAX}], got {mmap_bytes}")
    if not 0 < trim_bytes < 1 << 31:
        raise ValueError(f"trim_bytes must be in (0, 2**31), got {trim_bytes}")
    choice = os.environ.get("IVON_DIAG_MALLOC", "heap")
    if choice not in ("heap", "system"):
        raise ValueError(f"IVON_DIAG_MALLOC must be 'heap' or 'system', got {choice!r}")
    if choice == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, mmap_bytes)) and bool(mallopt(M_TRIM_THRESHOLD, trim_bytes))
