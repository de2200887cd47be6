import subprocess
import sys
import time
from pathlib import Path

import pytest

from qat.cluster.slurm import cancel, job_state, partitions, submit_batch_script
from qat.cluster.submit import SlurmJob, check_job, render_sbatch_script, submit_to_slurm, time_limit_seconds
from qat.errors import ClusterError, RecipeError

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "bitnet-b158-tiny.yaml"


def wait_until_done(job_id: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_state(job_id)
        if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            return state
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} not done after {timeout} s: {job_state(job_id)}")


def test_time_limits():
    assert time_limit_seconds("01:02:03") == 3723
    assert time_limit_seconds("2-00:00:10") == 2 * 86400 + 10
    with pytest.raises(ClusterError, match="HH:MM:SS"):
        time_limit_seconds("90")


def test_dry_run_script_has_the_launch_contract(tmp_path):
    job = SlurmJob(recipe=RECIPE, nodes=2, time="00:30:00", signal_margin_s=90, strategy="deepspeed_stage_2",
                   run_dir=tmp_path / "run", overrides=["--trainer.max_steps=5"])
    script = render_sbatch_script(job, "debug")
    for line in ["#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --partition=debug",
                 "#SBATCH --signal=USR1@90", "#SBATCH --requeue", f"#SBATCH --output={tmp_path}/run/slurm-%j.out",
                 'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)']:
        assert line in script.splitlines(), line
    srun = next(line for line in script.splitlines() if line.startswith("srun "))
    assert f"--config {RECIPE}" in srun and "--trainer.num_nodes=2" in srun and "--trainer.devices=1" in srun
    assert "--trainer.strategy=deepspeed_stage_2" in srun and "--resume auto" in srun
    assert srun.endswith("--trainer.max_steps=5")
    gpu = render_sbatch_script(SlurmJob(recipe=RECIPE, gpus_per_node=4, run_dir=tmp_path), None)
    assert "#SBATCH --gpus-per-node=4" in gpu and "#SBATCH --ntasks-per-node=4" in gpu and "--partition" not in gpu
    with pytest.raises(ClusterError, match="signal-margin"):
        render_sbatch_script(SlurmJob(recipe=RECIPE, time="00:01:00", signal_margin_s=120), "debug")


