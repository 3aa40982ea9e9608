"""The worker keeps freed memory in its heap (glibc), and says clearly when asked for something else."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from worker.allocator import MMAP_MAX, keep_heap

# Allocate 256 MiB in 8 MiB tensors, free them all, report RSS before and after the free (MiB).
PROBE = """
import json, resource, torch
from worker.allocator import keep_heap
took = keep_heap()
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20
xs = [torch.ones(2 << 20) for _ in range(32)]
held = rss()
del xs
print(json.dumps({"took": took, "held": held, "after": rss()}))
"""


def _probe(malloc: str) -> dict:
    env = dict(os.environ, IVON_DIAG_MALLOC=malloc)
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_tensors_stay_in_the_heap_unless_system_is_asked_for():
    kept, system = _probe("heap"), _probe("system")
    assert kept["took"] and not system["took"]
    assert kept["held"] - kept["after"] < 32  # the 256 MiB stay with the process, ready for the next pass
    assert system["held"] - system["after"] > 200  # glibc's defaults hand each 8 MiB block back


@pytest.mark.parametrize(("kwargs", "match"), [({"mmap_bytes": 0}, "mmap_bytes"),
                                               ({"mmap_bytes": MMAP_MAX + 1}, "mmap_bytes"),
                                               ({"trim_bytes": 1 << 31}, "trim_bytes"),
                                               ({"trim_bytes": -1}, "trim_bytes")])
def test_bad_values_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        keep_heap(**kwargs)


def test_an_unknown_choice_is_a_clear_cli_error():
    env = dict(os.environ, IVON_DIAG_MALLOC="jemalloc")
    out = subprocess.run([sys.executable, "-m", "ivon_diag.cli", "validate", "--quick"], capture_output=True, text=True,
                         env=env)
    assert out.returncode == 2
    assert "IVON_DIAG_MALLOC must be 'heap' or 'system', got 'jemalloc'" in out.stderr
