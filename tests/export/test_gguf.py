"""GGUF TQ2_0/TQ1_0 export, read back with gguf's own reader: the same ternary codes and fp16 scales."""

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

from qat.errors import ExportError
from qat.export.gguf import export_gguf
from qat.nn.config import ArchConfig, QuantConfig
from qat.nn.convert import build_model, convert_to_qat
from qat.nn.packed_linear import pack_model
from qat.pack.gguf_ternary import TQ_TYPES, unpack_tq

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tokenizer():
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=300,
                            special_tokens=["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")


def tiny_bitnet(tokenizer, quant: QuantConfig):
    """Tied embeddings and a SiLU-gated FFN: the model llama.cpp's bitnet graph computes."""
    torch.manual_seed(0)
    arch = ArchConfig(family="bitnet", vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                      hidden_act="silu")
    return convert_to_qat(build_model(arch), quant).eval()


@pytest.mark.parametrize("qtype", sorted(TQ_TYPES))
@pytest.mark.parametrize("granularity,packed", [("tensor", False), ("row", True)])
def test_gguf_holds_exact_codes_and_scales(tokenizer, tmp_path, qtype, granularity, packed):
    model = tiny_bitnet(tokenizer, QuantConfig(granularity=granularity))
    expected = {name: m.quantized_weight() for name, m in model.named_modules() if hasattr(m, "quantized_weight")}
    source = pack_model(model) if packed else model
    out = export_gguf(source, tokenizer, tmp_path / f"m-{qtype}.gguf", qtype)
    reader = GGUFReader(out)
    tensors = {t.name: t for t in reader.tensors}
    assert reader.fields["general.architecture"].contents() == "bitnet"
    assert reader.fields["tokenizer.ggml.tokens"].contents()[:3] == tokenizer.convert_ids_to_tokens([0, 1, 2])
    layer0 = "model.layers.0.self_attn.q_proj"
    codes, scale = expected[layer0]
    t = tensors["blk.0.attn_q.weight"]
    assert t.tensor_type == TQ_TYPES[qtype]
    for hf_name, gguf_name in [(layer0, "blk.0.attn_q.weight"),
                               ("model.layers.1.mlp.down_proj", "blk.1.ffn_down.weight")]:
        codes, scale = expected[hf_name]
        t = tensors[gguf_name]
        got_codes, got_d = unpack_tq(np.asarray(t.data), t.tensor_type, tuple(codes.shape))
        assert torch.equal(got_codes, codes.to(torch.int8))
        want_d = scale.reshape(scale.shape[0], -1).expand(codes.shape[0], codes.shape[1] // 256).half().float()
        nonzero = (codes.reshape(codes.shape[0], -1, 256) != 0).any(-1)      # all-zero blocks store d = 0
        assert torch.equal(got_d[nonzero], want_d[nonzero])
    assert "blk.1.attn_sub_norm.weight" in tensors and "blk.1.ffn_sub_norm.weight" in tensors
    # llama.cpp's bitnet graph loads no output.weight (a file with one does not load): logits come from token_embd.
    assert "output.weight" not in tensors and "token_embd.weight" in tensors
    norm = tensors["output_norm.weight"]
    np.testing.assert_array_equal(np.asarray(norm.data), model.model.norm.weight.detach().numpy())


def test_rows_not_multiple_of_256_are_rejected_before_writing(tokenizer, tmp_path):
    torch.manual_seed(0)
    arch = ArchConfig(family="bitnet", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
                      hidden_act="silu")
    model = convert_to_qat(build_model(arch), QuantConfig())
    with pytest.raises(ExportError, match="multiple of 256"):
        export_gguf(model, tokenizer, tmp_path / "bad.gguf", "tq2_0")
    assert not list(tmp_path.iterdir())
    with pytest.raises(ExportError, match="unknown GGUF type"):
        export_gguf(model, tokenizer, tmp_path / "bad.gguf", "q4_0")


def test_default_recipe_is_refused_naming_the_llamacpp_settings(tiny_ternary_run, tmp_path):
    """The default recipe (untied lm_head, relu² FFN) is a model llama.cpp's bitnet graph computes differently:
    `qat export --format gguf-*` refuses it in one line (exit 2) naming the recipe settings, and writes nothing."""
    from tests.conftest import run_qat

    out = tmp_path / "gguf"
    result = run_qat("export", str(tiny_ternary_run / "checkpoints" / "last.ckpt"), "--out_dir", str(out),
                     "--format", "gguf-tq1_0")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "qat export: error: llama.cpp cannot compute this model" in result.stderr
    for fix in ("model.arch.tie_word_embeddings: true", "model.arch.hidden_act: silu",
                "recipes/bitnet-b158-tiny-llamacpp.yaml"):
        assert fix in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


@pytest.mark.parametrize("qtype", sorted(TQ_TYPES))
def test_gguf_export_folder_reloads_from_the_gguf_and_evaluates(tmp_path, qtype):
    """`qat export --format gguf-*` goes through the shared folder I/O; `qat eval` rebuilds the model from the GGUF
    tensors (gguf's reader) and it computes exactly the checkpoint's model with its scales rounded to fp16."""
    from qat.checkpoint.trained import load_trained_model
    from qat.cli.main import main
    from qat.export.folder import verify_export
    from qat.export.gguf import load_gguf_export
    from qat.nn.packed_linear import PackedLinear, pack_model
    from tests.export.conftest import tiny_model, write_checkpoint

    quant = QuantConfig(granularity="row")
    ckpt = write_checkpoint(tmp_path / "run" / "checkpoints" / "last.ckpt",
                            tiny_model(quant, hidden=256, llamacpp=True), quant)
    out = tmp_path / "gguf"
    assert main(["export", str(ckpt), "--out_dir", str(out), "--format", f"gguf-{qtype}"]) == 0
    manifest = verify_export(out)
    assert manifest["format"] == f"gguf-{qtype}" and f"model-{qtype}.gguf" in manifest["files"]
    assert manifest["bits_per_weight"] == pytest.approx({"tq2_0": 2.0625, "tq1_0": 1.6875}[qtype])
    trained = load_trained_model(str(ckpt))
    ids = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(0))
    reference = pack_model(trained.model)          # independent of the GGUF path: qat's packing of the codes
    for module in reference.modules():
        if isinstance(module, PackedLinear):
            module.scale.copy_(module.scale.half().float())
    with torch.no_grad():
        torch.testing.assert_close(load_gguf_export(out)(input_ids=ids).logits, reference(input_ids=ids).logits,
                                   rtol=0, atol=1e-5)
    assert main(["eval", str(out), "--max_blocks", "2"]) == 0
