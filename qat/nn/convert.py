"""Model surgery: build a causal LM from an ``ArchConfig`` and swap its linear layers for the quantized layers of
the scheme ``QuantConfig.weight`` names."""

from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from qat.errors import RecipeError
from qat.nn.bitlinear import BitLinear
from qat.nn.config import PRETRAINED_SMOLLM2, ArchConfig, QuantConfig, name_matches
from qat.nn.quantized import QuantizedLinear
from qat.nn.schemes import get_scheme

# Decoder-layer norms that the unilm FAQ removes because every BitLinear carries its own RMSNorm.
PRE_BLOCK_NORMS = ("input_layernorm", "post_attention_layernorm")
_ARCH_KEYS_NOT_IN_HF = ("family", "pretrained")


def pretrained_folder(source: str) -> Path:
    """The HF model folder of ``model.arch.pretrained``: ``smollm2`` and ``.gguf`` files are converted once into
    fp32 safetensors in the cache (the conversion distillation teachers use)."""
    from qat.data.tokenizer import smollm2_gguf_path
    from qat.teachers.load import hf_folder_from_gguf

    if source == PRETRAINED_SMOLLM2:
        return hf_folder_from_gguf(smollm2_gguf_path())
    if Path(source).suffix == ".gguf":
        return hf_folder_from_gguf(Path(source))
    if not Path(source, "config.json").is_file():
        raise RecipeError(f"model.arch.pretrained={source!r} has no config.json; point it at a local HF model "
                          "folder, a .gguf file or smollm2 (qat never downloads from a hub)")
    return Path(source)


def check_pretrained_tokenizer(source: str, tokenizer_dir: str | Path) -> None:
    """A pretrained model only makes sense of the token ids of its own tokenizer.

    Raises:
        RecipeError: the data's tokenizer has another vocabulary than the model's.
    """
    from qat.data.tokenizer import load_tokenizer

    model_vocab = load_tokenizer(pretrained_folder(source)).get_vocab()
    data_vocab = load_tokenizer(tokenizer_dir).get_vocab()
    if model_vocab != data_vocab:
        fix = "data.tokenizer: smollm2" if source == PRETRAINED_SMOLLM2 else f"data.tokenizer: {source}"
        raise RecipeError(f"model.arch.pretrained={source!r} was trained with its own tokenizer "
                          f"({len(model_vocab)} tokens) but the data is tokenized with {tokenizer_dir} "
                          f"({len(data_vocab)} tokens); set {fix}")


def hf_config(arch: ArchConfig, token_ids: dict | None = None):
    """The transformers config of ``arch`` (loaded from ``arch.pretrained`` when set); ``token_ids`` (bos/eos/pad)
    come from the tokenizer — the families' defaults (e.g. Llama-3's 128000) would not fit a small vocabulary."""
    if arch.pretrained:
        return AutoConfig.from_pretrained(pretrained_folder(arch.pretrained))
    if arch.vocab_size <= 0:
        raise RecipeError("model.arch.vocab_size is unset; it is filled from the tokenizer by `qat fit`, or set it")
    kwargs = {k: v for k, v in asdict(arch).items() if k not in _ARCH_KEYS_NOT_IN_HF and v is not None}
    kwargs["head_dim"] = arch.hidden_size // arch.num_attention_heads
    kwargs.update({"bos_token_id": None, "eos_token_id": None, "pad_token_id": None, **(token_ids or {})})
    return AutoConfig.for_model(arch.family, **kwargs)


def build_model(arch: ArchConfig, dtype: torch.dtype = torch.float32, token_ids: dict | None = None) -> PreTrainedModel:
    """A causal LM from ``arch``: weights from ``arch.pretrained`` or freshly initialised."""
    config = hf_config(arch, token_ids)
    if arch.pretrained:
        # from_pretrained returns eval mode; a model built here is trained, like a freshly initialised one.
        return AutoModelForCausalLM.from_pretrained(pretrained_folder(arch.pretrained), config=config,
                                                    dtype=dtype).train()
    return AutoModelForCausalLM.from_config(config, dtype=dtype)


def keeps_full_precision(name: str, patterns: list[str]) -> bool:
    return name_matches(name, patterns)


def quantized_linear(linear: nn.Linear, quant: QuantConfig, norm_eps: float) -> QuantizedLinear:
    """The quantized twin of ``linear``: the layer class of the scheme ``quant.weight`` names."""
    return get_scheme(quant.weight).layer_class.from_linear(linear, quant, norm_eps=norm_eps)


def linears_to_quantize(model: nn.Module, quant: QuantConfig) -> dict[str, nn.Linear]:
    """The ``nn.Linear`` layers of ``model`` that ``convert_to_qat`` replaces, by module name.

    Raises:
        RecipeError: none left to quantize, or ``group_size`` does not divide a layer's in_features.
    """
    linears = {name: m for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and not isinstance(m, QuantizedLinear)
               and not keeps_full_precision(name, quant.keep_full_precision)}
    if not linears:
        raise RecipeError("convert_to_qat found no nn.Linear to quantize; check model.quant.keep_full_precision")
    for name, linear in linears.items():
        layer_quant = quant.for_layer(name)
        if layer_quant.granularity == "group" and linear.in_features % layer_quant.group_size:
            raise RecipeError(f"model.quant.group_size={layer_quant.group_size} does not divide "
                              f"in_features={linear.in_features} of {name}; choose a group size that divides "
                              "every quantized layer's input width, or another granularity")
    return linears


def convert_to_qat(model: nn.Module, quant: QuantConfig) -> nn.Module:
    """Replace every ``nn.Linear`` not kept in full precision by a quantized layer holding the same weights (the
    layer class of the scheme ``quant.weight`` names: ``BitLinear``, ``FBILinear``, ``OneBitLinear``, ...).

    With ``quant.norm_placement == "inlayer"`` the pre-attention and pre-MLP norms become identities (the
    quantized layers normalise their own inputs). Returns ``model`` (changed in place; unchanged on error: every
    layer is checked before the first is replaced).

    Raises:
        RecipeError: unknown scheme, no linear layer left to quantize, or a group size that does not divide a
            layer's in_features.
    """
    eps = float(getattr(getattr(model, "config", None), "rms_norm_eps", 1e-5))
    for name, module in linears_to_quantize(model, quant).items():
        model.set_submodule(name, quantized_linear(module, quant.for_layer(name), eps))
    model.qat_quant_config = quant  # the whole setting (layer groups included) that exports record
    if quant.norm_placement == "inlayer":
        for name, module in list(model.named_modules()):
            if name.rsplit(".", 1)[-1] in PRE_BLOCK_NORMS:
                model.set_submodule(name, nn.Identity())
    return model


def quantize(model: nn.Module, config: QuantConfig | None = None) -> nn.Module:
    """Quantize ``model`` in place for QAT: every linear layer not kept in full precision becomes the trainable layer
    of the scheme ``config.weight`` names (default: BitNet b1.58 ternary). Returns ``model``.

    Example usage::

        model = AutoModelForCausalLM.from_pretrained("path/to/local/model")
        quantize(model, QuantConfig(weight="absmean_ternary"))
        loss = model(input_ids=ids, labels=ids).loss; loss.backward()   # STE gradients reach the latent weights

    Raises:
        RecipeError: an unknown scheme, a setting the scheme does not support, or nothing to quantize.
    """
    return convert_to_qat(model, config if config is not None else QuantConfig())

def bitlinear_layers(model: nn.Module) -> dict[str, BitLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, BitLinear)}
