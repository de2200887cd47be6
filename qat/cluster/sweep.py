"""A sweep as one SLURM job array: ``sbatch --array=0-(n-1)``, array task i runs point i as an ordinary
``qat run`` (with ``--resume auto``, so a requeued task continues its own checkpoint).

The script is ``qat submit``'s (cluster/sbatch.template rendered by :func:`qat.cluster.submit.render_sbatch_script`:
the same resources, requeue signal and environment) with three changes: the ``--array`` directive, one output file
per task (``slurm-%A_%a.out``), and the ``srun`` line chosen by ``$SLURM_ARRAY_TASK_ID``.
"""

import shlex
import sys
from pathlib import Path
from typing import Optional

from qat.cluster.submit import SlurmJob, check_script_text, render_sbatch_script
from qat.errors import ClusterError
from qat.train.wandb_logger import GROUP_ENV


def point_run_command(job: SlurmJob, recipe: Path, run_dir: Path, point_args: list[str], eval_max_blocks: int) -> str:
    """The ``qat run`` command line of one point on the cluster (like ``qat submit``'s ``qat fit`` line)."""
    args = [sys.executable, "-m", "qat.cli.main", "run", "--config", str(recipe),
            f"--trainer.num_nodes={job.nodes}", f"--trainer.devices={job.tasks_per_node}",
            f"--trainer.accelerator={'gpu' if job.gpus_per_node else 'cpu'}",
            f"--trainer.default_root_dir={run_dir}"]
    if job.strategy:
        args.append(f"--trainer.strategy={job.strategy}")
    args += [*point_args, "--resume", "auto", *job.overrides]
    if eval_max_blocks:
        args.append(f"--eval_max_blocks={eval_max_blocks}")
    return " ".join(shlex.quote(a) for a in args)


def render_array_script(job: SlurmJob, points: list[tuple[Path, list[str]]], group: str, eval_max_blocks: int = 0,
                        partition: Optional[str] = None) -> str:
    """The sbatch script running ``points`` (run dir, extra ``qat run`` arguments) as a job array; ``job.run_dir``
    is where the task outputs go (the sweep folder).

    Raises:
        ClusterError: no points, or a text with control characters (they would run as shell lines).
    """
    if not points:
        raise ClusterError("the sweep has no point left to run on the cluster")
    check_script_text(group, "sweep group")
    for run_dir, args in points:
        for text in (str(run_dir), *args):
            check_script_text(text, "sweep point")
    script = render_sbatch_script(job, partition)
    recipe = job.recipe.resolve()
    lines, out = script.splitlines(), []
    for line in lines:
        if line.startswith("#SBATCH --output="):
            line = line.replace("slurm-%j.out", "slurm-%A_%a.out")
        if line.startswith("srun "):
            out.append(f"export {GROUP_ENV}={shlex.quote(group)}")
            out.append('case "$SLURM_ARRAY_TASK_ID" in')
            for i, (run_dir, args) in enumerate(points):
                command = point_run_command(job, recipe, run_dir.resolve(), args, eval_max_blocks)
                out.append(f"  {i}) srun --kill-on-bad-exit=1 {command} ;;")
            out.append('  *) echo "qat: no sweep point for array task $SLURM_ARRAY_TASK_ID" >&2; exit 2 ;;')
            out.append("esac")
            continue
        out.append(line)
        if line.startswith("#SBATCH --job-name="):
            out.append(f"#SBATCH --array=0-{len(points) - 1}")
    return "\n".join(out) + "\n"
