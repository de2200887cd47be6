"""Session-wide test setup: offline hubs, a shared cache (tokenizers, token blocks, teachers) so the suite reuses
what it builds, and one real short training run shared by the spine tests."""

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# No GPU driver here: Triton runs in its interpreter, and its standard library binds to interpreter mode when
# triton is first imported (by whichever module imports it first), so the mode is fixed before anything runs.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("QAT_CACHE_DIR", str(REPO / ".cache" / "qat"))
for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false", "DS_ACCELERATOR": "cpu"}.items():
    os.environ.setdefault(key, value)
os.environ.pop("WANDB_API_KEY", None)  # tests never go online


def run_qat(*args: str, cwd: Path | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """Run the real `qat` console entry point in a subprocess (as a user would)."""
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}  # a CLI run is its own W&B process
    env["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "1")
    return subprocess.run([sys.executable, "-m", "qat.cli.main", *args], cwd=cwd or REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)


def run_qat_concurrently(*commands: list[str], timeout: int = 900) -> list[subprocess.CompletedProcess]:
    """``run_qat`` for independent commands, as many at once as there are cores: each `qat` subprocess runs one
    thread (``OMP_NUM_THREADS=1``), so on the 2-core CI machine two take about the time of one."""
    with ThreadPoolExecutor(max_workers=min(len(commands), os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda args: run_qat(*args, timeout=timeout), commands))


TINY_FIT_ARGS = ["--config", str(REPO / "recipes" / "bitnet-b158-tiny.yaml"), "--trainer.max_steps=30",
                 "--trainer.val_check_interval=15", "--trainer.limit_val_batches=2",
                 "--run.checkpoint_every_n_steps=15",
                 "--trainer.enable_progress_bar=false", "--data.batch_size=8", "--model.health_every_n_steps=5",
                 "--model.optim.warmup_steps=5", "--trainer.log_every_n_steps=1"]


@pytest.fixture(scope="session")
def tiny_ternary_run(tmp_path_factory) -> Path:
    """A real 30-step `qat fit` of the tiny BitNet recipe through the CLI; returns its run directory."""
    run_dir = tmp_path_factory.mktemp("runs") / "bitnet-tiny"
    result = run_qat("fit", *TINY_FIT_ARGS, f"--trainer.default_root_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir


@pytest.fixture(scope="session")
def smollm2_teacher():
    """The real SmolLM2-135M teacher (fp32), converted from its GGUF once into the qat cache (~30 s the first
    time, ~0.3 s after) and shared by every test that needs it."""
    from qat.teachers import TeacherConfig, load_teacher

    return load_teacher(TeacherConfig(source="smollm2"))


LOCAL_CLUSTER = REPO / "cluster" / "local-cluster.sh"


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """One real local SLURM cluster (2 emulated nodes, partitions debug + urgent) for the whole test session, shared
    by every test that needs one; SLURM_CONF points the clients at it. Its own state dir and ports, so a developer's
    cluster keeps running."""
    if shutil.which("slurmctld") is None:
        pytest.skip("SLURM is not installed: run cluster/local-cluster.sh install (CI: .ci/install-system.sh)")
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_LOCAL_DIR": str(state), "SLURM_LOCAL_PORT_BASE": "46817"}
    subprocess.run([str(LOCAL_CLUSTER), "start"], env=env, check=True, timeout=60)
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(state / "etc" / "slurm.conf")
    yield state
    subprocess.run([str(LOCAL_CLUSTER), "stop"], env=env, timeout=60)
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous
