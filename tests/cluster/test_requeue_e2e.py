"""`qat submit` of the tiny recipe on 2 emulated nodes with DeepSpeed ZeRO-2 (gloo), interrupted by USR1 mid-epoch:
it checkpoints, requeues, resumes at the saved step with the same W&B run and data position, finishes, and its
ZeRO checkpoint consolidates into weights equal to an uninterrupted run's and packs."""

import re
import time
from pathlib import Path

import pytest
import torch

from qat.checkpoint.deepspeed import load_training_checkpoint
from qat.cluster.slurm import cancel, job_state
from qat.cluster.submit import SlurmJob, submit_to_slurm
from qat.pack.hf_bitnet import unpack_ternary_hf
from qat.quant import absmean_ternary

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "recipes" / "bitnet-b158-tiny.yaml"
# Scheduled checkpoints every 4 steps: the interrupt comes right after the first, so the resume is mid-epoch and
# the older checkpoint directories get rotated; the 16 steps after it leave time to deliver USR1 on a fast machine.
MAX_STEPS = 20
EVERY = 4
# Tiny and fp32: DeepSpeed's bf16 casts the weights to bf16, whose CPU backward GEMM has no fast path.
OVERRIDES = [f"--trainer.max_steps={MAX_STEPS}", "--trainer.precision=32-true", "--data.batch_size=4",
             "--data.seq_len=64", "--trainer.limit_val_batches=1", f"--trainer.val_check_interval={MAX_STEPS}",
             f"--run.checkpoint_every_n_steps={EVERY}", "--trainer.enable_progress_bar=false",
             "--trainer.deterministic=true"]
FIRST_STEP = re.compile(r"qat: first step at ([\d.]+) global_step (\d+) restart (\d+)")


def submit_tiny(run_dir: Path) -> tuple[str, float]:
    job = SlurmJob(recipe=RECIPE, nodes=2, time="00:10:00", signal_margin_s=60, strategy="deepspeed_stage_2",
                   run_dir=run_dir, overrides=OVERRIDES)
    submitted_at = time.time()
    job_id, _ = submit_to_slurm(job)
    return job_id, submitted_at


def wait_for(predicate, timeout: float, what: str, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def job_output(run_dir: Path, job_id: str) -> str:
    path = run_dir / f"slurm-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else ""


def finished(job_id: str) -> dict:
    state = job_state(job_id)
    return state if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") else {}


@pytest.mark.slow
@pytest.mark.cluster
@pytest.mark.deepspeed
def test_zero2_two_nodes_requeue_resumes_and_exports(slurm_cluster, tmp_path):
    interrupted, reference = tmp_path / "interrupted", tmp_path / "reference"
    job_id, submitted_at = submit_tiny(interrupted)
    first = wait_for(lambda: FIRST_STEP.search(job_output(interrupted, job_id)), 180, "the first step")
    print(f"submit -> first step: {float(first[1]) - submitted_at:.1f} s")
    checkpoints = interrupted / "checkpoints"
    wait_for(lambda: (checkpoints / f"step-{EVERY:06d}.ckpt").is_dir(), 180, "the first scheduled checkpoint",
             poll_s=0.1)
    cancel(job_id, "USR1")  # to the job steps: both ranks
    state = wait_for(lambda: finished(job_id), 300, "the requeued job to finish")
    out = job_output(interrupted, job_id)
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", out[-3000:]

    saved = re.search(r"saved .*last\.ckpt at global_step (\d+)", out)
    starts = FIRST_STEP.findall(out)
    assert saved and [(s[1], s[2]) for s in starts] == [("0", "0"), (saved[1], "1")], out[-3000:]
    assert EVERY <= int(saved[1]) < MAX_STEPS
    # One W&B run across the requeue: both offline run folders carry the stored id.
    run_id = (interrupted / "wandb_run_id").read_text().strip()
    runs = sorted(p.name for p in (interrupted / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(name.endswith(f"-{run_id}") for name in runs), runs

    checkpoint = load_training_checkpoint(checkpoints / "last.ckpt")
    assert checkpoint["global_step"] == MAX_STEPS
    # save_top_k=1 rotation removed the older ZeRO checkpoint directories.
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", f"step-{MAX_STEPS:06d}.ckpt"]

    reference_id, _ = submit_tiny(reference)
    state = wait_for(lambda: finished(reference_id), 300, "the uninterrupted job")
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "0"
    expected = load_training_checkpoint(reference / "checkpoints" / "last.ckpt")["state_dict"]
    assert expected.keys() == checkpoint["state_dict"].keys()
    for name, weight in checkpoint["state_dict"].items():
        torch.testing.assert_close(weight, expected[name], rtol=1e-5, atol=1e-6, msg=name)

    # `qat export` packs the ZeRO checkpoint directory itself; the HF BitNet folder reloads in transformers.
    from transformers import AutoModelForCausalLM

    from tests.conftest import run_qat

    out = tmp_path / "export"
    exported = run_qat("export", str(checkpoints / "last.ckpt"), "--out_dir", str(out), "--dtype", "float32")
    assert exported.returncode == 0, exported.stderr[-3000:]
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, device_map="cpu")
    packed = reloaded.model.layers[0].mlp.down_proj.weight
    assert packed.dtype == torch.uint8
    name = next(n for n in checkpoint["state_dict"] if n.endswith("layers.0.mlp.down_proj.weight"))
    codes, _ = absmean_ternary(checkpoint["state_dict"][name], "tensor", 128)
    assert torch.equal(unpack_ternary_hf(packed).to(codes.dtype), codes)
