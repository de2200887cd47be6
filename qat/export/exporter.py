"""What every export format declares (:class:`ExportFormat`), and what an exporter asks of a model: its
quantization scheme, read from its quantized layers (so any model converted by qat exports, not only a
``TrainedModel``)."""

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

from qat.errors import ExportError
from qat.nn.config import QuantConfig
from qat.nn.quantized import quantized_layers
from qat.nn.schemes import Scheme

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ExportFormat:
    """One export format (a module in ``qat/export/`` builds it; :mod:`qat.export.formats` lists them).

    Attributes:
        name: the ``--format`` value.
        description: one line for ``--help`` and the model card.
        runtime: which runtime loads the folder, for the model card.
        loading_code: a Python snippet (``path`` = the folder) for the model card.
        check: ``check(model)`` raises ExportError naming why ``model`` cannot be held exactly, and what to do.
        write: ``write(model, folder, dtype)`` writes the format's files into ``folder`` (which already holds the
            tokenizer files); the shared folder I/O does the rest.
        load: ``load(folder)`` rebuilds the model (eval mode, fp32 compute) in the runtime a user uses.
        bits_per_weight: stored bits per quantized linear weight, measured from the folder's files (None for
            full-precision formats).
        packed_kernels: the loaded model also runs on qat's packed kernels (``qat eval`` reports both).
        reference: ``reference(model)`` is the source model as the format stores it, where the format rounds
            something by design (GGUF's fp16 block scales); ``qat eval`` compares the export against it.
        uses_dtype: ``--dtype`` sets the precision of the unpacked tensors (else they are stored as the format
            fixes them, recorded as float32).
        holds_layer_groups: the format stores each layer's own quantization (``model.quant.layer_groups``).
    """

    name: str
    description: str
    runtime: str
    loading_code: str
    check: Callable[[nn.Module], None]
    write: Callable[[nn.Module, Path, str], None]
    load: Callable[[Path], nn.Module]
    bits_per_weight: Callable[[Path], Optional[float]]
    packed_kernels: bool = False
    uses_dtype: bool = False
    holds_layer_groups: bool = False
    reference: Callable[[nn.Module], nn.Module] = lambda model: model


def model_quant(model: nn.Module) -> Optional[QuantConfig]:
    """The QuantConfig ``model`` was quantized with (layer groups included); None for a full-precision model.

    Raises:
        ExportError: layers quantized in different ways by something other than ``convert_to_qat``.
    """
    layers = quantized_layers(model)
    recorded = getattr(model, "qat_quant_config", None)
    if recorded is not None and layers:
        return recorded
    quants = {repr(layer.quant): layer.quant for layer in layers.values()}
    if len(quants) > 1:
        raise ExportError(f"the model mixes quantization settings {sorted(quants)} without a model.quant that "
                          "describes the mix; quantize it with convert_to_qat (model.quant.layer_groups)")
    return next(iter(quants.values()), None)


def layer_schemes(model: nn.Module) -> list[Scheme]:
    """The distinct schemes of ``model``'s quantized layers (several with ``model.quant.layer_groups``)."""
    from qat.nn.schemes import get_scheme

    names = dict.fromkeys(layer.quant.weight for layer in quantized_layers(model).values())
    return [get_scheme(name) for name in names]


def check_one_setting(model: nn.Module, fmt: "ExportFormat") -> None:
    """Raises ExportError when ``fmt`` holds one quantization setting for every layer and ``model`` has several."""
    from qat.export.formats import EXPORT_FORMATS

    quant = model_quant(model)
    if quant is not None and quant.layer_groups and not fmt.holds_layer_groups:
        holding = " or ".join(f"--format {f.name}" for f in EXPORT_FORMATS.values() if f.holds_layer_groups)
        raise ExportError(f"--format {fmt.name} stores one quantization setting for every layer; this model sets "
                          f"some layers apart (model.quant.layer_groups). Use {holding}, or train without layer groups")



def model_scheme(model: nn.Module) -> Optional[Scheme]:
    """The quantization scheme of ``model`` (None for a full-precision model)."""
    quant = model_quant(model)
    if quant is None:
        return None
    from qat.nn.schemes import get_scheme

    return get_scheme(quant.weight)


def check_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def linear_bits_per_weight(state: dict[str, torch.Tensor], shapes: dict[str, list[int]]) -> float:
    """Stored bits per quantized weight of a qat safetensors format: every tensor of the quantized layers (packed
    codes, scales, biases) over their ``out * in`` weights."""
    bits = weights = 0
    for owner, (out_features, in_features) in shapes.items():
        bits += sum(t.numel() * t.element_size() * 8 for k, t in state.items() if k.startswith(owner + "."))
        weights += out_features * in_features
    return bits / weights


def read_qat_config(folder: Path, model_type: str, fmt: str) -> dict:
    """``config.json`` of a qat-only safetensors export (``model_type`` names the format, so transformers refuses it).

    Raises:
        ExportError: the folder is not an export of that format.
    """
    import json

    config_file = Path(folder) / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if config.get("model_type") != model_type:
        raise ExportError(f"{folder} is not a qat {fmt} export (config.json model_type != {model_type!r}); "
                          f"write one with `qat export CKPT --format {fmt}`")
    return config


def measured_bits_per_weight(folder: Path, weights_file: str, model_type: str, fmt: str) -> float:
    """Bits per quantized weight measured from the export's safetensors file."""
    from safetensors import safe_open

    config = read_qat_config(folder, model_type, fmt)
    with safe_open(str(Path(folder) / weights_file), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    return linear_bits_per_weight(state, config["linear_shapes"])


def write_qat_folder(model: nn.Module, folder: Path, state: dict[str, torch.Tensor], model_type: str,
                     **config_fields) -> None:
    """``model.safetensors`` (``state``) + ``config.json`` of a qat-only safetensors format: ``model_type`` (so
    transformers refuses the folder), the quantization, the base model's config, the quantized layers' shapes,
    their measured bits/weight, and the format's own ``config_fields``."""
    import json
    from dataclasses import asdict

    from safetensors.torch import save_file

    from qat.export.folder import WEIGHTS_FILE, check_finite

    check_finite(state)
    shapes = {n: [m.out_features, m.in_features] for n, m in quantized_layers(model).items()}
    config = {"model_type": model_type, "format_version": 1, "quant": asdict(model_quant(model)),
              "base_config": model.config.to_dict(), "linear_shapes": shapes,
              "bits_per_linear_weight": linear_bits_per_weight(state, shapes), **config_fields}
    save_file(state, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def rebuild_qat_model(folder: Path, model_type: str, fmt: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The model a qat-only safetensors export describes (its layers converted as trained, fp32) and the tensors of
    its ``model.safetensors``; the format turns its packed tensors into weights, then :func:`load_rebuilt_state`.

    Raises:
        ExportError: the folder is not an export of that format.
    """
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    from qat.export.folder import WEIGHTS_FILE
    from qat.nn.convert import convert_to_qat

    config = read_qat_config(folder, model_type, fmt)
    base = dict(config["base_config"])
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(base.pop("model_type"), **base),
                                             dtype=torch.float32)
    convert_to_qat(model, QuantConfig(**config["quant"]))
    with safe_open(str(Path(folder) / WEIGHTS_FILE), framework="pt") as f:
        state = {key: f.get_tensor(key) for key in f.keys()}
    return model, state


def load_rebuilt_state(folder: Path, model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """``model`` with ``state`` loaded (every key matched; a tied head re-tied), in eval mode.

    Raises:
        ExportError: the tensors do not match the model the config describes.
    """
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ExportError(f"{folder} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if model.config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()
