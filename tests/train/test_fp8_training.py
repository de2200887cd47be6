"""FP8 training wired into the LightningModule: the TE backend's guard and layer selection, monitoring, checkpoints;
and (slow) real runs: FP32 vs FP8 side by side, FP8 + ternary, FP8 + DeepSpeed ZeRO-2 on 2 CPU ranks."""

import csv
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader

from qat.checkpoint.trained import load_trained_model
from qat.errors import RecipeError
from qat.nn.bitlinear import BitLinear
from qat.nn.config import ArchConfig, QuantConfig
from qat.nn.fp8_linear import FP8Config, FP8Linear
from qat.train.fp8 import TE_INSTALL_HINT, swap_to_te, te_available
from qat.train.module import QATLanguageModel
from qat.train.wandb_logger import offline_run_files, read_wandb_history
from tests.conftest import run_qat, run_qat_concurrently

REPO = Path(__file__).resolve().parents[2]
TINY = ArchConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2)


@pytest.mark.skipif(te_available()[0], reason="Transformer Engine is installed here")
def test_te_backend_without_te_is_a_clear_error_naming_the_extra():
    with pytest.raises(RecipeError) as info:
        QATLanguageModel(arch=TINY, quant=None, fp8=FP8Config(backend="te"))
    message = str(info.value)
    assert TE_INSTALL_HINT in message and "qat[te]" in message and "\n" not in message


def test_te_swap_never_converts_a_bitlinear(monkeypatch):
    """The TE swap replaces exactly the selected plain linears; the BitLinears stay (a stand-in ``te.Linear``
    records what is built: real TE needs CUDA, see the gpu-marked test)."""
    built = []

    class RecordingTELinear(nn.Linear):
        def __init__(self, in_features, out_features, bias=True, params_dtype=None, device=None):
            super().__init__(in_features, out_features, bias=bias, dtype=params_dtype)
            built.append((in_features, out_features))

    te_pytorch = types.ModuleType("transformer_engine.pytorch")
    te_pytorch.Linear = RecordingTELinear
    monkeypatch.setitem(sys.modules, "transformer_engine", types.ModuleType("transformer_engine"))
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", te_pytorch)
    monkeypatch.setattr("qat.train.fp8.require_te", lambda: None)
    module = QATLanguageModel(arch=TINY, quant=QuantConfig(), fp8=FP8Config(backend="te", keep_high_precision=[]))
    bitlinears = {n for n, m in module.model.named_modules() if isinstance(m, BitLinear)}
    assert module.fp8_layer_names == ["lm_head"] and len(bitlinears) == 14
    swap_to_te(module.model, module.fp8_layer_names)
    swap_to_te(module.model, module.fp8_layer_names)  # configure_model may run twice: no double swap
    assert type(module.model.lm_head) is RecordingTELinear and built == [(64, 64)]
    assert {n for n, m in module.model.named_modules() if isinstance(m, BitLinear)} == bitlinears
    # Even when asked by name, a quantized layer is not swapped.
    swap_to_te(module.model, sorted(bitlinears))
    assert built == [(64, 64)]


def _token_batches(n: int = 4, seq: int = 32):
    gen = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 64, (4, seq), generator=gen)} for _ in range(n)]


def test_fp8_module_trains_logs_fp8_health_and_checkpoints(tmp_path):
    fp8 = FP8Config(recipe="delayed", amax_history_len=4)
    module = QATLanguageModel(arch=TINY, quant=None, fp8=fp8, health_every_n_steps=2)
    assert module.hparams["fp8"]["recipe"] == "delayed"
    assert module.fp8_layer_names and all(isinstance(module.model.get_submodule(n), FP8Linear)
                                          for n in module.fp8_layer_names)
    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=CSVLogger(tmp_path), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
                        limit_val_batches=0)
    batches = _token_batches()
    trainer.fit(module, DataLoader(batches, batch_size=None))
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    keys = set(rows[0])
    for operand in ("input", "weight", "grad_output"):
        for stat in ("amax", "scale", "saturated_frac", "underflow_frac"):
            assert f"fp8/layers.1.mlp.down_proj/{operand}/{stat}" in keys
    values = [float(r["fp8/layers.1.mlp.down_proj/input/amax"]) for r in rows
              if r.get("fp8/layers.1.mlp.down_proj/input/amax")]
    assert len(values) == 2 and all(v > 0 for v in values)  # steps 0 and 2
    # The FP8 state is in the checkpoint, which loads without pickles, resumes exactly and exports.
    ckpt = tmp_path / "last.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=True)
    key = "model.model.layers.1.mlp.down_proj.fp8_amax_history"
    assert state["state_dict"][key].shape == (4, 3) and state["hyper_parameters"]["fp8"]["amax_history_len"] == 4
    layer = module.model.model.layers[1].mlp.down_proj
    assert (layer.fp8_scale != 1).all()  # the scales moved away from their initial value
    fresh = QATLanguageModel(arch=TINY, quant=None, fp8=fp8)
    fresh.load_state_dict(state["state_dict"], strict=True)
    assert torch.equal(fresh.model.model.layers[1].mlp.down_proj.fp8_scale, layer.fp8_scale)
    trained = load_trained_model(str(ckpt))
    assert type(trained.model.model.layers[1].mlp.down_proj) is nn.Linear
    with torch.no_grad():
        ids = batches[0]["input_ids"]
        plain, fp8_logits = trained.model(input_ids=ids).logits, module.eval()(ids)
    assert (plain.argmax(-1) == fp8_logits.argmax(-1)).float().mean() > 0.9


# ---- real runs -------------------------------------------------------------------------------------------------

