"""Export a ternary QAT model as an HF transformers BitNet folder (``quant_method: bitnet``, offline, packed).

Layout (transformers ``integrations/bitnet.py``): each quantized linear stores ``weight`` as uint8
(out // 4, in) (see ``qat.pack.hf_bitnet``) and ``weight_scale`` of shape (1,). We write
``linear_class: bitlinear``, whose forward divides: ``y = (x_q @ W_q^T) / (x_scale * weight_scale)``, so
``weight_scale = 1 / mean|W|``. (``autobitlinear`` multiplies instead; a file is right only for the class named
in its config.)
"""

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from qat.errors import ExportError
from qat.checkpoint.trained import TrainedModel
from qat.nn.bitlinear import BitLinear
from qat.nn.convert import PRE_BLOCK_NORMS
from qat.pack.hf_bitnet import pack_ternary_hf
from qat.nn.schemes import get_scheme

WEIGHTS_FILE = "model.safetensors"
EXPORT_MANIFEST = "qat_export.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_exportable_to_hf(trained: TrainedModel) -> None:
    """Raise ``ExportError`` naming why this model cannot be an HF BitNet checkpoint, and what to do instead."""
    quant = trained.quant
    if quant is None:
        raise ExportError("this checkpoint is full precision (model.quant is null): nothing to pack. "
                          "Export it with `qat export ... --format hf-fp`, or train a ternary recipe")
    levels = get_scheme(quant.weight).levels if "hf" in get_scheme(quant.weight).export_formats else None
    if levels is None or not set(levels) <= {-1, 0, 1}:
        raise ExportError(f"weight quantizer {quant.weight!r} is not ternary; HF BitNet holds only {{-1, 0, 1}} "
                          "weights. Use the export format of that quantizer family")
    if quant.granularity != "tensor":
        raise ExportError(f"granularity {quant.granularity!r}: HF BitNet stores one scale per tensor. Train with "
                          "model.quant.granularity=tensor, or export to GGUF (per-block scales)")
    if quant.activation != "int8_per_token":
        raise ExportError("HF BitLinear always quantizes activations to int8 per token; this model was trained "
                          f"with activation={quant.activation!r}, so its logits would not match")
    odd = [n for n, m in trained.model.named_modules() if isinstance(m, BitLinear) and m.out_features % 4]
    if odd:
        raise ExportError(f"out_features must be a multiple of 4 for HF packing: {odd[:3]}")


def hf_bitnet_state_dict(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """HF-format tensors: packed ternary weights + inverse scales for ``BitLinear``s, the rest cast to ``dtype``."""
    state: dict[str, torch.Tensor] = {}
    packed_prefixes = set()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, BitLinear):
                codes, scale = module.quantized_weight()
                state[f"{name}.weight"] = pack_ternary_hf(codes)
                # Scale kept in fp32 math, then stored in the model dtype (as transformers expects).
                state[f"{name}.weight_scale"] = (1.0 / scale.float()).reshape(1).to(dtype)
                packed_prefixes.add(f"{name}.weight")
        for key, tensor in model.state_dict().items():
            if key in packed_prefixes or key in state:
                continue
            state[key] = tensor.detach().to(dtype).contiguous()
    return state


def _missing_pre_block_norms(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The ``inlayer`` variant replaced decoder norms by identities; HF keeps the modules, so write them as ones
    (an RMSNorm with unit weight before the in-layer RMSNorm changes activations by < 1e-6 relative)."""
    out = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in PRE_BLOCK_NORMS and isinstance(module, nn.Identity):
            out[f"{name}.weight"] = torch.ones(model.config.hidden_size, dtype=dtype)
    return out


def hf_quantization_config(trained: TrainedModel) -> dict:
    kept = sorted(n for n, m in trained.model.named_modules()
                  if isinstance(m, nn.Linear) and not isinstance(m, BitLinear))
    return {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline",
            "modules_to_not_convert": kept or None,
            "use_rms_norm": trained.quant.norm_placement == "inlayer",
            "rms_norm_eps": float(getattr(trained.model.config, "rms_norm_eps", 1e-6))}


def write_tokenizer(tokenizer_files: dict[str, str], out_dir: Path) -> None:
    if not tokenizer_files:
        raise ExportError("the checkpoint carries no tokenizer files; re-train with `qat fit` (it stores them)")
    for name, text in tokenizer_files.items():
        (out_dir / name).write_text(text)


def export_hf_bitnet(trained: TrainedModel, out_dir: str | Path, dtype: str = "bfloat16",
                     model_card: str | None = None, manifest: dict | None = None) -> Path:
    """Write ``out_dir`` (config.json, model.safetensors, tokenizer, README.md) atomically; return it."""
    check_exportable_to_hf(trained)
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    model = trained.model
    state = hf_bitnet_state_dict(model, torch_dtype)
    state.update(_missing_pre_block_norms(model, torch_dtype))
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    config["quantization_config"] = hf_quantization_config(trained)
    config["dtype"] = dtype
    config.pop("torch_dtype", None)
    return write_export_folder(out_dir, state, config, trained.tokenizer_files, model_card, manifest)


def write_export_folder(out_dir: str | Path, state: dict[str, torch.Tensor], config: dict,
                        tokenizer_files: dict[str, str], model_card: str | None, manifest: dict | None) -> Path:
    """Write the folder next to its final place, then swap it in, so readers never see half an export."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    write_tokenizer(tokenizer_files, tmp)
    if model_card:
        (tmp / "README.md").write_text(model_card)
    if manifest is not None:
        (tmp / EXPORT_MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir


def linear_bits_per_weight(export_dir: str | Path) -> float:
    """Stored bits per quantized linear weight (packed codes + scales) in an exported folder."""
    from safetensors import safe_open

    bits, weights = 0, 0
    with safe_open(str(Path(export_dir) / WEIGHTS_FILE), framework="pt") as f:
        keys = set(f.keys())
        for key in keys:
            if key.endswith(".weight_scale"):
                base = key[: -len("_scale")]
                packed, scale = f.get_tensor(base), f.get_tensor(key)
                bits += packed.numel() * packed.element_size() * 8 + scale.numel() * scale.element_size() * 8
                weights += packed.shape[0] * 4 * packed.shape[1]
    if weights == 0:
        raise ExportError(f"{export_dir} holds no packed BitNet weights")
    return bits / weights
