"""``qat generate`` on an HF BitNet folder: the packed model decodes the same tokens as the QAT model."""

import json

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import ByteLevelBPETokenizer
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from qat.cli.main import main
from qat.nn.bitlinear import BitLinear
from qat.nn.config import ArchConfig, QuantConfig
from qat.nn.convert import build_model, convert_to_qat
from qat.nn.packed_linear import PackedLinear, pack_model
from qat.pack.hf_bitnet import pack_ternary_hf

pytestmark = [pytest.mark.slow, pytest.mark.kernels]


def write_hf_bitnet_folder(qat_model, tokenizer, folder):
    """The HF packed BitNet format (notes §7, linear_class bitlinear: weight_scale = 1 / absmean)."""
    state = {}
    for name, tensor in qat_model.state_dict().items():
        module = qat_model.get_submodule(name.rsplit(".", 1)[0])
        if isinstance(module, BitLinear) and name.endswith(".weight"):
            codes, scale = module.quantized_weight()
            state[name] = pack_ternary_hf(codes)
            state[name.replace(".weight", ".weight_scale")] = (1.0 / scale.reshape(1)).contiguous()
        else:
            state[name] = tensor.contiguous()
    folder.mkdir()
    save_file(state, folder / "model.safetensors")
    config = qat_model.config.to_dict()
    config["quantization_config"] = {"quant_method": "bitnet", "linear_class": "bitlinear",
                                     "quantization_mode": "offline"}
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=280,
                            special_tokens=["<|endoftext|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")
    torch.manual_seed(0)
    arch = ArchConfig(family="bitnet", vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4)
    qat_model = convert_to_qat(build_model(arch), QuantConfig()).eval()
    folder = tmp_path_factory.mktemp("export") / "hf"
    write_hf_bitnet_folder(qat_model, tokenizer, folder)
    return qat_model, tokenizer, folder


def test_hf_bitnet_layers_repack_exactly(exported):
    qat_model, _, folder = exported
    hf_model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float32).eval()
    packed = pack_model(hf_model)
    assert sum(isinstance(m, PackedLinear) for m in packed.modules()) == 14
    ids = torch.randint(0, 280, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(packed(ids).logits, qat_model(ids).logits, rtol=1e-4, atol=1e-4)


def test_generate_cli_decodes_the_qat_models_tokens(exported, capsys):
    qat_model, tokenizer, folder = exported
    prompt = "the quick brown"
    assert main(["generate", str(folder), prompt, "--max_new_tokens", "8"]) == 0
    captured = capsys.readouterr()
    printed = captured.out.strip().splitlines()[-1]
    assert "(packed, qat decoder)" in captured.err
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        want = qat_model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert printed == tokenizer.decode(want[0, ids.shape[1]:], skip_special_tokens=True).strip()


def test_generate_cli_int8_head_decodes_with_the_q8_0_head(exported, capsys):
    """--int8_head: the tokens qat's packed decoder gives with the Q8_0 copy of the lm_head."""
    from qat.nn.decoder import PackedDecoder

    _, tokenizer, folder = exported
    prompt = "the quick brown"
    assert main(["generate", str(folder), prompt, "--max_new_tokens", "8", "--int8_head"]) == 0
    captured = capsys.readouterr()
    assert "(packed, qat decoder, int8 head)" in captured.err
    hf_model = AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float32).eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    want = PackedDecoder(pack_model(hf_model), int8_head=True).generate(ids, 8)
    assert captured.out.strip().splitlines()[-1] == tokenizer.decode(want[0, ids.shape[1]:],
                                                                       skip_special_tokens=True).strip()


def test_generate_cli_int8_head_without_the_packed_decoder_is_a_clear_error(exported, capsys):
    _, _, folder = exported
    assert main(["generate", str(folder), "the", "--packed", "false", "--int8_head"]) == 2
    assert "--int8_head runs in qat's packed decoder" in capsys.readouterr().err


def test_generate_without_a_model_folder_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", str(tmp_path), "hello"]) == 2
    assert "not an HF model folder" in capsys.readouterr().err
