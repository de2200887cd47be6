"""A `qat fit` killed with SIGKILL at a random moment after its first checkpoint, then resumed with --resume auto,
ends with exactly the weights of an uninterrupted run with the same seed."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qat.checkpoint.io import load_checkpoint_file
from tests.conftest import REPO, run_qat

pytestmark = pytest.mark.slow

ARGS = ["--config", str(REPO / "recipes" / "bitnet-b158-tiny.yaml"), "--trainer.max_steps=16",
        "--run.checkpoint_every_n_steps=4", "--data.batch_size=4", "--data.seq_len=64",
        "--trainer.enable_progress_bar=false", "--model.optim.warmup_steps=2", "--trainer.limit_val_batches=0",
        "--trainer.precision=32-true"]


def test_sigkill_then_resume_auto_matches_an_uninterrupted_run(tmp_path: Path):
    reference = tmp_path / "reference"
    result = run_qat("fit", *ARGS, f"--trainer.default_root_dir={reference}")
    assert result.returncode == 0, result.stderr[-3000:]

    run_dir = tmp_path / "killed"
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}
    env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "1")
    command = [sys.executable, "-m", "qat.cli.main", "fit", *ARGS, f"--trainer.default_root_dir={run_dir}"]
    proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 600
        while not list((run_dir / "checkpoints").glob("step-*.ckpt")):
            assert proc.poll() is None, "the run ended before its first checkpoint"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        delay = random.uniform(0.0, 1.0)
        time.sleep(delay)
        assert proc.poll() is None, f"the run finished within {delay:.2f} s of its first checkpoint: nothing to kill"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    killed_at = sorted(p.name for p in (run_dir / "checkpoints").iterdir())

    resumed = run_qat("fit", *ARGS, f"--trainer.default_root_dir={run_dir}", "--resume", "auto")
    assert resumed.returncode == 0, f"killed {delay:.2f} s after the first checkpoint ({killed_at}):\n" + \
        resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    final = load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")
    expected = load_checkpoint_file(reference / "checkpoints" / "last.ckpt")
    assert final["global_step"] == expected["global_step"] == 16
    assert final["state_dict"].keys() == expected["state_dict"].keys()
    for name, tensor in expected["state_dict"].items():
        torch.testing.assert_close(final["state_dict"][name], tensor, rtol=1e-6, atol=0, msg=name)
    assert not [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith(".")]  # no temp files left
