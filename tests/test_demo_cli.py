import subprocess
import sys

from worker.demo import run_demo


def test_demo_finds_flipped_labels_among_the_most_sensitive():
    lines = []
    hist = run_demo(epochs=10, eval_every=5, out=lines.append)
    assert len(hist) == 2 and "flipped" in lines[0]
    last = hist[-1]
    assert last["flipped_in_top"] > 0.5  # 10% flipped: chance would be 0.1
    assert last["loo"] > last["train_nll"]


def test_cli_rejects_bad_arguments_with_a_clear_message():
    out = subprocess.run([sys.executable, "-m", "worker.cli", "demo", "--flip", "1.5"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and "Invalid flip fraction" in out.stderr and "Traceback" not in out.stderr
