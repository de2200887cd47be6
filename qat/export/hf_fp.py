"""``hf-fp``: a plain HF transformers folder of a full-precision model (config.json + model.safetensors)."""

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from qat.errors import ExportError
from qat.export.exporter import ExportFormat, check_dtype, model_scheme
from qat.export.folder import WEIGHTS_FILE, check_finite


def check(model: nn.Module) -> None:
    scheme = model_scheme(model)
    if scheme is not None:
        raise ExportError(f"--format hf-fp writes full-precision models; this one is quantized ({scheme.name}). "
                          f"Use --format {scheme.default_export}")


def write(model: nn.Module, folder: Path, dtype: str) -> None:
    import json

    torch_dtype = check_dtype(dtype)
    state = {k: v.detach().to(torch_dtype).contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_word_embeddings", False):
        state.pop("lm_head.weight", None)
    check_finite(state)
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["dtype"] = dtype
    config.pop("torch_dtype", None)
    config["architectures"] = [type(model).__name__]
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def load(folder: Path) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, device_map="cpu").eval()


FORMAT = ExportFormat(
    name="hf-fp", description="plain HF transformers folder (full-precision models)",
    runtime="HF transformers (`AutoModelForCausalLM.from_pretrained`)",
    loading_code="from transformers import AutoModelForCausalLM, AutoTokenizer\n"
                 "model = AutoModelForCausalLM.from_pretrained(path)\ntok = AutoTokenizer.from_pretrained(path)",
    check=check, write=write, load=load, bits_per_weight=lambda folder: None, uses_dtype=True)
