"""The one description of a run folder: where checkpoints, the last checkpoint, exports, W&B files and plots go.

Every verb, the cluster code and the benchmarks derive paths from :class:`RunLayout`; nothing else spells
``checkpoints/last.ckpt`` or ``runs/<name>``.

Example usage::

    layout = RunLayout.for_run("bitnet-b158-tiny")          # $QAT_RUNS_DIR/bitnet-b158-tiny (default ./runs/...)
    layout.last_checkpoint                                   # .../checkpoints/last.ckpt
    RunLayout.of_checkpoint("runs/x/checkpoints/last.ckpt").export_dir("hf")   # runs/x/export-hf
"""

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

CHECKPOINTS = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
STEP_CHECKPOINT_PATTERN = "step-{step:06d}"   # ModelCheckpoint filename (".ckpt" added by Lightning)
STEP_CHECKPOINT_NAME = re.compile(r"^step-(\d+)\.ckpt$")  # the files that pattern produces
LOSS_PLOT = "loss.png"


def runs_root() -> Path:
    """``$QAT_RUNS_DIR`` (default ``./runs``): the parent of every run folder."""
    return Path(os.environ.get("QAT_RUNS_DIR") or Path.cwd() / "runs")


def earlier_checkpoints_dir(checkpoints_dir: Path, stamp: str) -> Path:
    """Where a fresh run moves the checkpoints an earlier run left in its folder (``checkpoints-earlier-<stamp>``)."""
    return checkpoints_dir.with_name(f"{checkpoints_dir.name}-earlier-{stamp}")


@dataclass(frozen=True)
class RunLayout:
    """Paths inside one run folder."""

    run_dir: Path

    @classmethod
    def for_run(cls, name: str, root_dir: Optional[str | Path] = None) -> "RunLayout":
        """The run folder of a recipe: ``trainer.default_root_dir`` when set, else ``$QAT_RUNS_DIR/<run.name>``."""
        return cls(Path(root_dir) if root_dir else runs_root() / name)

    @classmethod
    def of_checkpoint(cls, checkpoint: str | Path) -> "RunLayout":
        """The run folder a checkpoint belongs to (``<run>/checkpoints/<ckpt>``; else the checkpoint's folder)."""
        ckpt = Path(checkpoint)
        return cls(ckpt.parent.parent if ckpt.parent.name == CHECKPOINTS else ckpt.parent)

    @property
    def checkpoints_dir(self) -> Path:
        return self.run_dir / CHECKPOINTS

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints_dir / LAST_CHECKPOINT

    def export_dir(self, fmt: str) -> Path:
        return self.run_dir / f"export-{fmt}"

    @property
    def loss_plot(self) -> Path:
        return self.run_dir / LOSS_PLOT

    @property
    def name(self) -> str:
        return self.run_dir.name
