"""GGUF Q4_0 export of llama models: the file holds exactly the trained codes and fp16 scales (read back with
gguf's own reader and dequantizer), bad models are refused before anything is written, and (slow) real llama.cpp
computes the same perplexity as qat on the same token ids."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType, GGUFReader, quants
from torch import nn
from transformers import AutoTokenizer

from qat.errors import ExportError
from qat.export import export_model
from qat.export.gguf_q4_0 import GGUF_FILE, load_q4_0_export, pack_q4_0, unpack_q4_0
from qat.nn.config import QuantConfig
from qat.nn.quantized import QuantizedLinear, quantized_layers
from qat.nn.schemes import SCHEMES, Scheme, register_scheme
from tests.conftest import run_qat
from tests.export.conftest import bpe_tokenizer_files, tiny_model


class Int4RowLinear(QuantizedLinear):
    """A 4-bit scheme written only against the protocol: LSQ's grid, codes clamp(round(W / s), -8, 7), with
    s = max|W| / 7.5 per row (so both ends of the grid occur), weight-only."""

    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 7.5
        return (self.weight / scale).round().clamp(-8, 7), scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        codes, scale = self.quantized_weight()
        return F.linear(x, self.weight + (codes * scale - self.weight).detach(), self.bias)


class Int5RowLinear(Int4RowLinear):
    """Codes in [-16, 15]: one more bit than Q4_0 holds."""

    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.weight.abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 15
        return (self.weight / scale).round().clamp(-16, 15), scale


@pytest.fixture
def int4_scheme():
    scheme = register_scheme(Scheme("test_int4_row", tuple(range(-8, 8)), Int4RowLinear, None, None, ("gguf-q4_0",),
                                    activations=("none",), granularities=("row",)))
    yield scheme
    del SCHEMES[scheme.name]


@pytest.fixture
def int5_scheme():
    scheme = register_scheme(Scheme("test_int5_row", tuple(range(-16, 16)), Int5RowLinear, None, None, ("hf-fp",),
                                    activations=("none",), granularities=("row",)))
    yield scheme
    del SCHEMES[scheme.name]


def hf_to_llamacpp_rows(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's convert_hf_to_gguf.py ``LlamaModel.permute`` (q/k rows for adjacent-pair RoPE), written out
    independently of qat's."""
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def test_q4_0_blocks_are_what_gguf_dequantizes():
    torch.manual_seed(0)
    codes = torch.randint(-8, 8, (6, 96), dtype=torch.int8)
    d = torch.rand(6, 3) * 0.1 - 0.02                       # negative d too: Q4_0's d is a signed fp16
    raw = pack_q4_0(codes, d)
    assert raw.shape == (6, 3 * 18) and raw.dtype == np.uint8
    values = quants.dequantize(raw, GGMLQuantizationType.Q4_0)
    want = (codes.float().reshape(6, 3, 32) * d.half().float().unsqueeze(-1)).reshape(6, 96)
    np.testing.assert_array_equal(values, want.numpy())
    got_codes, got_d = unpack_q4_0(raw, (6, 96))
    assert torch.equal(got_codes, codes) and torch.equal(got_d, d.half().float())


@pytest.mark.parametrize("bad,match", [(torch.full((1, 32), 8.0), r"\[-8, 7\]"), (torch.full((1, 32), 0.5), "integer"),
                                       (torch.zeros(1, 48), "blocks of 32 weights; this tensor has 48")])
