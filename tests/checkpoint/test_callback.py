"""``RunCheckpoint`` in real Lightning training loops (a tiny module, CPU, seconds)."""

import signal

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from qat.checkpoint.callback import RunCheckpoint
from qat.checkpoint.io import AtomicCheckpointIO, load_checkpoint_file
from qat.cluster.requeue import RequeueOnSignal


class Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _fit(folder, max_steps: int, ckpt_path=None, callbacks=()):
    checkpoint = RunCheckpoint(folder, every_n_train_steps=5)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, callbacks=[checkpoint, *callbacks], logger=False,
                        plugins=[AtomicCheckpointIO()], enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=folder.parent)
    data = DataLoader(torch.randn(64, 4), batch_size=2)
    trainer.fit(Tiny(), data, ckpt_path=ckpt_path)
    return trainer


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_last_ckpt_is_the_final_step_and_never_versioned(tmp_path):
    folder = tmp_path / "checkpoints"
    _fit(folder, 12)
    assert _names(folder) == ["last.ckpt", "step-000010.ckpt"]
    assert load_checkpoint_file(folder / "last.ckpt")["global_step"] == 12
    # Resuming and ending between two saves again: the same last.ckpt is rewritten, no last-v1.ckpt.
    _fit(folder, 14, ckpt_path=folder / "last.ckpt")
    assert _names(folder) == ["last.ckpt", "step-000010.ckpt"]
    assert load_checkpoint_file(folder / "last.ckpt")["global_step"] == 14
    _fit(folder, 21, ckpt_path=folder / "last.ckpt")
    assert _names(folder) == ["last.ckpt", "step-000020.ckpt"]
    assert load_checkpoint_file(folder / "last.ckpt")["global_step"] == 21


def test_a_requeue_signal_saves_through_the_same_writer(tmp_path):
    folder = tmp_path / "checkpoints"

    class SignalAtStep3(RequeueOnSignal):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 3:
                self._received = signal.SIGTERM  # what the handler records on scancel/preemption
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    trainer = _fit(folder, 12, callbacks=[SignalAtStep3()])
    assert trainer.global_step == 3
    assert _names(folder) == ["last.ckpt"]
    assert load_checkpoint_file(folder / "last.ckpt")["global_step"] == 3
    _fit(folder, 7, ckpt_path=folder / "last.ckpt")
    assert _names(folder) == ["last.ckpt", "step-000005.ckpt"]
    assert load_checkpoint_file(folder / "last.ckpt")["global_step"] == 7


def test_rotation_survives_a_moved_run_folder(tmp_path):
    """Lightning's own top-k bookkeeping is dropped when the folder path changes; rotation by name is not."""
    folder = tmp_path / "a" / "checkpoints"
    _fit(folder, 10)
    moved = tmp_path / "b" / "checkpoints"
    folder.parent.rename(moved.parent)
    with pytest.warns(UserWarning, match="dirpath has changed"):
        _fit(moved, 20, ckpt_path=moved / "last.ckpt")
    assert _names(moved) == ["last.ckpt", "step-000020.ckpt"]


def test_a_fresh_run_moves_the_earlier_runs_checkpoints_aside(tmp_path):
    folder = tmp_path / "checkpoints"
    _fit(folder, 10)
    earlier = {p.name: p.read_bytes() for p in folder.iterdir()}
    _fit(folder, 3)  # from scratch, same folder
    aside = list(tmp_path.glob("checkpoints-earlier-*"))
    assert len(aside) == 1 and {p.name: p.read_bytes() for p in aside[0].iterdir()} == earlier
    assert _names(folder) == ["last.ckpt"] and load_checkpoint_file(folder / "last.ckpt")["global_step"] == 3
