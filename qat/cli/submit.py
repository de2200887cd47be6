"""``qat submit|status|cancel``: run a recipe as a SLURM job, and watch or stop it (qat/cluster/)."""

import sys
from pathlib import Path
from typing import Optional

from qat.cluster.slurm import cancel as scancel
from qat.cluster.slurm import job_state, queue
from qat.cluster.submit import SlurmJob, check_job, load_recipe, render_sbatch_script, slurm_available, submit_to_slurm
from qat.errors import ClusterError


def submit(recipe: str, nodes: int = 1, gpus_per_node: int = 0, ranks_per_node: int = 1, cpus_per_task: int = 1,
           partition: Optional[str] = None, time: str = "01:00:00", signal_margin_s: int = 120,
           strategy: Optional[str] = None, run_dir: Optional[str] = None, overrides: Optional[list[str]] = None,
           dry_run: bool = False) -> None:
    """Submit a training recipe to SLURM (sbatch); it checkpoints and requeues itself before its time limit.

    Args:
        recipe: the ``qat fit`` recipe (YAML).
        nodes: nodes to train on.
        gpus_per_node: GPUs per node (one rank each); 0 trains on CPU.
        ranks_per_node: CPU training processes per node when gpus_per_node is 0.
        cpus_per_task: CPU cores per rank.
        partition: SLURM partition (default: the cluster's default partition).
        time: time limit, HH:MM:SS or D-HH:MM:SS.
        signal_margin_s: seconds before the limit when the run checkpoints and requeues.
        strategy: ddp, deepspeed, deepspeed_stage_1|2|3[_offload]; default: the recipe's.
        run_dir: run directory (default: the recipe's).
        overrides: extra ``qat fit`` arguments, e.g. ``--overrides+=--trainer.max_steps=50``.
        dry_run: print the sbatch script instead of submitting it (``--dry-run`` alone means true).
    """
    job = SlurmJob(recipe=Path(recipe), nodes=nodes, gpus_per_node=gpus_per_node, ranks_per_node=ranks_per_node,
                   cpus_per_task=cpus_per_task, partition=partition, time=time, signal_margin_s=signal_margin_s,
                   strategy=strategy, run_dir=Path(run_dir) if run_dir else None, overrides=list(overrides or []))
    if dry_run:
        # Checked against the cluster when there is one; rendered as written when there is none (e.g. a laptop).
        load_recipe(job.recipe)  # a missing recipe is reported before the cluster is asked
        resolved = None
        if slurm_available():
            from qat.cluster.slurm import partitions

            try:
                available = partitions()
            except ClusterError as e:  # e.g. a login node whose controller is down: the script can still be read
                note = " ".join(str(e).split())
                print(f"qat submit: note: not checked against the cluster ({note})", file=sys.stderr)
            else:
                resolved = check_job(job, available).name
        print(render_sbatch_script(job, resolved), end="")
        return
    job_id, job_run_dir = submit_to_slurm(job)
    print(f"submitted job {job_id}; run directory {job_run_dir}")
    print(f"  watch:  qat status --job-id {job_id}    tail -f {job_run_dir}/slurm-{job_id}.out")
    print(f"  stop:   qat cancel {job_id}    (checkpoint + requeue now: qat cancel {job_id} --signal USR1)")


def status(job_id: Optional[str] = None) -> None:
    """Show the SLURM queue, or one job's state, restarts and output file.

    Args:
        job_id: a job id from ``qat submit``; default: the whole queue.
    """
    if job_id is None:
        print(queue(), end="")
        return
    fields = job_state(job_id)
    if not fields:
        print(f"job {job_id}: unknown to slurmctld (finished long ago, or never existed)")
        return
    print(f"job {job_id}: {fields.get('JobState')} restarts={fields.get('Restarts')} "
          f"nodes={fields.get('NodeList')} reason={fields.get('Reason')}\n  output: {fields.get('StdOut')}")


def cancel(job_id: str, signal: Optional[str] = None) -> None:
    """Cancel a job, or send its ranks a signal (USR1: checkpoint and requeue now).

    Args:
        job_id: a job id from ``qat submit``.
        signal: signal name to send instead of cancelling, e.g. USR1.
    """
    scancel(job_id, signal)
    print(f"job {job_id}: {'sent ' + signal if signal else 'cancelled'}")
