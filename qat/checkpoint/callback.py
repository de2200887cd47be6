"""The one writer of a run's checkpoints: ``step-NNNNNN.ckpt`` every N steps (the newest ``keep`` kept) and
``last.ckpt`` — at every scheduled save and when training ends between two of them.

A second writer of ``last.ckpt`` beside Lightning's ``ModelCheckpoint`` made it version its own copies
(``last-v1.ckpt``, ...) and leave ``last.ckpt`` at an old step, which export and ``--resume auto`` then used.
"""

import time
from pathlib import Path

from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from qat.checkpoint.io import remove_stale_temp_files
from qat.checkpoint.layout import STEP_CHECKPOINT_NAME, STEP_CHECKPOINT_PATTERN, earlier_checkpoints_dir


def surplus_step_checkpoints(folder: Path, keep: int, up_to_step: int) -> list[Path]:
    """The ``step-NNNNNN.ckpt`` in ``folder`` to remove so that only the ``keep`` highest steps <= ``up_to_step``
    remain: older ones, and any beyond ``up_to_step`` (written after the checkpoint a run resumed from, so not part
    of its history). The step is read from the name qat gave the file; nothing else in ``folder`` is listed."""
    if not folder.is_dir():
        return []
    steps = sorted((int(m[1]), p) for p in folder.iterdir()
                   if (m := STEP_CHECKPOINT_NAME.match(p.name)) and not p.is_symlink())
    past = [p for s, p in steps if s <= up_to_step]
    return past[:max(len(past) - keep, 0)] + [p for s, p in steps if s > up_to_step]


class RunCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` writing ``<dirpath>/step-NNNNNN.ckpt`` every ``every_n_train_steps`` steps (keeping the
    ``keep`` newest) and ``<dirpath>/last.ckpt``, never a versioned copy.

    Rotation goes by the step in the file names rather than Lightning's top-k bookkeeping, which is lost when a run
    folder is moved and never knew the files of an interrupted run. At the start of training it also removes the
    temp files of a killed save, and a run started from scratch moves an earlier run's checkpoints aside (they would
    be overwritten, and their higher steps would win a later ``--resume auto``).
    """

    def __init__(self, dirpath: str | Path, every_n_train_steps: int, keep: int = 1):
        super().__init__(dirpath=dirpath, filename=STEP_CHECKPOINT_PATTERN, auto_insert_metric_name=False,
                         save_last=True, save_top_k=-1, every_n_train_steps=every_n_train_steps,
                         enable_version_counter=False)
        self.keep = keep

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        if trainer.is_global_zero:
            for path in remove_stale_temp_files(self.dirpath):
                rank_zero_info(f"qat: removed {path.name}, left by an interrupted save")
            if trainer.ckpt_path is None:
                self._move_earlier_run_aside()
        self._remove_surplus(trainer, reason="left by an interrupted or earlier run")
        trainer.strategy.barrier("qat-checkpoint-cleanup")

    def _move_earlier_run_aside(self) -> None:
        folder = Path(self.dirpath)
        if not folder.is_dir() or not any(folder.glob("*.ckpt")):
            return
        aside = earlier_checkpoints_dir(folder, time.strftime("%Y%m%d-%H%M%S"))
        folder.rename(aside)
        print(f"qat: {folder} held checkpoints of an earlier run; moved them to {aside} (continue a run with "
              "--resume auto instead of starting over)", flush=True)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if STEP_CHECKPOINT_NAME.match(Path(filepath).name):
            self._remove_surplus(trainer, reason=f"keeping the newest {self.keep}")

    def _remove_surplus(self, trainer, reason: str) -> None:
        if not trainer.is_global_zero:
            return
        for path in surplus_step_checkpoints(Path(self.dirpath), self.keep, trainer.global_step):
            rank_zero_info(f"qat: removed {path.name} ({reason})")
            trainer.strategy.checkpoint_io.remove_checkpoint(path)
            self.best_k_models.pop(str(path), None)

    def save_last_now(self, trainer) -> Path:
        """Write ``last.ckpt`` for the current step (e.g. before a SLURM requeue) unless it already holds it."""
        if self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        return Path(self.last_model_path)

    def on_train_end(self, trainer, pl_module) -> None:
        # Training stopped between two scheduled saves (max_steps not a multiple of N): last.ckpt gets the
        # final weights, written by this callback so it stays the only writer.
        if not trainer.interrupted and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
