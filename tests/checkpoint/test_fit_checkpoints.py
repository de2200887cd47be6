"""Checkpoints of real `qat fit` runs (tiny recipe, CLI in a subprocess): one writer of last.ckpt, resume from the
highest step that loads, QAT_RUNS_DIR, leftovers of interrupted runs, recipes rejected before anything is written,
and a diverging run that stops and keeps its last finite checkpoint."""

import os
import shutil
from pathlib import Path

import pytest
import torch

from qat.checkpoint.io import AtomicCheckpointIO, load_checkpoint_file
from tests.checkpoint.test_io import corrupt_tensor_bytes
from tests.conftest import REPO, run_qat

pytestmark = pytest.mark.slow

SMALL = ["--config", str(REPO / "recipes" / "bitnet-b158-tiny.yaml"), "--data.batch_size=4", "--data.seq_len=64",
         "--trainer.enable_progress_bar=false", "--model.optim.warmup_steps=2", "--trainer.limit_val_batches=0"]


def _fit(*args: str, runs_dir: Path | None = None):
    env_runs = {"QAT_RUNS_DIR": str(runs_dir)} if runs_dir else {}
    old = {k: os.environ.get(k) for k in env_runs}
    os.environ.update(env_runs)
    try:
        return run_qat("fit", *SMALL, *args)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _step(path: Path) -> int:
    return load_checkpoint_file(path)["global_step"]


@pytest.fixture(scope="module")
def twelve_step_run(tmp_path_factory) -> Path:
    """12 steps, a checkpoint every 5, run folder from QAT_RUNS_DIR (no trainer.default_root_dir)."""
    runs = tmp_path_factory.mktemp("qat-runs")
    result = _fit("--trainer.max_steps=12", "--run.checkpoint_every_n_steps=5", "--trainer.default_root_dir=null",
                  "--run.name=twelve", runs_dir=runs)
    assert result.returncode == 0, result.stderr[-3000:]
    return runs / "twelve"


def test_qat_runs_dir_holds_the_run_and_last_ckpt_is_the_final_step(twelve_step_run: Path):
    assert twelve_step_run.parent.name.startswith("qat-runs")
    files = sorted(p.name for p in (twelve_step_run / "checkpoints").iterdir())
    assert files == ["last.ckpt", "step-000010.ckpt"]  # no last-v1.ckpt, one step checkpoint kept
    assert _step(twelve_step_run / "checkpoints" / "last.ckpt") == 12
    assert _step(twelve_step_run / "checkpoints" / "step-000010.ckpt") == 10
    assert (twelve_step_run / "wandb").is_dir()


