"""The binary BitNet recipe through `qat run`: fit -> HF export -> eval, with the export run on the 1-bit kernels."""

import json

import pytest
import torch

from tests.conftest import REPO, run_qat

RECIPE = str(REPO / "recipes" / "bitnet-b1-binary-tiny.yaml")


@pytest.mark.slow
def test_binary_recipe_runs_the_whole_pipeline_on_1bit_kernels(tmp_path):
    from transformers import AutoModelForCausalLM

    from qat.nn.packed_linear import PackedLinear, pack_model

    run_dir = tmp_path / "run"
    result = run_qat("run", "--config", RECIPE, "--trainer.max_steps=8", "--trainer.val_check_interval=4",
                     "--trainer.limit_val_batches=1", "--run.checkpoint_every_n_steps=4",
                     "--trainer.enable_progress_bar=false", "--model.optim.warmup_steps=2",
                     f"--trainer.default_root_dir={run_dir}", "--eval_max_blocks=8")
    assert result.returncode == 0, result.stderr[-3000:]
    export_dir = next(run_dir.glob("export-hf*"))
    evaluation = json.loads((export_dir / "eval.json").read_text())
    qat_ppl = evaluation["qat_model"]["perplexity"]
    # fp32 export: the HF reload and the packed kernels compute the QAT model's integer math.
    assert abs(evaluation["exported"]["perplexity"] / qat_ppl - 1) < 1e-3
    assert abs(evaluation["packed_kernels"]["perplexity"] / qat_ppl - 1) < 1e-3
    assert qat_ppl < evaluation["unigram_perplexity"] * 3          # trained 8 steps: sane, not diverged
    packed = pack_model(AutoModelForCausalLM.from_pretrained(str(export_dir), dtype=torch.float32))
    layers = [m for m in packed.modules() if isinstance(m, PackedLinear)]
    assert layers and all(m.bits == 1 for m in layers)            # what `qat eval` / `qat generate` ran
    assert (run_dir / "loss.png").stat().st_size > 0
