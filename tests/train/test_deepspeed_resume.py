"""Resuming a real ZeRO-2 run (DeepSpeed on CPU, 1 rank, through `qat fit`) never runs pickled code from the
checkpoint folder, and an untampered resume continues."""

import shutil
from pathlib import Path

import pytest
import torch

from qat.checkpoint.deepspeed import deepspeed_checkpoint_step
from tests.checkpoint.test_io import Payload
from tests.conftest import REPO, run_qat

pytestmark = [pytest.mark.slow, pytest.mark.deepspeed]

ARGS = ["--config", str(REPO / "recipes" / "bitnet-b158-tiny.yaml"), "--trainer.strategy=deepspeed_stage_2",
        "--data.batch_size=4", "--data.seq_len=64", "--trainer.enable_progress_bar=false",
        "--model.optim.warmup_steps=1", "--trainer.limit_val_batches=0", "--run.checkpoint_every_n_steps=2",
        "--trainer.precision=32-true"]


@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("zero2") / "run"
    result = run_qat("fit", *ARGS, "--trainer.max_steps=2", f"--trainer.default_root_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def _plant(shard: Path, marker: Path) -> None:
    """Replace a DeepSpeed shard with a pickle whose unpickling creates ``marker``."""
    assert shard.is_file()
    torch.save({"optimizer_state_dict": Payload(marker)}, shard)


def _resume(run_dir: Path, max_steps: int):
    return run_qat("fit", *ARGS, f"--trainer.max_steps={max_steps}", f"--trainer.default_root_dir={run_dir}",
                   "--resume", "auto")


def test_a_pickle_in_an_optimizer_shard_is_refused_not_run(zero2_run: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    shutil.copytree(zero2_run, run_dir)
    marker = tmp_path / "pickle-ran"
    _plant(next((run_dir / "checkpoints" / "last.ckpt" / "checkpoint").glob("*optim_states.pt")), marker)
    result = _resume(run_dir, 3)
    assert not marker.exists(), "a pickled payload in the checkpoint folder was executed"
    assert result.returncode == 2, result.stderr[-3000:]
    error = next(line for line in result.stderr.splitlines() if line.startswith("qat fit: error:"))
    assert "last.ckpt" in error and "refused, nothing was run" in error and "--resume <path>" in error


def test_a_pickle_in_the_model_states_makes_resume_skip_that_checkpoint(zero2_run: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    shutil.copytree(zero2_run, run_dir)
    marker = tmp_path / "pickle-ran"
    _plant(run_dir / "checkpoints" / "last.ckpt" / "checkpoint" / "mp_rank_00_model_states.pt", marker)
    result = _resume(run_dir, 3)
    assert not marker.exists()
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped last.ckpt" in result.stdout and "refused, nothing was run" in result.stdout
    assert "step-000002.ckpt (global step 2" in result.stdout
    assert deepspeed_checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == 3


def test_an_untampered_zero2_resume_continues(zero2_run: Path, tmp_path: Path):
    run_dir = tmp_path / "run"
    shutil.copytree(zero2_run, run_dir)
    result = _resume(run_dir, 3)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "last.ckpt (global step 2" in result.stdout
    assert deepspeed_checkpoint_step(run_dir / "checkpoints" / "last.ckpt") == 3


def test_the_consolidated_weights_are_checked_against_the_checksum_saved_with_them(zero2_run: Path, tmp_path: Path):
    import zipfile

    from qat.checkpoint.deepspeed import load_training_checkpoint
    from qat.checkpoint.io import STATE_SHA256_KEY
    from qat.errors import CheckpointError
    from tests.checkpoint.test_io import corrupt_tensor_bytes

    assert STATE_SHA256_KEY in load_training_checkpoint(zero2_run / "checkpoints" / "last.ckpt")
    folder = tmp_path / "last.ckpt"
    shutil.copytree(zero2_run / "checkpoints" / "last.ckpt", folder)
    shard = next((folder / "checkpoint").glob("*optim_states.pt"))
    with zipfile.ZipFile(shard) as z:  # the fp32 master weights and Adam moments: the large tensor records
        records = [i.filename.split("/", 1)[1] for i in z.infolist()
                   if "/data/" in i.filename and i.file_size > 1 << 20]
    assert records
    for record in records:
        corrupt_tensor_bytes(shard, record)
    with pytest.raises(CheckpointError, match="last.ckpt: checksum mismatch"):
        load_training_checkpoint(folder)
