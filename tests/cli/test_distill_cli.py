"""A real distillation run through the CLI: SmolLM2 teacher, cached top-k logits, real Wikipedia text, binary
student; then a stale cache refused, and the 1-bit export reloaded with identical logits."""

import pytest
import torch

from tests.conftest import REPO, run_qat

pytestmark = pytest.mark.slow

DATA = ["--data.max_train_blocks=8", "--data.seq_len=64", "--data.batch_size=4", "--data.max_val_blocks=4"]


def test_cache_teacher_distill_export_through_the_cli(tmp_path, capsys):
    recipe = ["--config", str(REPO / "recipes" / "fbi-binary-tiny-ad.yaml"), f"--trainer.default_root_dir={tmp_path}"]
    cached = run_qat("cache-teacher", *recipe, *DATA)
    assert cached.returncode == 0, cached.stderr[-3000:]
    assert "teacher-logit cache:" in cached.stdout

    fit = run_qat("distill", *recipe, *DATA, "--trainer.max_steps=4", "--trainer.val_check_interval=2",
                  "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
                  "--model.optim.warmup_steps=1", "--trainer.log_every_n_steps=1")
    assert fit.returncode == 0, fit.stderr[-3000:]
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert state["global_step"] == 4
    assert state["hyper_parameters"]["teacher"]["source"] == "smollm2"
    assert not any("teacher" in k for k in state["state_dict"])          # the teacher is never checkpointed
    assert any(k.endswith("q_proj.alpha") for k in state["state_dict"])   # FBI scales are trained state

    # The rest runs the same `qat` entry point in-process (saves two interpreter start-ups).
    from qat.cli.main import main

    assert main(["distill", *recipe, *DATA, "--data.max_train_blocks=6", "--trainer.max_steps=1"]) == 2
    err = capsys.readouterr().err
    assert "no teacher-logit cache" in err and "data (token blocks)" in err

    assert main(["export", str(ckpt), "--out_dir", str(tmp_path / "binary"), "--format", "binary"]) == 0
    from qat.checkpoint.trained import load_trained_model
    from qat.export.binary import load_binary_export

    reloaded, trained = load_binary_export(tmp_path / "binary"), load_trained_model(str(ckpt))
    ids = torch.randint(0, 49152, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, trained.model(input_ids=ids).logits)