def test_q4_0_packing_refuses_what_it_cannot_hold(bad, match):
    with pytest.raises(ExportError, match=match):
        pack_q4_0(bad, torch.ones(1, max(1, bad.shape[1] // 32)))


def _export(model, tmp_path, name="out"):
    return export_model(model, bpe_tokenizer_files(), tmp_path / name, "gguf-q4_0")


@pytest.mark.parametrize("quant", [QuantConfig(granularity="row", activation="none"),
                                   QuantConfig(granularity="group", group_size=32, activation="none"),
                                   QuantConfig(granularity="group", group_size=64),
                                   "int4"], ids=["ternary-row", "ternary-group32", "ternary-group64-int8act", "int4"])
def test_file_holds_exactly_the_trained_codes_and_fp16_scales(tmp_path, quant, int4_scheme):
    quant = QuantConfig(weight="test_int4_row", granularity="row", activation="none") if quant == "int4" else quant
    model = tiny_model(quant, hidden=128, family="llama")
    if quant.weight == "test_int4_row":
        assert {int(c) for c in model.model.layers[0].mlp.up_proj.quantized_weight()[0].unique()} > {-8, 7, 0}
    folder = _export(model, tmp_path)
    reader = GGUFReader(folder / GGUF_FILE)
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"     # no base GGUF: its own BPE is written
    tensors = {t.name: t for t in reader.tensors}
    config = model.config
    checked = 0
    for name, layer in quantized_layers(model).items():
        codes, scale = (t.detach() for t in layer.quantized_weight())
        if quant.granularity == "group":
            per_weight = scale.expand(-1, -1, quant.group_size).reshape(codes.shape)
        else:
            per_weight = scale.expand_as(codes)
        want = codes * per_weight.half().float()
        bid, kind = name.split(".")[2], name.rsplit(".", 1)[1]
        gguf_name = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
                     "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}[kind]
        t = tensors[f"blk.{bid}.{gguf_name}.weight"]
        assert t.tensor_type == GGMLQuantizationType.Q4_0
        heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}.get(kind)
        if heads:
            want, codes = hf_to_llamacpp_rows(want, heads), hf_to_llamacpp_rows(codes, heads)
        got = quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(codes.shape)
        np.testing.assert_array_equal(got, want.numpy())
        got_codes, _ = unpack_q4_0(np.asarray(t.data), tuple(codes.shape))
        assert torch.equal(got_codes, codes.to(torch.int8))
        checked += 1
    assert checked == 7 * config.num_hidden_layers
    assert tensors["token_embd.weight"].tensor_type == GGMLQuantizationType.F32
    np.testing.assert_array_equal(np.asarray(tensors["output.weight"].data),
                                  model.lm_head.weight.detach().numpy())
    manifest = json.loads((folder / "qat_export.json").read_text())
    assert manifest["format"] == "gguf-q4_0" and manifest["bits_per_weight"] == 4.5
    # qat's reader of the file computes the fp16-scale reference model (the agreement `qat eval` checks).
    from qat.export.gguf_q4_0 import fp16_scale_reference

    ids = torch.randint(0, config.vocab_size, (2, 16))
    with torch.no_grad():
        want_logits = fp16_scale_reference(model)(input_ids=ids).logits
        got_logits = load_q4_0_export(folder)(input_ids=ids).logits
    torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=1e-4)


def test_a_base_gguf_of_another_shape_is_refused(tmp_path):
    from qat.data.tokenizer import smollm2_gguf_path, tokenizer_dir
    from qat.export.gguf_q4_0 import export_gguf_q4_0

    base = smollm2_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir("smollm2", [], "text", 0, "")))
    model = tiny_model(QuantConfig(granularity="row", activation="none"), family="llama", vocab=49152)
    with pytest.raises(ExportError, match="not a llama model of this shape and vocabulary"):
        export_gguf_q4_0(model, tokenizer, tmp_path / "x.gguf", base_gguf=base)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_a_model_fine_tuned_from_smollm2_gets_its_gguf_metadata(tmp_path, smollm2_teacher):
    """The real SmolLM2-135M (from its GGUF), quantized: the export copies the base's tokenizer and chat template."""
    import copy

    from qat.export.gguf_q4_0 import export_gguf_q4_0
    from qat.nn.convert import convert_to_qat

    # A copy: the session's teacher fixture is shared with other tests and must stay the frozen original.
    model = convert_to_qat(copy.deepcopy(smollm2_teacher.model), QuantConfig(granularity="row", activation="none"))
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_teacher.tokenizer_dir))
    out = export_gguf_q4_0(model, tokenizer, tmp_path / "smollm2-q4_0.gguf")
    reader = GGUFReader(out)
    fields = reader.fields
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert fields["tokenizer.chat_template"].contents().startswith("{% for message in messages %}")
    assert fields["general.file_type"].contents() == 2                     # MOSTLY_Q4_0, not the base's Q4_1
    assert len(fields["tokenizer.ggml.merges"].contents()) == 48900
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.29.ffn_down.weight"] == GGMLQuantizationType.Q4_0 and "output.weight" not in types


