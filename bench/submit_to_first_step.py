"""Time from ``qat submit`` to the first training step on a SLURM cluster, split into queue (submit -> batch
script starts) and start-up (imports, rendezvous, DeepSpeed init, data, model -> first step). Each repeat submits
the tiny recipe on 2 nodes with ZeRO-2 and cancels the job once its first step is announced.

    .venv/bin/python bench/submit_to_first_step.py [--repeats 2] [--strategy deepspeed_stage_2] [--nodes 2]

Uses the cluster ``SLURM_CONF`` points at; without one it starts a local cluster (cluster/local-cluster.sh) in
a temporary directory for the run and stops it afterwards.
"""

import argparse
import os
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from qat.cluster.slurm import cancel, job_state
from qat.cluster.submit import SlurmJob, submit_to_slurm

REPO = Path(__file__).resolve().parents[1]
JOB_START = re.compile(r"qat: job \d+ start ([\d.]+)")
FIRST_STEP = re.compile(r"qat: first step at ([\d.]+)")


def wait_for_line(path: Path, pattern: re.Pattern, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = pattern.search(path.read_text(errors="replace")) if path.exists() else None
        if match:
            return float(match[1])
        time.sleep(0.2)
    raise TimeoutError(f"no {pattern.pattern!r} in {path} after {timeout} s")


def one_submit(run_dir: Path, args: argparse.Namespace) -> tuple[float, float]:
    job = SlurmJob(recipe=REPO / "recipes" / "bitnet-b158-tiny.yaml", nodes=args.nodes, time="00:10:00",
                   signal_margin_s=60, strategy=args.strategy, run_dir=run_dir,
                   overrides=["--trainer.max_steps=1000", "--trainer.enable_progress_bar=false",
                              "--run.wandb_mode=offline"])
    submitted = time.time()
    job_id, _ = submit_to_slurm(job)
    out = run_dir / f"slurm-{job_id}.out"
    try:
        started = wait_for_line(out, JOB_START, args.timeout)
        first_step = wait_for_line(out, FIRST_STEP, args.timeout)
    finally:
        cancel(job_id)
        while job_state(job_id).get("JobState") in ("PENDING", "RUNNING", "COMPLETING"):
            time.sleep(0.5)
    return started - submitted, first_step - submitted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--strategy", default="deepspeed_stage_2")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qat-submit-bench-"))
    cluster_env = None
    if "SLURM_CONF" not in os.environ:
        cluster_env = {**os.environ, "SLURM_LOCAL_DIR": str(work / "slurm"), "SLURM_LOCAL_PORT_BASE": "47817"}
        subprocess.run([str(REPO / "cluster" / "local-cluster.sh"), "start"], env=cluster_env, check=True,
                       timeout=60)
        os.environ["SLURM_CONF"] = str(work / "slurm" / "etc" / "slurm.conf")
    try:
        results = [one_submit(work / f"run-{i}", args) for i in range(args.repeats)]
    finally:
        if cluster_env is not None:
            subprocess.run([str(REPO / "cluster" / "local-cluster.sh"), "stop"], env=cluster_env, timeout=60)
    print(f"qat submit -> first step, tiny recipe, {args.nodes} nodes, {args.strategy}, {args.repeats} repeats")
    print(f"{'repeat':<8}{'queue s':>10}{'start-up s':>12}{'total s':>10}")
    for i, (queued, total) in enumerate(results):
        print(f"{i:<8}{queued:>10.1f}{total - queued:>12.1f}{total:>10.1f}")
    print(f"{'median':<8}{statistics.median(q for q, _ in results):>10.1f}"
          f"{statistics.median(t - q for q, t in results):>12.1f}{statistics.median(t for _, t in results):>10.1f}")


if __name__ == "__main__":
    main()
