"""``qat-packed`` export of ParetoQ models: export -> reload through qat's loader gives identical logits and codes,
the file holds b-bit codes + fp32 alpha (bits/weight recomputed from the file), and other models are refused."""

import json

import pytest
import torch
from safetensors import safe_open

from qat.errors import ExportError
from qat.export import export_model
from qat.export.qat_packed import load_packed_export
from qat.nn.config import ArchConfig, QuantConfig
from qat.nn.convert import build_model, convert_to_qat
from qat.nn.quantized import quantized_layers

from .test_binary_export import _tokenizer_files

BITS = {"paretoq_1bit": 1, "paretoq_ternary": 2, "paretoq_2bit": 2, "paretoq_3bit": 3, "paretoq_4bit": 4}


def _trained(weight: str, granularity: str, tied: bool):
    torch.manual_seed(0)
    arch = ArchConfig(family="llama", vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied)
    model = convert_to_qat(build_model(arch), QuantConfig(weight=weight, granularity=granularity, group_size=16,
                                                          activation="none"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):  # move latent weights and alphas away from their init
        ids = torch.randint(0, 97, (2, 9))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.mark.parametrize("weight", list(BITS))
@pytest.mark.parametrize("granularity,tied", [("row", True), ("group", False)])
def test_export_reloads_with_identical_logits_and_codes(tmp_path, weight, granularity, tied):
    model = _trained(weight, granularity, tied)
    out = export_model(model, _tokenizer_files(tmp_path), tmp_path / "export", "qat-packed")
    reloaded = load_packed_export(out)
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    for name, layer in quantized_layers(model).items():
        codes, scale = layer.quantized_weight()
        codes2, scale2 = reloaded.get_submodule(name).quantized_weight()
        assert torch.equal(codes, codes2) and torch.equal(scale, scale2)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    bits = BITS[weight]
    packed = {k: t for k, t in tensors.items() if k.endswith(f".codes_{bits}bit")}
    assert len(packed) == 14 and not any(k.endswith("proj.weight") for k in tensors)
    stored, n_weights = 0, 0
    for key, codes in packed.items():
        owner = key.rsplit(".", 1)[0]
        layer = model.get_submodule(owner)
        alpha = tensors[owner + ".alpha"]
        assert alpha.dtype == torch.float32 and alpha.numel() == layer.alpha.numel()
        assert codes.shape == (layer.out_features, (layer.in_features * bits + 7) // 8)
        stored += codes.numel() * 8 + alpha.numel() * 32
        n_weights += layer.weight.numel()
    manifest = json.loads((out / "qat_export.json").read_text())
    assert manifest["bits_per_weight"] == pytest.approx(stored / n_weights)
    assert bits <= manifest["bits_per_weight"] < bits + (32 / 16 if granularity == "group" else 32 / 32) + 0.01
    card = (out / "README.md").read_text()
    assert "qat only" in card and "bits/weight" in card


def test_transformers_refuses_the_folder(tmp_path):
    from transformers import AutoConfig

    out = export_model(_trained("paretoq_4bit", "row", True), _tokenizer_files(tmp_path), tmp_path / "e",
                       "qat-packed")
    with pytest.raises(Exception):
        AutoConfig.from_pretrained(str(out))


def test_non_paretoq_models_are_refused_by_name(tmp_path):
    model = convert_to_qat(build_model(ArchConfig(family="llama", vocab_size=97, hidden_size=32,
                                                  intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                                  num_key_value_heads=2)), QuantConfig())
    with pytest.raises(ExportError, match="qat-packed holds ParetoQ models.*'absmean_ternary'.*--format hf"):
        export_model(model, _tokenizer_files(tmp_path), tmp_path / "e", "qat-packed")
    assert not (tmp_path / "e").exists()


def test_a_damaged_code_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    out = export_model(_trained("paretoq_ternary", "row", True), _tokenizer_files(tmp_path), tmp_path / "e",
                       "qat-packed")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in tensors if k.endswith(".codes_2bit"))
    tensors[key] = torch.full_like(tensors[key], 0xFF)  # index 3 does not exist among 3 ternary levels
    save_file(tensors, str(out / "model.safetensors"))
    with pytest.raises(ExportError, match="corrupt"):
        load_packed_export(out)


def test_an_alpha_trained_below_the_clamp_exports_as_the_forward_uses_it(tmp_path):
    model = _trained("paretoq_4bit", "row", False)
    layer = model.model.layers[0].mlp.up_proj
    with torch.no_grad():
        layer.alpha[:3] = -0.5   # the quantizer clamps alpha at 1e-5
    out = export_model(model, _tokenizer_files(tmp_path), tmp_path / "e", "qat-packed")
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(load_packed_export(out)(input_ids=ids).logits, model(input_ids=ids).logits)


def _trained_for_hf(weight: str, family: str):
    torch.manual_seed(0)
    arch = ArchConfig(family=family, vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2)
    model = convert_to_qat(build_model(arch), QuantConfig(weight=weight, granularity="tensor",
                                                          activation="int8_per_token"))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        ids = torch.randint(0, 97, (2, 9))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


@pytest.mark.parametrize("weight", ["paretoq_ternary", "paretoq_1bit"])
@pytest.mark.parametrize("family", ["llama", "bitnet"])
def test_per_tensor_int8_paretoq_exports_to_hf_bitnet_and_transformers_agrees(tmp_path, weight, family):
    """ParetoQ ternary/1-bit codes with one scale per tensor and int8 activations are what HF's BitLinear computes:
    transformers loads the export (BitNetForCausalLM, or LlamaForCausalLM with bitnet quantization) and gives
    the trained model's logits."""
    from transformers import AutoModelForCausalLM

    model = _trained_for_hf(weight, family)
    out = export_model(model, _tokenizer_files(tmp_path), tmp_path / "export", "hf")
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, device_map="cpu").eval()
    assert type(reloaded).__name__ == type(model).__name__
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(input_ids=ids).logits, reloaded(input_ids=ids).logits
    # as `qat eval` requires of an fp32 export (qat/eval/agreement.py): an int8 activation code may round the
    # other way in HF's order of fp32 operations
    assert (ours - theirs).abs().max() <= 5e-3 * ours.abs().max()
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


