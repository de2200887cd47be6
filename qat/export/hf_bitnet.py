"""``hf``: an HF transformers BitNet folder (``quant_method: bitnet``, offline, packed 2 bits/weight).

Layout (transformers ``integrations/bitnet.py``): each quantized linear stores ``weight`` as uint8
(out // 4, in) (see ``qat.pack.hf_bitnet``) and ``weight_scale`` of shape (1,). We write
``linear_class: bitlinear``, whose forward divides: ``y = (x_q @ W_q^T) / (x_scale * weight_scale)``, so
``weight_scale = 1 / mean|W|``. (``autobitlinear`` multiplies instead; a file is right only for the class named
in its config.)
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from qat.errors import ExportError
from qat.export.exporter import ExportFormat, check_dtype, model_quant, model_scheme
from qat.export.folder import WEIGHTS_FILE, check_finite
from qat.nn.convert import PRE_BLOCK_NORMS
from qat.nn.quantized import quantized_layers
from qat.pack.hf_bitnet import pack_ternary_hf


def check(model: nn.Module) -> None:
    """Raise ``ExportError`` naming why ``model`` cannot be an HF BitNet checkpoint, and what to do instead."""
    scheme = model_scheme(model)
    if scheme is None:
        raise ExportError("this model is full precision (model.quant is null): nothing to pack. "
                          "Export it with `--format hf-fp`, or train a ternary recipe")
    if "hf" not in scheme.export_formats or not set(scheme.levels) <= {-1, 0, 1}:
        raise ExportError(f"weight scheme {scheme.name!r} ({scheme.description}) is not held exactly by HF BitNet "
                          f"(ternary codes times one scale per tensor). Use --format {scheme.default_export}")
    quant = model_quant(model)
    if quant.granularity != "tensor":
        raise ExportError(f"granularity {quant.granularity!r}: HF BitNet stores one scale per tensor. Train with "
                          "model.quant.granularity=tensor, or export to GGUF (per-block scales)")
    if quant.activation != "int8_per_token":
        raise ExportError("HF BitLinear always quantizes activations to int8 per token; this model was trained "
                          f"with activation={quant.activation!r}, so its logits would not match")
    odd = [n for n, m in quantized_layers(model).items() if m.out_features % 4]
    if odd:
        raise ExportError(f"out_features must be a multiple of 4 for HF packing: {odd[:3]}")


def hf_bitnet_state_dict(model: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """HF-format tensors: packed ternary weights + inverse scales for quantized layers, the rest cast to ``dtype``."""
    state: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, module in quantized_layers(model).items():
            codes, scale = module.quantized_weight()
            state[f"{name}.weight"] = pack_ternary_hf(codes)
            # Scale kept in fp32 math, then stored in the model dtype (as transformers expects).
            state[f"{name}.weight_scale"] = (1.0 / scale.float()).reshape(1).to(dtype)
        # HF's BitLinear holds weight, weight_scale, bias and its rms_norm submodule; a quantized layer's own
        # training-only tensors (e.g. ParetoQ's alpha, folded into the scale above) are not HF's.
        training_only = {f"{name}.{key}" for name, module in quantized_layers(model).items()
                         for key, _ in module.named_parameters(recurse=False) if key not in ("weight", "bias")}
        for key, tensor in model.state_dict().items():
            if key not in state and key not in training_only:
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


def hf_quantization_config(model: nn.Module) -> dict:
    quantized = quantized_layers(model)
    kept = sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in quantized)
    return {"quant_method": "bitnet", "linear_class": "bitlinear", "quantization_mode": "offline",
            "modules_to_not_convert": kept or None,
            "use_rms_norm": model_quant(model).norm_placement == "inlayer",
            "rms_norm_eps": float(getattr(model.config, "rms_norm_eps", 1e-6))}


def write(model: nn.Module, folder: Path, dtype: str) -> None:
    """model.safetensors + config.json of the HF BitNet layout."""
    torch_dtype = check_dtype(dtype)
    state = hf_bitnet_state_dict(model, torch_dtype)
    state.update(_missing_pre_block_norms(model, torch_dtype))
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    check_finite(state)
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    config["quantization_config"] = hf_quantization_config(model)
    config["dtype"] = dtype
    config.pop("torch_dtype", None)
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def load(folder: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, device_map="cpu").eval()


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


FORMAT = ExportFormat(
    name="hf", description="HF transformers BitNet (2-bit packed ternary, one scale per tensor)",
    runtime="HF transformers >= 4.57 (`AutoModelForCausalLM.from_pretrained`, needs `accelerate`); qat's packed "
            "kernels (`qat generate`)",
    loading_code="from transformers import AutoModelForCausalLM, AutoTokenizer\n"
                 "model = AutoModelForCausalLM.from_pretrained(path, device_map='cpu')\n"
                 "tok = AutoTokenizer.from_pretrained(path)",
    check=check, write=write, load=load, bits_per_weight=linear_bits_per_weight, packed_kernels=True,
    uses_dtype=True)
