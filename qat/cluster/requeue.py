"""Checkpoint-and-requeue for SLURM jobs, replacing Lightning's own auto-requeue.

Lightning's handler saves the checkpoint *inside* the signal handler. Under DDP/DeepSpeed the save is a collective
and the handler can interrupt a rank in the middle of another collective, so the ranks hang (Lightning #21406);
its SIGTERM handler broadcasts from inside the handler too, and SIGTERM is never requeued (#20542); resuming
with ``ckpt_path="hpc"`` fails on a first run (#20347). Here the handlers only record the signal; at the end of
each training step the ranks agree (any rank signalled -> all act) and all save the same step, then rank 0
requeues the job. The restarted job resumes through ``qat fit --resume auto`` from ``last.ckpt``, and the W&B
logger keeps its run id (stored in the run directory).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins.environments import SLURMEnvironment

from qat.checkpoint.callback import RunCheckpoint
from qat.checkpoint.layout import RunLayout
from qat.errors import ClusterError

REQUEUE_SIGNAL = signal.SIGUSR1


def in_slurm_job() -> bool:
    """True inside an ``srun`` step of a batch job (not an interactive ``salloc`` shell)."""
    return SLURMEnvironment.detect()


class RequeueOnSignal(Callback):
    """On SIGUSR1 (``--signal=USR1@margin`` or ``scancel -s USR1``): checkpoint at the next step boundary on all
    ranks and requeue the job. On SIGTERM (preemption, ``scancel``): checkpoint and stop; a preempted job is
    requeued by SLURM itself (``--requeue``), a cancelled one stays cancelled."""

    def __init__(self) -> None:
        self._received: Optional[int] = None
        self._previous_handlers: dict[int, Any] = {}
        self._announced_first_step = False

    def _record(self, signum: int, frame: Any) -> None:
        # Only a flag: no I/O, no collectives inside a signal handler.
        if self._received != REQUEUE_SIGNAL:
            self._received = signum

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # Installed after Lightning's signal connector, so these replace its handlers for the training loop.
        for signum in (REQUEUE_SIGNAL, signal.SIGTERM):
            self._previous_handlers[signum] = signal.signal(signum, self._record)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    def on_train_batch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any,
                             batch_idx: int) -> None:
        if not self._announced_first_step and trainer.is_global_zero:
            # One line per (re)start: when the first step began and at which global step (resume check).
            print(f"qat: first step at {time.time():.3f} global_step {trainer.global_step} "
                  f"restart {os.environ.get('SLURM_RESTART_COUNT', '0')}", flush=True)
        self._announced_first_step = True

    def on_train_batch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        requeue = trainer.strategy.reduce_boolean_decision(self._received == REQUEUE_SIGNAL, all=False)
        stop = trainer.strategy.reduce_boolean_decision(self._received is not None, all=False)
        if not stop:
            return
        if isinstance(trainer.checkpoint_callback, RunCheckpoint):
            path = trainer.checkpoint_callback.save_last_now(trainer)  # the one writer of last.ckpt
        else:  # a recipe with its own ModelCheckpoint
            path = last_checkpoint_path(trainer)
            trainer.save_checkpoint(path)
        trainer.strategy.barrier("qat-requeue-checkpoint")
        if trainer.is_global_zero:
            print(f"qat: signal received; saved {path} at global_step {trainer.global_step}", flush=True)
            if requeue:
                requeue_this_job()
        trainer.should_stop = True


def last_checkpoint_path(trainer: "pl.Trainer") -> Path:
    """The run's ``last.ckpt`` (where ``--resume auto`` looks)."""
    return RunLayout(Path(trainer.default_root_dir)).last_checkpoint


def requeue_this_job() -> None:
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job_id = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
    result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
    if result.returncode != 0:
        raise ClusterError(f"`scontrol requeue {job_id}` failed: {result.stderr.strip()}; the checkpoint is saved, "
                           "resubmit with qat submit to continue")
    print(f"qat: requeued job {job_id}", file=sys.stderr, flush=True)


def add_slurm_requeue(callbacks: list, plugins: list) -> None:
    """Inside a SLURM job: Lightning's SLURM environment without its auto-requeue, plus ``RequeueOnSignal``."""
    if not in_slurm_job():
        return
    if not any(isinstance(p, SLURMEnvironment) for p in plugins):
        plugins.append(SLURMEnvironment(auto_requeue=False))
    if not any(isinstance(c, RequeueOnSignal) for c in callbacks):
        callbacks.append(RequeueOnSignal())
