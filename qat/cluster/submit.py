"""``qat submit``: a recipe rendered into an sbatch script (cluster/sbatch.template) and submitted to SLURM.

Plain sbatch rather than submitit: the job is the ordinary ``qat fit`` command under ``srun`` (one task per
device, Lightning's SLURMEnvironment reads the ranks), so what runs on the cluster is what runs locally, the
script can be read with ``--dry-run``, and requeue is SLURM's own (``--requeue``) instead of a pickled callable.

Example usage::

    job = SlurmJob(recipe=Path("recipes/bitnet-b158-tiny.yaml"), nodes=2, strategy="deepspeed_stage_2")
    print(render_sbatch_script(job))
    job_id = submit_to_slurm(job)
"""

import re
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

import qat
from qat.cluster.slurm import Partition, partitions, submit_batch_script
from qat.errors import ClusterError, RecipeError
from qat.resources import shipped_path

TEMPLATE = shipped_path("cluster", "sbatch.template")
_PLACEHOLDER = re.compile(r"\{\{ (\w+) \}\}")
_TIME = re.compile(r"^(?:(?P<days>\d+)-)?(?P<h>\d{1,2}):(?P<m>\d{2}):(?P<s>\d{2})$")


@dataclass
class SlurmJob:
    """One training run as a SLURM job.

    Attributes:
        recipe: the ``qat fit`` recipe (LightningCLI YAML).
        nodes: nodes to spread the run over.
        gpus_per_node: GPUs per node; 0 trains on CPU with ``ranks_per_node`` processes per node.
        ranks_per_node: CPU training processes per node (ignored when ``gpus_per_node`` > 0: one per GPU).
        cpus_per_task: CPU cores per training process.
        partition: SLURM partition; None takes the cluster's default.
        time: time limit, ``HH:MM:SS`` or ``D-HH:MM:SS``.
        signal_margin_s: seconds before the time limit at which the run checkpoints and requeues itself.
        strategy: ``ddp``, ``deepspeed_stage_1|2|3`` ...; None keeps the recipe's.
        run_dir: where checkpoints, logs and the job output go; None takes the recipe's run directory.
        overrides: extra ``qat fit`` arguments, e.g. ``--trainer.max_steps=50``.
    """

    recipe: Path
    nodes: int = 1
    gpus_per_node: int = 0
    ranks_per_node: int = 1
    cpus_per_task: int = 1
    partition: Optional[str] = None
    time: str = "01:00:00"
    signal_margin_s: int = 120
    strategy: Optional[str] = None
    run_dir: Optional[Path] = None
    overrides: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Checked here, not against the cluster, so `--dry-run` and a machine without SLURM reject them too.
        counts = {"--nodes": (self.nodes, 1), "--gpus-per-node": (self.gpus_per_node, 0),
                  "--ranks-per-node": (self.ranks_per_node, 1), "--cpus-per-task": (self.cpus_per_task, 1),
                  "--signal-margin-s": (self.signal_margin_s, 1)}
        for flag, (value, least) in counts.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ClusterError(f"{flag}={value!r}: must be a whole number, at least {least}")
        texts = {"recipe path": str(self.recipe), "--partition": self.partition, "--time": self.time,
                 "--strategy": self.strategy, "--run-dir": None if self.run_dir is None else str(self.run_dir),
                 **{f"--overrides[{i}]": o for i, o in enumerate(self.overrides)}}
        for key, value in texts.items():
            check_script_text(value, key, ClusterError)
        time_limit_seconds(self.time)

    @property
    def tasks_per_node(self) -> int:
        return self.gpus_per_node if self.gpus_per_node > 0 else self.ranks_per_node


def check_script_text(value: object, key: str, error: type[Exception] = ClusterError) -> None:
    """Raise ``error`` naming ``key`` when ``value`` (a text that goes into the job script) holds a control
    character: a newline would start a line of its own in the script, i.e. run as a shell command."""
    if value is None:
        return
    if not isinstance(value, str):
        raise error(f"{key}={value!r}: must be a text")
    bad = sorted({c for c in value if ord(c) < 32 or ord(c) == 127})
    if bad:
        raise error(f"{key}={value!r} contains control character(s) {', '.join(repr(c) for c in bad)}; "
                    "remove them (newlines and tabs are not allowed in what goes into the job script)")


def time_limit_seconds(time: str) -> int:
    if not isinstance(time, str):
        raise ClusterError(f"--time {time!r}: use HH:MM:SS or D-HH:MM:SS, e.g. 04:00:00")
    match = _TIME.fullmatch(time)  # fullmatch: `$` alone would let a trailing newline through
    if match is None:
        raise ClusterError(f"--time {time!r}: use HH:MM:SS or D-HH:MM:SS, e.g. 04:00:00")
    days = int(match["days"] or 0)
    return ((days * 24 + int(match["h"])) * 60 + int(match["m"])) * 60 + int(match["s"])


def load_recipe(recipe: Path) -> dict:
    if not recipe.is_file():
        raise RecipeError(f"recipe {str(recipe)!r} does not exist; pass a YAML file such as "
                          "recipes/bitnet-b158-tiny.yaml")
    try:
        loaded = yaml.safe_load(recipe.read_text())
    except yaml.YAMLError as exc:
        raise RecipeError(f"recipe {str(recipe)!r} is not valid YAML: {exc}") from exc
    if not isinstance(loaded, dict):
        raise RecipeError(f"recipe {str(recipe)!r} must be a mapping with trainer:/model:/data: sections")
    return loaded