def test_resume_continues_from_the_highest_step_and_keeps_one_last_ckpt(twelve_step_run: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    shutil.copytree(twelve_step_run, run_dir)
    checkpoints = run_dir / "checkpoints"
    os.utime(checkpoints / "last.ckpt", (1, 1))  # older on disk than step-000010: the step decides, not mtime
    result = _fit("--trainer.max_steps=17", "--run.checkpoint_every_n_steps=5", f"--trainer.default_root_dir={run_dir}",
                  "--resume", "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {checkpoints / 'last.ckpt'} (global step 12" in result.stdout
    assert "skipped step-000010.ckpt: global step 10 < 12" in result.stdout
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "step-000015.ckpt"]
    assert _step(checkpoints / "last.ckpt") == 17


def test_resume_skips_a_corrupted_checkpoint_and_says_so(twelve_step_run: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    shutil.copytree(twelve_step_run, run_dir)
    checkpoints = run_dir / "checkpoints"
    corrupt_tensor_bytes(checkpoints / "last.ckpt", "data/5")
    result = _fit("--trainer.max_steps=13", "--run.checkpoint_every_n_steps=5", f"--trainer.default_root_dir={run_dir}",
                  "--resume", "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resuming from {checkpoints / 'step-000010.ckpt'} (global step 10" in result.stdout
    assert "skipped last.ckpt: checkpoint" in result.stdout and "checksum mismatch" in result.stdout
    assert _step(checkpoints / "last.ckpt") == 13


def test_resume_refuses_when_checkpoints_exist_but_none_loads(twelve_step_run: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    shutil.copytree(twelve_step_run, run_dir)
    checkpoints = run_dir / "checkpoints"
    for path in checkpoints.iterdir():
        corrupt_tensor_bytes(path, "data/5")
    before = {p.name: p.read_bytes() for p in checkpoints.iterdir()}
    result = _fit("--trainer.max_steps=13", f"--trainer.default_root_dir={run_dir}", "--resume", "auto")
    assert result.returncode == 2
    assert "none of the 2 checkpoints" in result.stderr and "Refusing to restart from step 0" in result.stderr
    assert "Traceback" not in result.stderr
    assert {p.name: p.read_bytes() for p in checkpoints.iterdir()} == before


def test_resume_removes_leftovers_of_an_interrupted_run_and_nothing_else(twelve_step_run: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    shutil.copytree(twelve_step_run, run_dir)
    checkpoints = run_dir / "checkpoints"
    dead_pid = 2 ** 22 + 4321
    temp = checkpoints / f".last.ckpt.tmp-{dead_pid}"  # a save killed before its rename
    temp.write_bytes(b"half a checkpoint")
    orphan = checkpoints / "step-000005.ckpt"  # killed between writing step 10 and rotating step 5 away
    shutil.copy(checkpoints / "step-000010.ckpt", orphan)
    user_file = checkpoints / "notes.txt"
    user_file.write_text("mine")
    result = _fit("--trainer.max_steps=13", "--run.checkpoint_every_n_steps=5", f"--trainer.default_root_dir={run_dir}",
                  "--resume", "auto")
    assert result.returncode == 0, result.stderr[-3000:]
    assert not temp.exists() and not orphan.exists()
    assert user_file.read_text() == "mine"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "notes.txt", "step-000010.ckpt"]


@pytest.mark.parametrize("override, message", [
    ("--trainer.max_steps=-5", "trainer.max_steps=-5: must be a positive number"),
    ("--trainer.max_steps=0", "trainer.max_steps=0: must be a positive number"),
    ("--trainer.strategy=deepspeed_stage_4", "strategy: unknown name 'deepspeed_stage_4'"),
])
def test_a_rejected_recipe_is_one_line_and_creates_nothing(tmp_path: Path, override: str, message: str):
    run_dir = tmp_path / "run"
    result = _fit(override, f"--trainer.default_root_dir={run_dir}")
    assert result.returncode == 2
    assert message in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("qat fit: error:")]
    assert len(error_lines) == 1 and "Traceback" not in result.stderr
    assert not run_dir.exists()  # no run folder, no W&B run, no stored run id


def test_a_diverging_run_stops_and_keeps_its_last_finite_checkpoint(tmp_path: Path):
    run_dir = tmp_path / "run"
    result = _fit("--trainer.max_steps=8", "--run.checkpoint_every_n_steps=1", "--model.optim.lr=1e30",
                  "--model.optim.stage2_lr=1e30", "--trainer.gradient_clip_val=null", "--trainer.limit_val_batches=0",
                  f"--trainer.default_root_dir={run_dir}")
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    error = next(line for line in result.stderr.splitlines() if line.startswith("qat fit: error:"))
    assert "at global step" in error and "Lower model.optim.lr" in error
    checkpoints = sorted((run_dir / "checkpoints").glob("*.ckpt"))
    assert checkpoints, "the finite checkpoint before the divergence is gone"
    for path in checkpoints:
        state = load_checkpoint_file(path)["state_dict"]
        assert all(torch.isfinite(t).all() for t in state.values() if t.is_floating_point()), path
    # A checkpoint that does hold NaN weights (written by anything else) is refused by export.
    checkpoint = load_checkpoint_file(run_dir / "checkpoints" / "last.ckpt")
    name = next(k for k in checkpoint["state_dict"] if k.endswith("q_proj.weight"))
    checkpoint["state_dict"][name][0, 0] = float("nan")
    AtomicCheckpointIO().save_checkpoint(checkpoint, tmp_path / "nan.ckpt")
    result = run_qat("export", str(tmp_path / "nan.ckpt"), "--out_dir", str(tmp_path / "export"))
    assert result.returncode == 2 and "NaN/Inf" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "export").exists()


def test_a_fresh_run_moves_an_earlier_runs_checkpoints_aside(twelve_step_run: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    shutil.copytree(twelve_step_run, run_dir)
    earlier = {p.name: p.read_bytes() for p in (run_dir / "checkpoints").iterdir()}
    result = _fit("--trainer.max_steps=2", "--run.checkpoint_every_n_steps=5", f"--trainer.default_root_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    aside = list(run_dir.glob("checkpoints-earlier-*"))
    assert len(aside) == 1 and "moved them to" in result.stdout
    assert {p.name: p.read_bytes() for p in aside[0].iterdir()} == earlier
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt"]
    assert _step(run_dir / "checkpoints" / "last.ckpt") == 2
