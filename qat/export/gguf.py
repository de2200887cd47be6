"""GGUF export of a BitNet-architecture model with TQ2_0 / TQ1_0 ternary weights (llama.cpp ``bitnet`` graph).

Written with the ``gguf`` package's ``GGUFWriter``; tensor names come from ``gguf.get_tensor_name_map`` for
``MODEL_ARCH.BITNET`` (plus the HF names it lacks: the SubLN norms and ``lm_head``). Quantized linear layers
(``BitLinear`` or ``PackedLinear``) are written as TQ blocks that hold exactly their codes and fp16 scales;
everything else (embeddings, norms, lm_head) as F32. The file is written to a temporary name and renamed.
"""

import json
import os
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from qat.errors import ExportError
from qat.paths import atomic_write_bytes
from qat.nn.bitlinear import BitLinear
from qat.nn.packed_linear import PackedLinear
from qat.pack.gguf_ternary import TQ_TYPES, block_scales, pack_tq

FILE_TYPES = {"tq2_0": gguf.LlamaFileType.MOSTLY_TQ2_0, "tq1_0": gguf.LlamaFileType.MOSTLY_TQ1_0}
# HF BitNetForCausalLM names that gguf's TensorNameMap (written for the original 1bitLLM names) does not know.
EXTRA_NAMES = {"self_attn.attn_sub_norm": gguf.MODEL_TENSOR.ATTN_SUB_NORM,
               "mlp.ffn_sub_norm": gguf.MODEL_TENSOR.FFN_SUB_NORM}


def ternary_layers(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """``{module name: (codes (out, in), scale (out, groups) or (1, 1), group_size)}`` of the quantized layers."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, BitLinear):
            with torch.no_grad():
                codes, scale = module.quantized_weight()
            group = module.quant.group_size if module.quant.granularity == "group" else module.in_features
            layers[name] = (codes.round().to(torch.int8), scale.reshape(scale.shape[0], -1), group)
        elif isinstance(module, PackedLinear):
            layers[name] = (module.codes(), module.scale, module.group_size)
    return layers


def gguf_tensor_name(hf_name: str, n_layers: int, name_map: gguf.TensorNameMap) -> str:
    found = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if found is not None:
        return found
    parts = hf_name.split(".")
    if hf_name == "lm_head.weight":
        return gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT] + ".weight"
    if len(parts) == 6 and parts[:2] == ["model", "layers"] and ".".join(parts[3:5]) in EXTRA_NAMES:
        return gguf.TENSOR_NAMES[EXTRA_NAMES[".".join(parts[3:5])]].format(bid=int(parts[2])) + "." + parts[5]
    raise ExportError(f"no GGUF name for tensor {hf_name!r}; the llama.cpp BitNet graph cannot load it")


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer, vocab_size: int) -> None:
    """Byte-level BPE vocabulary as llama.cpp's ``gpt2`` tokenizer model (tokens, types, merges, special ids)."""
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_ids)
    types = [gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL for i in range(len(tokens))]
    for i in range(len(tokens), vocab_size):                 # embedding rows past the tokenizer (padding)
        tokens.append(f"[PAD{i}]")
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    model_json = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    merges = getattr(model_json, "get_merges", None)
    if merges is None:
        import json
        merges_list = json.loads(tokenizer.backend_tokenizer.to_str())["model"].get("merges", [])
    else:
        merges_list = merges()
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges_list])
    for setter, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                             (writer.add_eos_token_id, tokenizer.eos_token_id)):
        if token_id is not None:
            setter(token_id)


def export_gguf(model: nn.Module, tokenizer, out_file: str | Path, qtype: str = "tq2_0") -> Path:
    """Write ``model`` (HF ``BitNetForCausalLM`` with BitLinear or PackedLinear layers) as a GGUF file.

    Example usage::

        export_gguf(qat_model, tokenizer, "model-tq2_0.gguf", "tq2_0")

    Raises:
        ExportError: unknown ``qtype``, a model that is not ``bitnet``, no quantized layers, or layers whose
            rows/groups do not fit 256-weight TQ blocks.
    """
    if qtype not in TQ_TYPES:
        raise ExportError(f"unknown GGUF type {qtype!r}; use one of {sorted(TQ_TYPES)}")
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) != "bitnet":
        raise ExportError(f"GGUF export writes llama.cpp's BitNet graph; this model is "
                          f"{getattr(config, 'model_type', type(model).__name__)!r}. Train with model.arch.family: bitnet")
    layers = ternary_layers(model)
    if not layers:
        raise ExportError("the model has no BitLinear/PackedLinear layers; export the QAT model, not the base model")
    for name, module in model.named_modules():
        if name in layers and getattr(module, "rms_norm", None) is not None:
            raise ExportError(f"{name} normalises its own input (norm_placement: inlayer), which llama.cpp's BitNet "
                              "graph has no tensor for; GGUF export needs norm_placement: subln")
        if name in layers and getattr(module, "bias", None) is not None:
            raise ExportError(f"{name} has a bias, which llama.cpp's BitNet graph has no tensor for")
    out_file = Path(out_file)
    tmp = out_file.with_name(f".{out_file.name}.tmp-{os.getpid()}")
    n_layers = config.num_hidden_layers
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BITNET, n_layers)
    # Check every layer before writing anything.
    tensors = []
    for name, tensor in model.state_dict().items():
        module_name = name.rsplit(".", 1)[0]
        if module_name in layers:
            if not name.endswith((".weight", ".packed")):
                continue                                   # scale/bias buffers travel inside the TQ blocks
            codes, scale, group = layers[module_name]
            per_block = block_scales(scale, *codes.shape, group)
            tensors.append((gguf_tensor_name(module_name + ".weight", n_layers, name_map), codes, per_block))
        else:
            tensors.append((gguf_tensor_name(name, n_layers, name_map), tensor, None))
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.BITNET])
    try:
        writer.add_name(getattr(config, "name_or_path", "") or "qat-bitnet")
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(n_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
        writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or 10000.0))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type(FILE_TYPES[qtype])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tokenizer(writer, tokenizer, config.vocab_size)
        for gguf_name, tensor, per_block in tensors:
            if per_block is None:
                writer.add_tensor(gguf_name, tensor.detach().float().numpy())
            else:
                raw = pack_tq(tensor, per_block, TQ_TYPES[qtype])
                writer.add_tensor(gguf_name, raw, raw_dtype=TQ_TYPES[qtype])   # byte shape -> (out, in)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out_file)
    finally:
        tmp.unlink(missing_ok=True)
    return out_file


def export_gguf_from_trained(trained, out_dir: str | Path, qtype: str, manifest: dict | None = None) -> Path:
    """``qat export --format gguf-<qtype>``: ``out_dir/model-<qtype>.gguf`` (+ the export manifest) from a
    :class:`qat.checkpoint.trained.TrainedModel`; returns ``out_dir``.

    Raises:
        ExportError: a full-precision checkpoint, no tokenizer, or a model the TQ formats cannot hold.
    """
    from transformers import AutoTokenizer

    from qat.export.hf_bitnet import EXPORT_MANIFEST, write_tokenizer

    if trained.quant is None:
        raise ExportError("GGUF TQ1_0/TQ2_0 hold ternary weights; this checkpoint was trained in full precision")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tokenizer_dir:
        write_tokenizer(trained.tokenizer_files, Path(tokenizer_dir))
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    export_gguf(trained.model, tokenizer, out_dir / f"model-{qtype}.gguf", qtype)
    if manifest is not None:
        atomic_write_bytes(out_dir / EXPORT_MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
    return out_dir
