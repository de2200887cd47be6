import json

import pytest
import torch
from safetensors import safe_open

from qat.checkpoint.trained import TrainedModel
from qat.errors import ExportError
from qat.export import export_model
from qat.export.binary import load_binary_export
from qat.nn.config import ArchConfig, QuantConfig
from qat.nn.convert import build_model, convert_to_qat


def _tokenizer_files(tmp_path) -> dict[str, str]:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["some text for a tiny tokenizer"] * 5, vocab_size=280, special_tokens=["<|e|>"])
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|e|>").save_pretrained(tmp_path / "tok")
    return {p.name: p.read_text() for p in (tmp_path / "tok").iterdir()}


def _trained(weight: str, tied: bool, tmp_path) -> TrainedModel:
    torch.manual_seed(0)
    arch = ArchConfig(family="llama", vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied)
    quant = QuantConfig(weight=weight, activation="none")
    model = convert_to_qat(build_model(arch), quant)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):  # move latent weights and scales away from their init
        ids = torch.randint(0, 97, (2, 9))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    return TrainedModel(model=model.eval(), arch=arch, quant=quant, tokenizer_files=_tokenizer_files(tmp_path),
                        global_step=3)


@pytest.mark.parametrize("weight,tied", [("fbi_binary", True), ("onebit", False)])
def test_packed_1bit_export_reloads_with_bit_identical_logits(tmp_path, weight, tied):
    trained = _trained(weight, tied, tmp_path)
    out = export_model(trained.model, trained.tokenizer_files, tmp_path / "export", "binary")
    reloaded = load_binary_export(out)
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, trained.model(input_ids=ids).logits)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qat-binary"
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    packed = {k: t for k, t in tensors.items() if k.endswith(".weight_sign_1bit")}
    assert not any(k.endswith("proj.weight") for k in tensors)   # no full-precision copy of a binary weight
    # Bits per binary weight recomputed from the file: packed sign bytes + the layer's fp32 scale vectors.
    stored_bits, n_weights = 0, 0
    for key, signs in packed.items():
        prefix = key[: -len(".weight_sign_1bit")]
        layer = trained.model.get_submodule(prefix)
        scales = [t for k, t in tensors.items() if k.startswith(prefix + ".") and k != key]
        stored_bits += signs.numel() * 8 + sum(t.numel() * t.element_size() * 8 for t in scales)
        n_weights += layer.out_features * layer.in_features
    assert len(packed) == 14 and all(t.dtype == torch.uint8 for t in packed.values())
    assert packed["model.layers.0.mlp.down_proj.weight_sign_1bit"].shape == (32, 6)   # 48 inputs -> 6 bytes
    assert config["bits_per_linear_weight"] == pytest.approx(stored_bits / n_weights, rel=1e-9)
    assert config["bits_per_linear_weight"] < 1 + 64 / 32 + 1e-9   # 1 bit + two fp32 vectors over >= 32 rows
    assert "qat only" in (out / "README.md").read_text()
    assert (out / "tokenizer.json").is_file()


def test_hf_transformers_refuses_the_binary_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    trained = _trained("fbi_binary", True, tmp_path)
    out = export_model(trained.model, trained.tokenizer_files, tmp_path / "export")   # default: binary
    # transformers' message for an unregistered model_type: the folder is refused before any weight is read.
    with pytest.raises(ValueError, match="model type `qat-binary` but Transformers does not recognize"):
        AutoModelForCausalLM.from_pretrained(str(out))


def test_non_binary_checkpoint_is_refused_with_the_right_format(tmp_path):
    fp_model = build_model(ArchConfig(family="llama", vocab_size=97, hidden_size=32, intermediate_size=48,
                                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(ExportError, match="hf-fp"):
        export_model(fp_model, _tokenizer_files(tmp_path), tmp_path / "x", "binary")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ExportError, match="not a qat binary export"):
        load_binary_export(tmp_path)


@pytest.mark.slow
def test_bitnet_binary_exports_to_hf_and_runs_on_the_1bit_kernels(tmp_path):
    """absmean_binary (W1A8 BitNet): the HF BitNet export (2-bit container) reloads in transformers with the QAT
    model's logits, and pack_model repacks every layer at 1 bit with the same logits and greedy tokens."""
    from transformers import AutoModelForCausalLM

    from qat.nn.packed_linear import PackedLinear, pack_model

    torch.manual_seed(0)
    arch = ArchConfig(family="bitnet", vocab_size=280, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4)
    quant = QuantConfig(weight="absmean_binary")
    model = convert_to_qat(build_model(arch), quant).eval()
    trained = TrainedModel(model=model, arch=arch, quant=quant, tokenizer_files=_tokenizer_files(tmp_path))
    out = export_model(model, trained.tokenizer_files, tmp_path / "hf", dtype="float32")   # default: hf
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    packed = pack_model(reloaded)
    layers = [m for m in packed.modules() if isinstance(m, PackedLinear)]
    assert len(layers) == 14 and all(m.bits == 1 for m in layers)
    ids = torch.randint(0, 280, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        torch.testing.assert_close(reloaded(input_ids=ids).logits, ref, rtol=1e-4, atol=2e-3)
        torch.testing.assert_close(packed(input_ids=ids).logits, ref, rtol=1e-4, atol=2e-3)
        kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert torch.equal(packed.generate(ids, **kwargs), model.generate(ids, **kwargs))