FIT_ARGS = ["--trainer.max_steps=24", "--trainer.val_check_interval=24", "--trainer.limit_val_batches=4",
            "--trainer.enable_progress_bar=false", "--model.health_every_n_steps=8", "--trainer.log_every_n_steps=1",
            "--run.checkpoint_every_n_steps=24"]


def _fit_command(recipe: str, run_dir: Path, *extra: str) -> list[str]:
    return ["fit", "--config", str(REPO / "recipes" / recipe), *FIT_ARGS, f"--trainer.default_root_dir={run_dir}",
            *extra]


def _history(result, run_dir: Path) -> list[dict]:
    assert result.returncode == 0, result.stderr[-4000:]
    return read_wandb_history(offline_run_files(run_dir)[-1])


def _fit(recipe: str, run_dir: Path, *extra: str) -> list[dict]:
    return _history(run_qat(*_fit_command(recipe, run_dir, *extra)), run_dir)


def _last(rows: list[dict], key: str) -> float:
    return [r[key] for r in rows if key in r][-1]


def _first(rows: list[dict], key: str) -> float:
    return [r[key] for r in rows if key in r][0]


@pytest.mark.slow
def test_fp8_emulated_run_matches_high_precision_heldout_loss(tmp_path):
    """The tiny FP recipe, 24 steps, high precision (run.precision auto: bf16-mixed on AVX512-BF16/AMX CPUs,
    32-true elsewhere) vs FP8 (delayed, hybrid) side by side from the same seed and data: held-out loss within 1%
    (measured at 40 steps: 7.2636 vs 7.2600 under bf16-mixed, 0.05%), and FP8 health logged to W&B."""
    runs = {"fp32": "fp-baseline-tiny.yaml", "fp8": "fp-baseline-tiny-fp8.yaml"}
    results = run_qat_concurrently(*(_fit_command(recipe, tmp_path / name) for name, recipe in runs.items()))
    fp32, fp8 = (_history(result, tmp_path / name) for name, result in zip(runs, results))
    loss32, loss8 = _last(fp32, "val/loss"), _last(fp8, "val/loss")
    for rows in (fp32, fp8):  # both really train (measured at 40 steps: 8.40 -> 6.97)
        assert _last(rows, "train/loss") < _first(rows, "train/loss") - 1.0
    assert abs(loss8 - loss32) / loss32 < 0.01, (loss8, loss32)
    keys = set().union(*fp8)
    assert "fp8/layers.1.self_attn.q_proj/input/saturated_frac" in keys
    assert "fp8/layers.3.mlp.down_proj/grad_output/underflow_frac" in keys
    assert not any(k.startswith("fp8/layers.0.") or k.startswith("fp8/lm_head") for k in keys)  # kept in FP32


@pytest.mark.slow
def test_fp8_with_ternary_and_export(tmp_path):
    """FP8 + ternary QAT: the BitLinears stay ternary, the output layer trains in FP8; the checkpoint exports."""
    rows = _fit("bitnet-b158-tiny.yaml", tmp_path / "ternary", "--model.fp8.recipe=current",
                "--model.fp8.keep_high_precision=[]")
    keys = set().union(*rows)
    assert "fp8/lm_head/input/amax" in keys and "qat/q_proj/zero_frac" in keys
    assert _last(rows, "train/loss") < _first(rows, "train/loss") - 1.0
    ckpt = tmp_path / "ternary" / "checkpoints" / "last.ckpt"
    result = run_qat("export", str(ckpt), "--out_dir", str(tmp_path / "export"))
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--model.fp8.backend=te"], "qat[te]"),
    (["--model.fp8.recipe=mxfp8", "--model.fp8.margin=1"], "apply to recipe 'delayed' only"),
])
def test_cli_rejects_bad_fp8_options_in_one_line(tmp_path, args, message):
    if "--model.fp8.backend=te" in args and te_available()[0]:
        pytest.skip("Transformer Engine is installed here")
    result = run_qat("fit", "--config", str(REPO / "recipes" / "fp-baseline-tiny-fp8.yaml"), *args,
                     f"--trainer.default_root_dir={tmp_path}")
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("qat fit: error:") and message in last
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
@pytest.mark.deepspeed
def test_fp8_deepspeed_zero2_two_ranks_matches_one_rank(tmp_path):
    """Emulated FP8 (delayed scaling, amax reduced over ranks) through ZeRO-2 on 2 gloo ranks with micro-batch 4
    follows the 1-rank FP8 curve with batch 8: every rank casts with the same scales. Tolerance 1e-5 relative
    (measured 2e-7)."""
    script = Path(__file__).with_name("fp8_distributed_run.py")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    runs = {}
    for nproc, strategy in ((1, "auto"), (2, "deepspeed_stage_2")):
        out = tmp_path / f"{nproc}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(script), str(out), strategy]
        result = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        runs[nproc] = json.loads(out.read_text())[strategy]
    one, two = runs[1], runs[2]
    assert two["engine"] == "DeepSpeedEngine" and two["optimizer"] == "DeepSpeedZeroOptimizer"
    assert one["fp8_layers"] == ["0", "4"]
    assert min(one["losses"][-4:]) < one["losses"][0] / 3
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
    rank0, rank1 = two["scales_per_rank"]
    assert rank0 == rank1  # amax reduction: one set of scales for all ranks
    # Forward scales equal the 1-rank run's; gradient scales are half (each rank's mean-loss gradient is 2x).
    assert rank0[:2] == pytest.approx(one["scales_per_rank"][0][:2], rel=1e-6)
    assert rank0[2] == pytest.approx(one["scales_per_rank"][0][2] / 2, rel=1e-6)