@pytest.mark.parametrize("settings,message", [
    (dict(granularity="row", activation="int8_per_token"), "one scale per tensor"),
    (dict(granularity="tensor", activation="none"), "int8 per token"),
])
def test_hf_export_of_paretoq_names_what_to_change(tmp_path, settings, message):
    torch.manual_seed(0)
    arch = ArchConfig(family="llama", vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    model = convert_to_qat(build_model(arch), QuantConfig(weight="paretoq_ternary", **settings))
    with pytest.raises(ExportError, match=message):
        export_model(model, _tokenizer_files(tmp_path), tmp_path / "export", "hf")
    with pytest.raises(ExportError, match="not held exactly by HF BitNet"):
        export_model(convert_to_qat(build_model(arch), QuantConfig(weight="paretoq_2bit", activation="int8_per_token",
                                                                   granularity="tensor")),
                     _tokenizer_files(tmp_path), tmp_path / "export2", "hf")


def test_layer_groups_export_to_qat_packed_and_reload_with_identical_logits(tmp_path):
    """Attention at 4 bits, the MLP at 2 bits (ParetoQ SEQ): each layer's codes at its own width; reloaded
    identically; formats that store one setting for every layer refuse the model, naming the ones that do not."""
    torch.manual_seed(0)
    arch = ArchConfig(family="llama", vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2)
    quant = QuantConfig(weight="paretoq_4bit", granularity="row", activation="none",
                        layer_groups=[{"match": ["*.mlp.*"], "weight": "paretoq_2bit"}])
    model = convert_to_qat(build_model(arch), quant).eval()
    out = export_model(model, _tokenizer_files(tmp_path), tmp_path / "export", "qat-packed")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "model.layers.0.mlp.up_proj.codes_2bit" in keys and "model.layers.0.self_attn.q_proj.codes_4bit" in keys
    manifest = json.loads((out / "qat_export.json").read_text())
    assert manifest["quant"]["layer_groups"] == quant.layer_groups
    assert 2 < manifest["bits_per_weight"] < 4
    reloaded = load_packed_export(out)
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert reloaded.get_submodule("model.layers.1.mlp.down_proj").quant.weight == "paretoq_2bit"
    with pytest.raises(ExportError, match="model.quant.layer_groups.*--format gguf-q4_0 or --format qat-packed"):
        export_model(model, _tokenizer_files(tmp_path), tmp_path / "hf", "hf")
