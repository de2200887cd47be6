"""Tiny real checkpoints for the export tests: a randomly initialised qat model saved exactly as `qat fit` saves
one (state_dict under ``model.``, hyper-parameters, tokenizer files, data hyper-parameters), on the built-in
corpus with the cached 4,096-token BPE, so `qat export` / `qat eval` run on it in seconds."""

from dataclasses import asdict
from pathlib import Path
from typing import Optional

import pytest
import torch

from qat.nn.config import ArchConfig, QuantConfig
from qat.nn.convert import build_model, convert_to_qat
from tests.conftest import REPO, TINY_FIT_ARGS, run_qat_concurrently

DATA_HPARAMS = {"train_files": None, "val_files": None, "text_field": "text", "tokenizer": "bpe",
                "tokenizer_vocab_size": 4096, "seq_len": 64, "batch_size": 2, "max_val_blocks": 0, "num_workers": 0,
                "seed": 1234, "max_train_blocks": 0}


def bpe_tokenizer_files() -> dict[str, str]:
    from qat.data.datamodule import TextDataModule

    data = TextDataModule(**DATA_HPARAMS)
    return {p.name: p.read_text() for p in Path(data.tokenizer_path).iterdir() if p.is_file()}


def tiny_model(quant: Optional[QuantConfig], hidden: int = 64, family: str = "bitnet", vocab: int = 4096,
               seed: int = 0, llamacpp: bool = False) -> torch.nn.Module:
    """``llamacpp``: tied embeddings and a SiLU-gated FFN, the model llama.cpp's bitnet graph computes."""
    torch.manual_seed(seed)
    arch = ArchConfig(family=family, vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
                      **({"tie_word_embeddings": True, "hidden_act": "silu"} if llamacpp else {}))
    model = build_model(arch)
    return (convert_to_qat(model, quant) if quant else model).eval()


def write_checkpoint(path: Path, model: torch.nn.Module, quant: Optional[QuantConfig], step: int = 7) -> Path:
    """``path`` as a `qat fit` checkpoint of ``model``."""
    arch = {k: getattr(model.config, k) for k in ("vocab_size", "hidden_size", "intermediate_size",
                                                   "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                                                   "tie_word_embeddings", "hidden_act")}
    arch_cfg = asdict(ArchConfig(family=model.config.model_type, **arch))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": {"model." + k: v for k, v in model.state_dict().items()},
                "hyper_parameters": {"arch": arch_cfg, "quant": asdict(quant) if quant else None, "optim": {},
                                     "token_ids": {}},
                "qat_tokenizer_files": bpe_tokenizer_files(), "datamodule_hyper_parameters": dict(DATA_HPARAMS),
                "global_step": step}, path)
    return path


@pytest.fixture
def ternary_checkpoint(tmp_path) -> Path:
    """``tmp_path/runs/tiny/checkpoints/last.ckpt`` of a tiny ternary BitNet."""
    quant = QuantConfig()
    return write_checkpoint(tmp_path / "runs" / "tiny" / "checkpoints" / "last.ckpt", tiny_model(quant), quant)


# The models the llama.cpp comparisons train with `qat fit`: a tiny llama (ternary, row scales, 16-bit activations;
# tests/export/test_gguf_q4_0.py) and recipes/bitnet-b158-tiny-llamacpp.yaml (tests/export/test_llamacpp.py).
LLAMA_FIT_ARGS = ["--config", str(REPO / "recipes" / "bitnet-b158-tiny.yaml"), "--trainer.max_steps=40",
                  "--trainer.val_check_interval=40", "--trainer.limit_val_batches=1",
                  "--run.checkpoint_every_n_steps=40",
                  "--trainer.enable_progress_bar=false", "--model.arch.family=llama", "--model.quant.granularity=row",
                  "--model.quant.activation=none", "--model.optim.warmup_steps=5", "--model.health_every_n_steps=20"]
LLAMACPP_RECIPE_FIT_ARGS = [
    "--config", str(REPO / "recipes" / "bitnet-b158-tiny-llamacpp.yaml"),
    *(a for a in TINY_FIT_ARGS if not a.startswith("--config") and "bitnet-b158-tiny.yaml" not in a),
    "--trainer.max_steps=40"]


@pytest.fixture(scope="session")
def llama_cpp_training_runs(tmp_path_factory) -> dict[str, Path]:
    """Both models above trained at once (each `qat fit` runs one thread, so on 2 cores side by side in the time
    of one): name -> its last checkpoint."""
    runs = tmp_path_factory.mktemp("runs")
    commands = {"llama-ternary": LLAMA_FIT_ARGS, "bitnet-llamacpp": LLAMACPP_RECIPE_FIT_ARGS}
    results = run_qat_concurrently(*(["fit", *args, f"--trainer.default_root_dir={runs / name}"]
                                     for name, args in commands.items()))
    for result in results:
        assert result.returncode == 0, result.stderr[-4000:]
    return {name: runs / name / "checkpoints" / "last.ckpt" for name in commands}
