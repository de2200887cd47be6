"""GGUF export of a BitNet-architecture model with TQ2_0 / TQ1_0 ternary weights (llama.cpp ``bitnet`` graph).

Written with the ``gguf`` package's ``GGUFWriter``; tensor names come from ``gguf.get_tensor_name_map`` for
``MODEL_ARCH.BITNET`` (plus the HF names it lacks: the SubLN norms). Quantized linear layers
(qat's quantized layers or ``PackedLinear``) are written as TQ blocks that hold exactly their codes and fp16
scales; everything else (embeddings, norms) as F32. The file is written to a temporary name and renamed.

llama.cpp's ``bitnet`` graph (``src/models/bitnet.cpp``) computes one fixed function: attn_norm -> q/k/v -> RoPE
attention -> attn_sub_norm -> o_proj; ffn_norm -> ``silu(gate) * up`` -> ffn_sub_norm -> down; output norm; logits
from ``token_embd`` (it loads no ``output.weight``). :func:`llamacpp_incompatibilities` lists what a model does
differently; such a model is refused rather than written as a file that loads to another function.

The export folder (formats ``gguf-tq2_0`` / ``gguf-tq1_0``) holds ``model-<qtype>.gguf``, the tokenizer files and
``gguf_model.json`` (the HF config and quantization); :func:`load_gguf_export` rebuilds the model from the GGUF
tensors with gguf's reader (on qat's packed layers), which is what ``qat eval`` runs.
"""

import json
import os
from dataclasses import asdict
from pathlib import Path

import gguf
import numpy as np
import torch
from torch import nn

from qat.errors import ExportError
from qat.export.exporter import ExportFormat, model_quant, model_scheme
from qat.export.folder import check_finite
from qat.nn.packed_linear import PackedLinear
from qat.nn.quantized import QuantizedLinear
from qat.pack.gguf_ternary import TQ_TYPES, block_scales, pack_tq, unpack_tq

FILE_TYPES = {"tq2_0": gguf.LlamaFileType.MOSTLY_TQ2_0, "tq1_0": gguf.LlamaFileType.MOSTLY_TQ1_0}
# HF BitNetForCausalLM names that gguf's TensorNameMap (written for the original 1bitLLM names) does not know.
EXTRA_NAMES = {"self_attn.attn_sub_norm": gguf.MODEL_TENSOR.ATTN_SUB_NORM,
               "mlp.ffn_sub_norm": gguf.MODEL_TENSOR.FFN_SUB_NORM}



def finish_gguf_file(writer: gguf.GGUFWriter, tmp: Path, out_file: Path) -> None:
    """Write the header, metadata and tensors of ``writer`` (open on ``tmp``), fsync, and rename to ``out_file``:
    readers never see half a GGUF."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out_file)

def ternary_layers(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor, int]]:
    """``{module name: (codes (out, in), scale (out, groups) or (1, 1), group_size)}`` of the quantized layers."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantizedLinear):
            with torch.no_grad():
                codes, scale = module.quantized_weight()
            group = module.quant.group_size if module.quant.granularity == "group" else module.in_features
            layers[name] = (codes.round().to(torch.int8), scale.reshape(scale.shape[0], -1), group)
        elif isinstance(module, PackedLinear):
            layers[name] = (module.codes(), module.scale, module.group_size)
    return layers


# The recipe settings that give a model llama.cpp's bitnet graph computes (recipes/bitnet-b158-tiny-llamacpp.yaml).
LLAMACPP_RECIPE = ("model.arch.tie_word_embeddings: true, model.arch.hidden_act: silu, model.quant.norm_placement: "
                   "subln (recipes/bitnet-b158-tiny-llamacpp.yaml)")