@pytest.mark.parametrize("case,match", [
    ("bitnet", "llama.cpp's llama graph; this model is 'bitnet'"),
    ("fp", "full precision. Use --format hf-fp"),
    ("int5", r"codes in \[-16, 15\], outside Q4_0's \[-8, 7\]"),
    ("group48", "group_size=48 is not a multiple of 32"),
    ("in48", "in_features=48 is not a multiple of 32"),
    ("lm_head_bias", "lm_head.bias is a bias that llama.cpp's llama graph has no slot for"),
    ("inlayer", "norm_placement: inlayer"),
    ("fbi", "'fbi_binary'.*does not list gguf-q4_0.*--format binary"),
])
def test_export_refuses_what_llama_cpp_q4_0_cannot_hold_before_writing(tmp_path, case, match, int5_scheme):
    row = QuantConfig(granularity="row", activation="none")
    model = {"bitnet": lambda: tiny_model(QuantConfig(), family="bitnet"),
             "fp": lambda: tiny_model(None, family="llama"),
             "int5": lambda: tiny_model(QuantConfig(weight="test_int5_row", granularity="row", activation="none"),
                                        family="llama"),
             "group48": lambda: tiny_model(QuantConfig(granularity="group", group_size=48), hidden=96, family="llama"),
             "in48": lambda: tiny_model(row, hidden=48, family="llama"),
             "lm_head_bias": lambda: tiny_model(row, family="llama"),
             "inlayer": lambda: tiny_model(QuantConfig(norm_placement="inlayer"), family="llama"),
             "fbi": lambda: tiny_model(QuantConfig(weight="fbi_binary", activation="none"), family="llama")}[case]()
    if case == "lm_head_bias":
        model.lm_head = nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with pytest.raises(ExportError, match=match):
        _export(model, tmp_path, case)
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_qat_export_cli_refuses_a_bitnet_checkpoint_in_one_line(ternary_checkpoint, tmp_path):
    result = run_qat("export", str(ternary_checkpoint), "--out_dir", str(tmp_path / "q4"), "--format", "gguf-q4_0")
    assert result.returncode == 2, result.stderr[-2000:]
    # (the last line: torchao may print load warnings of its own first)
    assert result.stderr.strip().splitlines()[-1].startswith(
        "qat export: error: GGUF Q4_0 export writes llama.cpp's llama graph; this model is 'bitnet'")
    assert not (tmp_path / "q4").exists()


# ------------------------------------------------------------------------------------------ real llama.cpp

def _nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    logp = torch.log_softmax(logits[:-1].double(), dim=-1)
    return float(-logp.gather(1, ids[1:, None]).sum()), len(ids) - 1


def llama_cpp_perplexity(gguf_file, blocks: list[torch.Tensor]) -> float:
    """Perplexity llama.cpp computes on these token ids (every position's logits; no BOS added)."""
    from llama_cpp import Llama

    # llama.cpp's Q4_0 dot products quantize activations to Q8_0 (one scale per 32 values); qat keeps them fp32.
    llm = Llama(model_path=str(gguf_file), logits_all=True, n_ctx=len(blocks[0]), n_threads=2, n_batch=len(blocks[0]),
                verbose=False)
    total = count = 0
    for ids in blocks:
        llm.reset()
        llm.eval(ids.tolist())
        nll, n = _nll(torch.from_numpy(np.array(llm.scores[:len(ids)], dtype=np.float32)), ids)
        total, count = total + nll, count + n
    return math.exp(total / count)


def qat_perplexity(model, blocks: list[torch.Tensor]) -> float:
    total = count = 0
    with torch.no_grad():
        for ids in blocks:
            nll, n = _nll(model(input_ids=ids[None]).logits[0], ids)
            total, count = total + nll, count + n
    return math.exp(total / count)


@pytest.fixture(scope="module")
def llama_cpp_module():
    """llama-cpp-python (a test extra: pip install llama-cpp-python==0.3.36, builds llama.cpp from the sdist)."""
    return pytest.importorskip("llama_cpp", reason="llama-cpp-python is a test extra (pip install llama-cpp-python)")