def check_recipe_script_texts(recipe: dict) -> None:
    """``RecipeError`` naming the key when a recipe value that goes into the job script is not a plain text."""
    for section, key in (("run", "name"), ("trainer", "default_root_dir")):
        part = recipe.get(section)
        if part is not None and not isinstance(part, dict):
            raise RecipeError(f"recipe section {section}: must be a mapping, got {part!r}")
        check_script_text((part or {}).get(key), f"{section}.{key}", RecipeError)


def recipe_run_dir(recipe: dict) -> Path:
    """The run directory ``qat fit`` would use: trainer.default_root_dir, else $QAT_RUNS_DIR/<run.name>."""
    from qat.checkpoint.layout import RunLayout

    return RunLayout.for_run((recipe.get("run") or {}).get("name", "qat-run"),
                             (recipe.get("trainer") or {}).get("default_root_dir")).run_dir


def check_job(job: SlurmJob, available: dict[str, Partition]) -> Partition:
    """The partition the job goes to; ``ClusterError`` when the cluster cannot run it (the counts themselves are
    checked by :class:`SlurmJob`)."""
    if job.partition is None:
        defaults = [p for p in available.values() if p.default]
        if not defaults:
            raise ClusterError(f"the cluster has no default partition; pass --partition (one of {sorted(available)})")
        partition = defaults[0]
    elif job.partition not in available:
        raise ClusterError(f"unknown partition {job.partition!r}; this cluster has: {', '.join(sorted(available))}")
    else:
        partition = available[job.partition]
    if job.nodes > partition.nodes:
        raise ClusterError(f"--nodes={job.nodes} but partition {partition.name!r} has only {partition.nodes} "
                           f"node(s); lower --nodes or pick a bigger partition")
    if job.gpus_per_node > partition.gpus_per_node:
        raise ClusterError(f"--gpus-per-node={job.gpus_per_node} but the nodes of partition {partition.name!r} "
                           f"have {partition.gpus_per_node} GPU(s); use --gpus-per-node 0 for CPU training")
    return partition


def _fit_command(job: SlurmJob, recipe: Path, run_dir: Path) -> str:
    args = [sys.executable, "-m", "qat.cli.main", "fit", "--config", str(recipe),
            f"--trainer.num_nodes={job.nodes}", f"--trainer.devices={job.tasks_per_node}",
            f"--trainer.accelerator={'gpu' if job.gpus_per_node else 'cpu'}",
            f"--trainer.default_root_dir={run_dir}"]
    if job.strategy:
        args.append(f"--trainer.strategy={job.strategy}")
    args += ["--resume", "auto", *job.overrides]
    return " ".join(shlex.quote(a) for a in args)


def render_sbatch_script(job: SlurmJob, partition: Optional[str] = None) -> str:
    """The sbatch script for ``job`` (``partition`` overrides ``job.partition``, e.g. the resolved default)."""
    recipe_path = job.recipe.resolve()
    recipe = load_recipe(recipe_path)
    check_recipe_script_texts(recipe)
    limit = time_limit_seconds(job.time)
    if not 0 < job.signal_margin_s < limit:
        raise ClusterError(f"--signal-margin-s={job.signal_margin_s} must be between 0 and the time limit "
                           f"({limit} s) so the run can checkpoint before SLURM stops it")
    run_dir = (job.run_dir or recipe_run_dir(recipe)).resolve()
    partition = partition or job.partition
    values = {
        "job_name": f"qat-{run_dir.name}",
        "partition_directive": f"#SBATCH --partition={partition}" if partition else "",
        "nodes": job.nodes,
        "tasks_per_node": job.tasks_per_node,
        "cpus_per_task": job.cpus_per_task,
        "gpu_directive": f"#SBATCH --gpus-per-node={job.gpus_per_node}" if job.gpus_per_node else "",
        "time": job.time,
        "signal_margin_s": job.signal_margin_s,
        "run_dir": shlex.quote(str(run_dir)),
        "workdir": shlex.quote(str(Path.cwd())),
        "source_root": shlex.quote(str(Path(qat.__file__).resolve().parents[1])),
        "command": _fit_command(job, recipe_path, run_dir),
    }
    if partition is not None:  # a partition resolved from the cluster is checked like one given on the command line
        check_script_text(partition, "--partition")
    for key, value in values.items():  # the backstop: the working directory, Python and qat's own path too
        check_script_text(str(value), key)
    template = TEMPLATE.read_text()
    missing = set(_PLACEHOLDER.findall(template)) - set(values)
    if missing:
        raise ClusterError(f"{TEMPLATE} has unknown placeholders {sorted(missing)}")
    lines = []
    for line in template.splitlines():
        rendered = _PLACEHOLDER.sub(lambda m: str(values[m[1]]), line)
        if rendered or not line:  # a directive placeholder that renders empty leaves no blank line
            lines.append(rendered)
    return "\n".join(lines) + "\n"


def submit_to_slurm(job: SlurmJob) -> tuple[str, Path]:
    """Check the job against the cluster, create its run directory, submit it; returns (job id, run dir).

    Raises:
        RecipeError: the recipe is missing or unreadable.
        ClusterError: no SLURM client, unknown partition, more nodes or GPUs than the partition has.
    """
    load_recipe(job.recipe)  # a missing recipe is reported before anything touches the cluster
    partition = check_job(job, partitions())
    script = render_sbatch_script(job, partition.name)
    run_dir = (job.run_dir or recipe_run_dir(load_recipe(job.recipe))).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)  # sbatch --output needs the folder to exist
    return submit_batch_script(script), run_dir


def slurm_available() -> bool:
    return shutil.which("sbatch") is not None