def llamacpp_incompatibilities(model: nn.Module) -> list[str]:
    """What ``model`` computes that llama.cpp's ``bitnet`` graph does not (empty: the graph computes it)."""
    config = getattr(model, "config", None)
    reasons = []
    if not getattr(config, "tie_word_embeddings", False):
        reasons.append("its lm_head is untied (model.arch.tie_word_embeddings: false) but llama.cpp's bitnet graph "
                       "computes the logits with token_embd")
    else:
        out, emb = model.get_output_embeddings(), model.get_input_embeddings()
        if out is not None and emb is not None and not torch.equal(out.weight, emb.weight):
            reasons.append("its lm_head differs from embed_tokens although model.arch.tie_word_embeddings is true "
                           "(the checkpoint is damaged)")
    act = getattr(config, "hidden_act", None)
    if act != "silu":
        reasons.append(f"its FFN computes {act}(gate)*up (model.arch.hidden_act: {act}) but llama.cpp's bitnet "
                       "graph hard-codes silu(gate)*up")
    if any(getattr(m, "rms_norm", None) is not None for m in model.modules()):
        reasons.append("its quantized layers normalise their own input (model.quant.norm_placement: inlayer), "
                       "which llama.cpp's bitnet graph has no tensor for")
    biased = sorted(n for n, m in model.named_modules()
                    if isinstance(m, (nn.Linear, QuantizedLinear, PackedLinear))
                    and getattr(m, "bias", None) is not None)
    if biased:
        reasons.append(f"{biased[0]} has a bias, which llama.cpp's bitnet graph has no tensor for")
    return reasons


def check_llamacpp_graph(model: nn.Module) -> None:
    """ExportError when llama.cpp's ``bitnet`` graph would compute another function than ``model``."""
    reasons = llamacpp_incompatibilities(model)
    if reasons:
        raise ExportError("llama.cpp cannot compute this model: " + "; ".join(reasons) + ". Train a "
                          f"llama.cpp-compatible model with {LLAMACPP_RECIPE}, or export with --format hf")


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
                          f"{getattr(config, 'model_type', type(model).__name__)!r}. Train with "
                          "model.arch.family: bitnet")
    layers = ternary_layers(model)
    if not layers:
        raise ExportError("the model has no quantized/PackedLinear layers; export the QAT model, not the base model")
    check_llamacpp_graph(model)
    out_file = Path(out_file)
    tmp = out_file.with_name(f".{out_file.name}.tmp-{os.getpid()}")
    n_layers = config.num_hidden_layers
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BITNET, n_layers)
    # Check every layer before writing anything.
    check_finite(model.state_dict())
    tensors = []
    for name, tensor in model.state_dict().items():
        module_name = name.rsplit(".", 1)[0]
        if name == "lm_head.weight":
            continue                                       # tied: llama.cpp computes the logits with token_embd
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
        finish_gguf_file(writer, tmp, out_file)
    finally:
        tmp.unlink(missing_ok=True)
    return out_file


GGUF_CONFIG = "gguf_model.json"


def gguf_file_name(qtype: str) -> str:
    return f"model-{qtype}.gguf"


def check(model: nn.Module) -> None:
    """ExportError naming why ``model`` is not held exactly by llama.cpp's BitNet graph with TQ weights."""
    scheme = model_scheme(model)
    if scheme is None:
        raise ExportError("GGUF TQ1_0/TQ2_0 hold ternary weights; this model is full precision. Use --format hf-fp")
    if not any(f.startswith("gguf-") for f in scheme.export_formats):
        raise ExportError(f"weight scheme {scheme.name!r} ({scheme.description}) is not held exactly by GGUF TQ "
                          f"blocks (ternary codes, one fp16 scale per 256 weights). Use --format "
                          f"{scheme.default_export}")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type != "bitnet":
        raise ExportError(f"GGUF export writes llama.cpp's BitNet graph; this model is {model_type!r}. Train with "
                          "model.arch.family: bitnet, or use --format " + scheme.default_export)
    check_llamacpp_graph(model)


def _writer(qtype: str):
    def write(model: nn.Module, folder: Path, dtype: str) -> None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(folder))       # the shared I/O wrote the tokenizer files
        export_gguf(model, tokenizer, folder / gguf_file_name(qtype), qtype)
        quant = model_quant(model)
        meta = {"qtype": qtype, "hf_config": model.config.to_dict(), "quant": asdict(quant),
                "quantized_layers": sorted(ternary_layers(model))}
        (folder / GGUF_CONFIG).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return write


def _gguf_files(folder: Path) -> tuple[dict, Path]:
    meta_file = folder / GGUF_CONFIG
    if not meta_file.is_file():
        raise ExportError(f"{folder} is not a qat GGUF export (no {GGUF_CONFIG}); write one with "
                          "`qat export CKPT --format gguf-tq2_0`")
    meta = json.loads(meta_file.read_text())
    return meta, folder / gguf_file_name(meta["qtype"])


