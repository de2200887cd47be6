"""W&B logger that is offline unless the user has given a key, and keeps one run id per run directory (so a
resumed or requeued run appends to the same W&B run)."""

import os
import uuid
from pathlib import Path
from typing import Literal, Optional

from lightning.pytorch.loggers import WandbLogger

RUN_ID_FILE = "wandb_run_id"


def wandb_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def persistent_run_id(save_dir: Path, resume: bool) -> str:
    """The run id stored in ``save_dir`` when resuming, else a fresh one (stored for later resumes)."""
    path = save_dir / RUN_ID_FILE
    if resume and path.is_file():
        return path.read_text().strip()
    run_id = uuid.uuid4().hex[:12]
    # Every rank builds the logger but only global rank 0 logs: only its id may be stored, or a requeued run
    # resumes under another rank's id (rank from srun/torchrun; Lightning has not set it up yet).
    if int(os.environ.get("SLURM_PROCID", os.environ.get("RANK", "0"))) == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id)
    return run_id


class QATWandbLogger(WandbLogger):
    """``WandbLogger`` with ``mode: auto`` (online iff ``WANDB_API_KEY`` is set, else offline).

    The key is read by wandb from the environment only; qat never writes it anywhere.
    """

    def __init__(self, project: str = "qat", name: Optional[str] = None, save_dir: str = "runs",
                 mode: Literal["auto", "offline", "online"] = "auto", resume_run: bool = False, **kwargs):
        save = Path(save_dir)
        run_id = kwargs.pop("id", None) or persistent_run_id(save, resume_run or bool(os.environ.get("SLURM_RESTART_COUNT")))
        os.environ.setdefault("WANDB_DIR", str(save))
        super().__init__(project=project, name=name, save_dir=str(save), offline=wandb_mode(mode) == "offline",
                         id=run_id, resume="allow", log_model=False, **kwargs)