@pytest.fixture(scope="module")
def trained_llama(llama_cpp_training_runs):
    """A tiny llama (ternary, row scales, 16-bit activations) trained 40 steps by `qat fit`, and held-out blocks."""
    from qat.checkpoint.trained import load_trained_model
    from qat.data.datamodule import TextDataModule

    checkpoint = llama_cpp_training_runs["llama-ternary"]
    trained = load_trained_model(str(checkpoint))
    data = TextDataModule(**{k: v for k, v in trained.data_hparams.items() if not k.startswith("_")})
    data.setup()
    blocks = [torch.tensor(np.asarray(b), dtype=torch.long) for b in data.datasets["validation"].blocks[:4]]
    return checkpoint, trained, blocks


@pytest.mark.slow
def test_llama_cpp_perplexity_matches_qat_for_a_ternary_model(llama_cpp_module, trained_llama, tmp_path):
    checkpoint, trained, blocks = trained_llama
    result = run_qat("export", str(checkpoint), "--out_dir", str(tmp_path / "q4"), "--format", "gguf-q4_0")
    assert result.returncode == 0, result.stderr[-4000:]
    qat_ppl = qat_perplexity(trained.model, blocks)
    cpp_ppl = llama_cpp_perplexity(tmp_path / "q4" / GGUF_FILE, blocks)
    print(f"ternary: qat ppl {qat_ppl:.3f}, llama.cpp ppl {cpp_ppl:.3f}")
    # llama.cpp quantizes activations to Q8_0 (per 32 values) for Q4_0 dot products; qat keeps them in fp32.
    assert abs(cpp_ppl / qat_ppl - 1) < 0.01
    assert qat_ppl < 0.5 * trained.model.config.vocab_size                  # a trained model, not a uniform one


@pytest.mark.slow
def test_llama_cpp_perplexity_matches_qat_for_a_4bit_model(llama_cpp_module, trained_llama, tmp_path, int4_scheme):
    """The trained latent weights quantized to a 4-bit grid (codes in [-8, 7], per-row scales) without training."""
    from qat.nn.convert import build_model, convert_to_qat

    _, trained, blocks = trained_llama
    fp = build_model(trained.arch, token_ids=trained.hparams.get("token_ids"))
    fp.load_state_dict(trained.model.state_dict())          # the quantized layers' latent weights are plain weights
    model = convert_to_qat(fp, QuantConfig(weight="test_int4_row", granularity="row", activation="none")).eval()
    folder = export_model(model, trained.tokenizer_files, tmp_path / "q4", "gguf-q4_0")
    qat_ppl = qat_perplexity(model, blocks)
    cpp_ppl = llama_cpp_perplexity(folder / GGUF_FILE, blocks)
    print(f"4-bit: qat ppl {qat_ppl:.3f}, llama.cpp ppl {cpp_ppl:.3f}")
    assert abs(cpp_ppl / qat_ppl - 1) < 0.01
    assert qat_ppl < 0.5 * model.config.vocab_size


@pytest.mark.slow
def test_llama_cpp_perplexity_matches_qat_for_mixed_layer_groups(llama_cpp_module, trained_llama, tmp_path):
    """model.quant.layer_groups: attention at ParetoQ 4-bit, the MLP ternary (PTQ of the trained latent weights), in
    one Q4_0 file; llama.cpp computes qat's perplexity."""
    from qat.nn.convert import build_model, convert_to_qat

    _, trained, blocks = trained_llama
    fp = build_model(trained.arch, token_ids=trained.hparams.get("token_ids"))
    fp.load_state_dict(trained.model.state_dict(), strict=False)          # latent weights; alphas are re-initialised
    quant = QuantConfig(weight="paretoq_4bit", granularity="row", activation="none",
                        layer_groups=[{"match": ["*.mlp.*"], "weight": "paretoq_ternary"}])
    model = convert_to_qat(fp, quant).eval()
    assert model.get_submodule("model.layers.0.mlp.up_proj").quant.weight == "paretoq_ternary"
    assert model.get_submodule("model.layers.0.self_attn.q_proj").quant.weight == "paretoq_4bit"
    folder = export_model(model, trained.tokenizer_files, tmp_path / "q4", "gguf-q4_0")
    qat_ppl = qat_perplexity(model, blocks)
    cpp_ppl = llama_cpp_perplexity(folder / GGUF_FILE, blocks)
    print(f"mixed 4-bit attention / ternary MLP: qat ppl {qat_ppl:.3f}, llama.cpp ppl {cpp_ppl:.3f}")
    assert abs(cpp_ppl / qat_ppl - 1) < 0.01
