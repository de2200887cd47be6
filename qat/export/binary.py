"""Export of binary (``fbi_binary`` / ``onebit``) checkpoints: 1 bit per linear weight plus the fp32 scales, in
safetensors, and the qat loader that rebuilds the model with identical logits.

Folder layout (written atomically by ``write_export_folder``):

- ``model.safetensors``: ``<layer>.weight_sign_1bit`` uint8 (out, ceil(in/8)) from ``qat.pack.pack_sign_1bit``,
  ``<layer>.alpha``/``.beta`` (FBI) or ``.g``/``.h`` (OneBit) fp32, every other tensor (embeddings, norms,
  lm_head) fp32 under its HF name;
- ``config.json``: ``model_type`` ``qat-binary`` (so HF transformers refuses the folder instead of silently
  loading random linear weights), the HF config of the base model and the quantization;
- tokenizer files, ``README.md`` (model card), ``qat_export.json``.

No other runtime implements FBI-LLM/OneBit column scales on 1-bit weights (llama.cpp/bitnet.cpp have ternary
TQ1_0/TQ2_0/I2_S, not this), so the folder loads through qat only: :func:`load_binary_export`.
"""

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open

from qat.errors import ExportError
from qat.checkpoint.trained import TrainedModel
from qat.export.hf_bitnet import WEIGHTS_FILE, write_export_folder
from qat.nn.config import QuantConfig
from qat.nn.fbi_linear import binary_layers
from qat.nn.schemes import get_scheme
from qat.pack.binary_1bit import pack_sign_1bit, unpack_sign_1bit

BINARY_MODEL_TYPE = "qat-binary"
SIGN_SUFFIX = ".weight_sign_1bit"


def binary_state_dict(model: torch.nn.Module, tied: bool) -> dict[str, torch.Tensor]:
    """The export tensors: packed signs for binary layers' weights, fp32 for everything else."""
    layers = binary_layers(model)
    state = {}
    for name, tensor in model.state_dict().items():
        owner, _, leaf = name.rpartition(".")
        if owner in layers and leaf == "weight":
            state[owner + SIGN_SUFFIX] = pack_sign_1bit(layers[owner].sign_codes())
        elif not (tied and name == "lm_head.weight"):
            state[name] = tensor.detach().to(torch.float32).contiguous()
    return state


def _bits_per_weight(state: dict[str, torch.Tensor], model: torch.nn.Module) -> float:
    layers = binary_layers(model)
    weights = sum(m.weight.numel() for m in layers.values())
    bits = sum(state[n + SIGN_SUFFIX].numel() * 8 + sum(getattr(m, s).numel() * 32 for s in m.scale_names)
               for n, m in layers.items())
    return bits / weights


def _model_card(name: str, trained: TrainedModel, bits: float, source: str) -> str:
    arch, quant = trained.arch, trained.quant
    data = trained.data_hparams or {}
    teacher = trained.hparams.get("teacher")
    distill = trained.hparams.get("distill") if teacher else None
    return "\n".join([
        f"# {name}", "",
        f"Fully binary causal LM trained with qat (`{quant.weight}`: "
        f"{'FBI-LLM, W = alpha ⊙ sign(W) + beta' if quant.weight == 'fbi_binary' else 'OneBit, W = g ⊙ sign(W) ⊙ h'}; "
        "activations, embeddings, norms and lm_head in full precision).", "",
        f"- architecture: `{arch.family}`, hidden {arch.hidden_size}, {arch.num_hidden_layers} layers, "
        f"{arch.num_attention_heads} heads, FFN {arch.intermediate_size}, vocab {arch.vocab_size}",
        f"- linear-layer storage: {bits:.4f} bits/weight (1-bit signs + fp32 scales)",
        f"- training: {trained.global_step} steps, "
        + (f"autoregressive distillation from `{teacher['source']}` ({json.dumps(distill)})" if teacher
           else "next-token cross-entropy (no teacher)"),
        f"- data: {data.get('train_files') or 'built-in Wikipedia corpus (gensim test data)'}, tokenizer "
        f"`{data.get('tokenizer', '?')}`, block length {data.get('seq_len', '?')}; source checkpoint `{source}`", "",
        "## Loading", "",
        "Runtimes: **qat only** (`qat.export.binary.load_binary_export`). HF transformers, llama.cpp and bitnet.cpp "
        "do not implement 1-bit weights with FBI/OneBit scales; `config.json` has model_type "
        f"`{BINARY_MODEL_TYPE}` so they refuse the folder rather than load it wrongly.", "",
        "```python", "from qat.export.binary import load_binary_export",
        "model = load_binary_export(path)  # a transformers model with FBILinear/OneBitLinear layers, eval mode",
        "```", ""])


def export_binary(trained: TrainedModel, out_dir: str | Path, manifest: Optional[dict] = None,
                  source: str = "") -> Path:
    """Write ``trained`` (a binary QAT checkpoint) as a 1-bit safetensors folder.

    Raises:
        ExportError: the model has no binary layers (export ternary/FP runs with ``--format hf``/``hf-fp``).
    """
    if trained.quant is None or "binary" not in get_scheme(trained.quant.weight).export_formats:
        raise ExportError(f"--format binary needs a binary checkpoint (model.quant.weight: fbi_binary or onebit); "
                          f"this one has quant={asdict(trained.quant) if trained.quant else None}. Use --format hf "
                          "(ternary) or hf-fp (full precision).")
    tied = bool(trained.arch.tie_word_embeddings)
    state = binary_state_dict(trained.model, tied)
    bits = _bits_per_weight(state, trained.model)
    config = {"model_type": BINARY_MODEL_TYPE, "format_version": 1, "quant": asdict(trained.quant),
              "base_config": trained.model.config.to_dict(), "bits_per_linear_weight": bits}
    out = Path(out_dir)
    name = out.parent.name if out.parent.name not in ("", ".") else out.name
    return write_export_folder(out, state, config, trained.tokenizer_files,
                               _model_card(name, trained, bits, source), manifest)


def load_binary_export(folder: str | Path) -> torch.nn.Module:
    """Rebuild an exported binary model (eval mode, fp32) whose logits equal the training model's.

    Raises:
        ExportError: the folder is not a qat binary export.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from qat.nn.convert import convert_to_qat

    folder = Path(folder)
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if config.get("model_type") != BINARY_MODEL_TYPE:
        raise ExportError(f"{folder} is not a qat binary export (config.json model_type != {BINARY_MODEL_TYPE!r}); "
                          "write one with `qat export CKPT --format binary`")
    base = dict(config["base_config"])
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(base.pop("model_type"), **base),
                                             dtype=torch.float32)
    convert_to_qat(model, QuantConfig(**config["quant"]))
    layers = binary_layers(model)
    state = {}
    with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as f:
        for key in f.keys():
            tensor = f.get_tensor(key)
            if key.endswith(SIGN_SUFFIX):
                owner = key[: -len(SIGN_SUFFIX)]
                # Latent weight = its own sign (±1): sign() of it gives back exactly the exported codes.
                state[owner + ".weight"] = unpack_sign_1bit(tensor, layers[owner].in_features)
            else:
                state[key] = tensor
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ExportError(f"{folder} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if model.config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()