def load_gguf_export(folder: str | Path) -> nn.Module:
    """Rebuild the model of a GGUF export from the GGUF file's tensors (gguf's reader): the ternary layers as qat
    ``PackedLinear`` over the TQ codes and their per-block fp16 scales, the F32 tensors as they are.

    Raises:
        ExportError: not a qat GGUF export, or a tensor missing from the file.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from qat.pack.kernel_layout import TERNARY_BITS, pack_ternary_2bit

    folder = Path(folder)
    meta, gguf_file = _gguf_files(folder)
    try:
        reader = gguf.GGUFReader(str(gguf_file))
    except Exception as e:  # gguf raises ValueError/struct errors on a damaged file
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ExportError(f"cannot read {gguf_file}: {first_line}") from None
    tensors = {t.name: t for t in reader.tensors}
    hf = dict(meta["hf_config"])
    hf.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(hf.pop("model_type"), **hf), dtype=torch.float32)
    n_layers = model.config.num_hidden_layers
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BITNET, n_layers)
    quantized = set(meta["quantized_layers"])
    activation = meta["quant"]["activation"]

    def tensor(name: str):
        if name not in tensors:
            raise ExportError(f"{gguf_file} has no tensor {name!r}; the file does not match {GGUF_CONFIG}")
        return tensors[name]

    for name in quantized:
        linear = model.get_submodule(name)
        t = tensor(gguf_tensor_name(name + ".weight", n_layers, name_map))
        codes, d = unpack_tq(np.asarray(t.data), t.tensor_type, (linear.out_features, linear.in_features))
        model.set_submodule(name, PackedLinear(linear.in_features, linear.out_features, TERNARY_BITS,
                                               pack_ternary_2bit(codes), d, 256, activation))
    state = {}
    for key, param in model.state_dict().items():
        if key.rsplit(".", 1)[0] in quantized or (key == "lm_head.weight" and model.config.tie_word_embeddings):
            continue
        data = torch.from_numpy(np.array(tensor(gguf_tensor_name(key, n_layers, name_map)).data, dtype=np.float32))
        state[key] = data.reshape(param.shape)
    model.load_state_dict(state, strict=False)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def file_bits_per_weight(folder: Path) -> float:
    """Stored bits per ternary weight of the GGUF file's TQ tensors (block bytes * 8 / weights)."""
    _, gguf_file = _gguf_files(Path(folder))
    bits = weights = 0
    for t in gguf.GGUFReader(str(gguf_file)).tensors:
        if t.tensor_type in TQ_TYPES.values():
            bits += int(t.n_bytes) * 8
            weights += int(t.n_elements)
    if not weights:
        raise ExportError(f"{gguf_file} holds no TQ tensors")
    return bits / weights


def fp16_scale_reference(model: nn.Module) -> nn.Module:
    """``model`` on qat's packed layers with each scale rounded to fp16, as the TQ blocks store it: the model a GGUF
    export holds exactly (fp16 rounding of the scales, 2^-11 relative, can move logits by percents through the
    int8 activation quantizers of a small random model)."""
    from qat.nn.packed_linear import pack_model

    packed = pack_model(model)
    with torch.no_grad():
        for module in packed.modules():
            if isinstance(module, PackedLinear):
                module.scale.copy_(module.scale.half().float())
    return packed


def _format(qtype: str) -> ExportFormat:
    return ExportFormat(
        name=f"gguf-{qtype}",
        description=f"llama.cpp GGUF, BitNet graph, {qtype.upper()} ternary blocks (256 weights, one fp16 scale)",
        runtime=f"[llama.cpp](https://github.com/ggml-org/llama.cpp) (`llama-cli -m {gguf_file_name(qtype)}`, "
                "`bitnet` architecture); qat "
                "(`qat.export.gguf.load_gguf_export`)",
        loading_code=f"from llama_cpp import Llama  # pip install llama-cpp-python\n"
                     f"llm = Llama(model_path=f\"{{path}}/{gguf_file_name(qtype)}\")\n"
                     "# or in qat, on its packed kernels:\n"
                     "from qat.export.gguf import load_gguf_export\nmodel = load_gguf_export(path)",
        check=check, write=_writer(qtype), load=load_gguf_export, bits_per_weight=file_bits_per_weight,
        reference=fp16_scale_reference)


TQ2_0, TQ1_0 = _format("tq2_0"), _format("tq1_0")