def test_missing_recipe_and_missing_sbatch_are_reported(tmp_path, monkeypatch):
    with pytest.raises(RecipeError, match="does not exist"):
        submit_to_slurm(SlurmJob(recipe=tmp_path / "nope.yaml"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no SLURM client on PATH
    with pytest.raises(ClusterError, match="`sinfo` not found.*local-cluster.sh"):
        submit_to_slurm(SlurmJob(recipe=RECIPE))


@pytest.mark.cluster
def test_cluster_rejects_jobs_it_cannot_run(slurm_cluster):
    available = partitions()
    assert {"debug", "urgent"} <= set(available) and available["debug"].nodes == 2 and available["debug"].default
    assert check_job(SlurmJob(recipe=RECIPE, nodes=2), available).name == "debug"
    with pytest.raises(ClusterError, match="unknown partition 'gpu'; this cluster has: debug, urgent"):
        submit_to_slurm(SlurmJob(recipe=RECIPE, partition="gpu"))
    with pytest.raises(ClusterError, match="--nodes=3 but partition 'debug' has only 2"):
        submit_to_slurm(SlurmJob(recipe=RECIPE, nodes=3))
    with pytest.raises(ClusterError, match="have 0 GPU"):
        submit_to_slurm(SlurmJob(recipe=RECIPE, gpus_per_node=1))


@pytest.mark.cluster
def test_batch_script_runs_on_both_emulated_nodes_and_cancel_works(slurm_cluster, tmp_path):
    out = tmp_path / "out-%j.txt"
    job_id = submit_batch_script(f"#!/bin/bash\n#SBATCH -N 2 --ntasks-per-node=1 -o {out}\n"
                                 "srun bash -c 'echo rank $SLURM_PROCID on $SLURMD_NODENAME'\n")
    assert wait_until_done(job_id)["JobState"] == "COMPLETED"
    lines = sorted(Path(str(out).replace("%j", job_id)).read_text().split("\n"))
    assert [line for line in lines if line] == ["rank 0 on node1", "rank 1 on node2"]

    sleeper = submit_batch_script(f"#!/bin/bash\n#SBATCH -N 1 -o {tmp_path}/sleep.txt\nsleep 300\n")
    status = subprocess.run([sys.executable, "-m", "qat.cli.main", "status", "--job-id", sleeper], capture_output=True,
                            text=True, cwd=REPO, timeout=60)
    assert f"job {sleeper}:" in status.stdout and "restarts=0" in status.stdout
    cancel(sleeper)
    assert wait_until_done(sleeper)["JobState"] == "CANCELLED"


# Bad values are rejected before anything reaches a job script, with or without a cluster (no SLURM needed).

def _no_slurm(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm-here"))


def _dry_run(capsys, *args: str) -> tuple[int, str, str]:
    from qat.cli.main import main

    code = main(["submit", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_readme_dry_run_spelling_renders_the_script(tmp_path, monkeypatch, capsys):
    _no_slurm(monkeypatch, tmp_path)
    for flag in (["--dry-run"], ["--dry-run", "true"], ["--dry_run=true"]):
        code, out, err = _dry_run(capsys, str(RECIPE), "--nodes", "2", "--gpus-per-node", "0", "--partition", "debug",
                                  "--time", "00:30:00", *flag)
        assert code == 0, err
        assert "#SBATCH --nodes=2" in out.splitlines() and "#SBATCH --partition=debug" in out.splitlines()
    # The flag before the positional recipe, and an explicit false (then it submits: no SLURM here).
    code, out, _ = _dry_run(capsys, "--dry-run", str(RECIPE), "--time", "00:30:00")
    assert code == 0 and out.startswith("#!/bin/bash")
    code, out, err = _dry_run(capsys, str(RECIPE), "--dry-run", "false")
    assert code == 2 and out == "" and "`sinfo` not found" in err


@pytest.mark.parametrize("flag,value,message", [
    ("--nodes", "0", "--nodes=0: must be a whole number, at least 1"),
    ("--nodes", "-2", "--nodes=-2: must be"),
    ("--cpus-per-task", "0", "--cpus-per-task=0: must be a whole number, at least 1"),
    ("--gpus-per-node", "-1", "--gpus-per-node=-1: must be a whole number, at least 0"),
    ("--ranks-per-node", "0", "--ranks-per-node=0: must be"),
])
def test_counts_below_one_are_rejected_without_a_cluster(tmp_path, monkeypatch, capsys, flag, value, message):
    _no_slurm(monkeypatch, tmp_path)
    code, out, err = _dry_run(capsys, str(RECIPE), flag, value, "--dry-run")
    assert code == 2 and out == "" and err.startswith(f"qat submit: error: {message}")


@pytest.mark.parametrize("flag,key", [
    ("--partition", "--partition"), ("--strategy", "--strategy"), ("--time", "--time"), ("--run_dir", "--run-dir"),
])
@pytest.mark.parametrize("bad", ["\n", "\r", "\t", "\x1b", "\x00"])
def test_control_characters_in_flags_never_reach_the_script(tmp_path, monkeypatch, capsys, flag, key, bad):
    _no_slurm(monkeypatch, tmp_path)
    value = {"--time": "00:30:00", "--partition": "debug", "--strategy": "ddp", "--run_dir": str(tmp_path)}[flag]
    code, out, err = _dry_run(capsys, str(RECIPE), flag, f"{value}{bad}touch /tmp/pwned", "--dry-run")
    assert code == 2 and out == "", err
    assert f"qat submit: error: {key}=" in err and "control character" in err


def test_control_characters_in_overrides_and_recipe_path(tmp_path):
    with pytest.raises(ClusterError, match=r"--overrides\[1\]=.*control character"):
        SlurmJob(recipe=RECIPE, overrides=["--trainer.max_steps=5", "--run.name=x\ntouch /tmp/pwned"])
    with pytest.raises(ClusterError, match="recipe path=.*control character"):
        SlurmJob(recipe=tmp_path / "r\n.yaml")
    # A trailing newline used to pass the time check (`$` matches before it).
    with pytest.raises(ClusterError, match="--time"):
        SlurmJob(recipe=RECIPE, time="01:00:00\n")


@pytest.mark.parametrize("section,key", [("run", "name"), ("trainer", "default_root_dir")])
def test_control_characters_in_recipe_values_are_a_recipe_error(tmp_path, section, key):
    import yaml

    recipe = tmp_path / "r.yaml"
    loaded = yaml.safe_load(RECIPE.read_text())
    loaded.setdefault(section, {})[key] = "x\nrm -rf ~"
    recipe.write_text(yaml.safe_dump(loaded))
    with pytest.raises(RecipeError, match=rf"{section}\.{key}=.*control character"):
        render_sbatch_script(SlurmJob(recipe=recipe), "debug")
    loaded[section][key] = ["not", "a", "text"]
    recipe.write_text(yaml.safe_dump(loaded))
    with pytest.raises(RecipeError, match=rf"{section}\.{key}=.*must be a text"):
        render_sbatch_script(SlurmJob(recipe=recipe), "debug")
