"""The SLURM command-line tools (sbatch, sinfo, squeue, scontrol, scancel), called as subprocesses.

The CLI is the stable interface across SLURM versions (pyslurm has no release that builds against Debian 12's
SLURM 22.05). Every call fails with a ``ClusterError`` that says what to do.
"""

import shutil
import subprocess
from dataclasses import dataclass
from typing import Optional

from qat.errors import ClusterError

TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
                   "BOOT_FAIL", "DEADLINE"}


@dataclass(frozen=True)
class Partition:
    name: str
    nodes: int
    gpus_per_node: int
    default: bool


def slurm_command(name: str) -> str:
    """The path of SLURM tool ``name``; ``ClusterError`` when it is not on PATH."""
    path = shutil.which(name)
    if path is None:
        raise ClusterError(f"`{name}` not found on PATH: this machine has no SLURM client. Run qat submit on a "
                           "cluster login node, or start the local test cluster: cluster/local-cluster.sh install "
                           "&& cluster/local-cluster.sh start && source <state dir>/env.sh")
    return path


def run_slurm(name: str, *args: str, input_text: Optional[str] = None, timeout: float = 30) -> str:
    """Run a SLURM tool and return its stdout; ``ClusterError`` with its stderr when it fails."""
    cmd = [slurm_command(name), *args]
    try:
        result = subprocess.run(cmd, input=input_text, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise ClusterError(f"`{' '.join(cmd)}` did not answer in {timeout:.0f} s: is slurmctld running "
                           "(SLURM_CONF set)?") from exc
    if result.returncode != 0:
        raise ClusterError(f"`{' '.join(cmd)}` failed (exit {result.returncode}): {result.stderr.strip()}")
    return result.stdout


def _gpus_from_gres(gres: str) -> int:
    # sinfo %G: "(null)", "gpu:4", "gpu:a100:8(S:0-1)", comma-separated.
    total = 0
    for item in gres.split(","):
        fields = item.split("(")[0].split(":")
        if fields[0] == "gpu" and fields[-1].isdigit():
            total += int(fields[-1])
    return total


def partitions() -> dict[str, Partition]:
    """Partitions of the cluster by name, with node counts and GPUs per node."""
    out = run_slurm("sinfo", "-h", "-o", "%P|%D|%G")
    found: dict[str, Partition] = {}
    for line in out.splitlines():
        name, nodes, gres = line.strip().split("|")
        default = name.endswith("*")
        name = name.rstrip("*")
        previous = found.get(name)  # one line per node state; add them up
        total = int(nodes) + (previous.nodes if previous else 0)
        found[name] = Partition(name, total, _gpus_from_gres(gres), default)
    return found


def submit_batch_script(script: str) -> str:
    """Submit ``script`` (sbatch reads it from stdin) and return the job id."""
    out = run_slurm("sbatch", "--parsable", input_text=script)
    return out.strip().split(";")[0]  # "--parsable" prints "id" or "id;cluster"


def job_state(job_id: str) -> dict[str, str]:
    """``scontrol show job`` fields (JobState, Restarts, NodeList, StdOut, ...); ``{}`` once the job is forgotten."""
    try:
        out = run_slurm("scontrol", "show", "job", "-o", str(job_id))
    except ClusterError as exc:
        if "Invalid job id" in str(exc):
            return {}
        raise
    fields: dict[str, str] = {}
    for token in out.split():
        key, sep, value = token.partition("=")
        if sep:
            fields[key] = value
    return fields


def queue(job_id: Optional[str] = None) -> str:
    """``squeue`` lines: this job, or all jobs of the cluster."""
    args = ["-o", "%.10i %.9P %.24j %.8u %.10T %.10M %.6D %R"]
    return run_slurm("squeue", *args, *(["-j", str(job_id)] if job_id else []))


def cancel(job_id: str, signal: Optional[str] = None) -> None:
    """Cancel a job, or with ``signal`` (e.g. ``USR1``) send that signal to its job steps (all ranks)."""
    run_slurm("scancel", *(["--signal", signal] if signal else []), str(job_id))
