import os

import pytest
import torch

from qat.checkpoint.io import AtomicCheckpointIO
from qat.checkpoint.layout import RunLayout
from qat.checkpoint.resume import find_resume_checkpoint, resolve_resume
from qat.errors import CheckpointError
from tests.checkpoint.test_io import corrupt_tensor_bytes


def _save(path, step: int) -> None:
    state = {"model.w": torch.full((32, 32), float(step))}
    AtomicCheckpointIO().save_checkpoint({"global_step": step, "state_dict": state}, path)


def test_picks_the_highest_global_step_not_the_newest_file(tmp_path):
    _save(tmp_path / "step-000010.ckpt", 10)
    _save(tmp_path / "last.ckpt", 6)  # a stale last.ckpt ...
    os.utime(tmp_path / "step-000010.ckpt", (1, 1))  # ... that is newer on disk
    choice = find_resume_checkpoint(tmp_path)
    assert choice.path == tmp_path / "step-000010.ckpt" and choice.global_step == 10
    assert "skipped last.ckpt: global step 6 < 10" in choice.describe()


def test_prefers_last_ckpt_on_equal_steps(tmp_path):
    _save(tmp_path / "step-000010.ckpt", 10)
    _save(tmp_path / "last.ckpt", 10)
    assert find_resume_checkpoint(tmp_path).path == tmp_path / "last.ckpt"


def test_a_corrupted_checkpoint_is_skipped_and_said_so(tmp_path):
    _save(tmp_path / "step-000010.ckpt", 10)
    _save(tmp_path / "last.ckpt", 12)
    corrupt_tensor_bytes(tmp_path / "last.ckpt")
    choice = find_resume_checkpoint(tmp_path)
    assert choice.path == tmp_path / "step-000010.ckpt"
    assert "skipped last.ckpt" in choice.describe() and "checksum mismatch" in choice.describe()


def test_refuses_to_restart_from_step_0_when_no_checkpoint_loads(tmp_path):
    _save(tmp_path / "last.ckpt", 12)
    corrupt_tensor_bytes(tmp_path / "last.ckpt")
    (tmp_path / "step-000010.ckpt").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="none of the 2 checkpoints .* loads .* --resume none"):
        find_resume_checkpoint(tmp_path)


def test_no_checkpoints_starts_fresh(tmp_path, capsys):
    layout = RunLayout(tmp_path / "run")
    assert resolve_resume("auto", layout) is None
    assert "starting at step 0" in capsys.readouterr().out
    assert resolve_resume("none", layout) is None
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        resolve_resume(str(tmp_path / "missing.ckpt"), layout)


def test_resolve_resume_auto_looks_in_the_layouts_checkpoints_folder(tmp_path, capsys):
    layout = RunLayout(tmp_path / "run")
    _save(layout.last_checkpoint, 3)
    assert resolve_resume("auto", layout) == str(layout.last_checkpoint)
    assert "global step 3" in capsys.readouterr().out


def test_run_layout_honours_qat_runs_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("QAT_RUNS_DIR", str(tmp_path / "elsewhere"))
    assert RunLayout.for_run("r").last_checkpoint == tmp_path / "elsewhere" / "r" / "checkpoints" / "last.ckpt"
    assert RunLayout.for_run("r", tmp_path / "explicit").run_dir == tmp_path / "explicit"
    from qat.cluster.submit import recipe_run_dir
    assert recipe_run_dir({"run": {"name": "r"}}) == tmp_path / "elsewhere" / "r"


@pytest.mark.parametrize("names, keep, up_to, removed", [
    (["step-000005.ckpt", "step-000010.ckpt"], 1, 10, ["step-000005.ckpt"]),
    (["step-000005.ckpt", "step-000010.ckpt"], 2, 10, []),
    # resumed at step 5: step 10 was written after it by a run whose later history is gone
    (["step-000005.ckpt", "step-000010.ckpt"], 1, 5, ["step-000010.ckpt"]),
    (["step-000001.ckpt", "step-000002.ckpt", "step-000003.ckpt"], 1, 3, ["step-000001.ckpt", "step-000002.ckpt"]),
    (["last.ckpt", "step-5.ckpt.bak", "my-step-000001.ckpt"], 1, 0, []),
])
def test_surplus_step_checkpoints(tmp_path, names, keep, up_to, removed):
    from qat.checkpoint.callback import surplus_step_checkpoints

    for name in names:
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in surplus_step_checkpoints(tmp_path, keep, up_to)] == removed
