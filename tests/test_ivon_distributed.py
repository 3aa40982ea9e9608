import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.parametrize("noise,size", [("torch", "small"), ("counter", "small"), ("auto", "large")])
def test_two_gloo_ranks_draw_different_noise_and_average_statistics(tmp_path, noise, size):
    # auto, large: the default's fused kernels with counter noise, each rank drawing its own
    out = tmp_path / "report.json"
    script = Path(__file__).with_name("_dist_ivon.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script), str(out),
           noise, size]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert all(report["noise_differs"])
    assert all(report["momentum_is_rank_mean"])
    assert report["ranks_agree"]
    assert report["noise_kind"] == ("counter" if noise == "auto" else noise)
    assert report["fused"] == (size == "large")
