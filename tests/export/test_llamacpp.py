"""GGUF exports in real llama.cpp (llama-cpp-python, the `test` extra): a model its `bitnet` graph cannot compute
is refused before anything is written; the llama.cpp recipe's TQ2_0/TQ1_0 exports load and give qat's perplexity
on the same token ids."""

import math

import numpy as np
import pytest
import torch

from qat.errors import ExportError
from qat.export import gguf as gguf_export
from qat.nn.config import QuantConfig
from tests.export.conftest import tiny_model


def _with_bias(model):
    layer = model.get_submodule("model.layers.0.mlp.up_proj")
    layer.bias = torch.nn.Parameter(torch.zeros(layer.out_features))
    return model


# Each case breaks exactly one thing llama.cpp's bitnet graph fixes; the message names the recipe key to change.
INCOMPATIBLE = {
    "untied lm_head": (lambda: tiny_model(QuantConfig(), hidden=256, llamacpp=True), "tie_word_embeddings",
                       "model.arch.tie_word_embeddings: false"),
    "relu2 FFN": (lambda: tiny_model(QuantConfig(), hidden=256, llamacpp=True), "hidden_act",
                  "model.arch.hidden_act: relu2"),
    "in-layer norms": (lambda: tiny_model(QuantConfig(norm_placement="inlayer"), hidden=256, llamacpp=True), None,
                       "model.quant.norm_placement: inlayer"),
    "lm_head not equal to the tied embedding": (lambda: tiny_model(QuantConfig(), hidden=256, llamacpp=True),
                                                "lm_head_changed", "differs from embed_tokens"),
    "bias": (lambda: _with_bias(tiny_model(QuantConfig(), hidden=256, llamacpp=True)), None,
             "model.layers.0.mlp.up_proj has a bias"),
}


@pytest.mark.parametrize("case", sorted(INCOMPATIBLE))
def test_a_model_llamacpp_cannot_compute_is_refused_naming_the_fix(case, tmp_path):
    build, config_key, message = INCOMPATIBLE[case]
    model = build()
    if config_key == "tie_word_embeddings":
        model.config.tie_word_embeddings = False
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    elif config_key == "lm_head_changed":
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach() + 1)
    elif config_key == "hidden_act":
        model.config.hidden_act = "relu2"
    assert gguf_export.llamacpp_incompatibilities(model), case
    for fmt in (gguf_export.TQ2_0, gguf_export.TQ1_0):
        with pytest.raises(ExportError, match="llama.cpp cannot compute this model") as error:
            fmt.check(model)
        assert message in str(error.value)
        assert "model.arch.tie_word_embeddings: true, model.arch.hidden_act: silu" in str(error.value)
    with pytest.raises(ExportError, match=message):
        gguf_export.export_gguf(model, None, tmp_path / "m.gguf", "tq2_0")
    assert not list(tmp_path.iterdir())


def test_the_llamacpp_form_passes_the_check():
    model = tiny_model(QuantConfig(), hidden=256, llamacpp=True)
    assert gguf_export.llamacpp_incompatibilities(model) == []
    gguf_export.check(model)


def test_the_llamacpp_recipe_builds_the_model_llamacpp_computes():
    """The recipe the README points to gives, through the same config path as `qat fit`, a model with no
    incompatibility (HF BitNetMLP applies ACT2FN[hidden_act] to the gate: silu(gate) * up)."""
    import yaml

    from qat.nn.config import ArchConfig
    from qat.nn.convert import build_model, convert_to_qat
    from tests.conftest import REPO

    recipe = yaml.safe_load((REPO / "recipes" / "bitnet-b158-tiny-llamacpp.yaml").read_text())
    arch = ArchConfig(**{**recipe["model"]["arch"], "vocab_size": 4096})
    model = convert_to_qat(build_model(arch), QuantConfig(**recipe["model"]["quant"]))
    assert gguf_export.llamacpp_incompatibilities(model) == []
    x = torch.randn(1, 3, 256)
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        expected = mlp.down_proj(mlp.ffn_sub_norm(torch.nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x)))
        torch.testing.assert_close(mlp(x), expected, rtol=0, atol=0)
    default = yaml.safe_load((REPO / "recipes" / "bitnet-b158-tiny.yaml").read_text())
    model = build_model(ArchConfig(**{**default["model"]["arch"], "vocab_size": 4096}))
    assert len(gguf_export.llamacpp_incompatibilities(model)) == 2       # untied lm_head, relu²


# llama.cpp multiplies TQ2_0/TQ1_0 weights with activations quantized to Q8_K (int8, one scale per 256 values),
# where qat quantizes each token's activations to int8 with one absmax scale per token: the same for the 256-wide
# inputs here, finer for the FFN down projection (768 inputs). Not bit-exact, so perplexities are compared with a
# relative tolerance (measured: 0.006%, top-1 agreement 0.999, max |Δlogit| 0.012 of logits up to 4.9).
PERPLEXITY_RTOL = 0.01
TOP1_AGREEMENT = 0.99
HELD_OUT_BLOCKS = 6


def llama_cpp_module():
    try:
        import llama_cpp
    except ImportError:
        pytest.fail("llama-cpp-python (the `test` extra) is not installed: run `bash scripts/setup.sh --with-test`")
    return llama_cpp


@pytest.fixture(scope="module")
def llamacpp_recipe_checkpoint(llama_cpp_training_runs):
    """A real short `qat fit` of recipes/bitnet-b158-tiny-llamacpp.yaml; returns its last checkpoint."""
    return llama_cpp_training_runs["bitnet-llamacpp"]


def _perplexity(logits: np.ndarray, ids: np.ndarray) -> tuple[float, int]:
    """Summed NLL of ids[1:] under logits[:-1] (natural log), and the token count."""
    logits = torch.from_numpy(np.asarray(logits[: len(ids) - 1], dtype=np.float64))
    nll = torch.nn.functional.cross_entropy(logits, torch.from_numpy(ids[1:].astype(np.int64)), reduction="sum")
    return float(nll), len(ids) - 1


@pytest.mark.slow
@pytest.mark.parametrize("qtype", ["tq2_0", "tq1_0"])
def test_llamacpp_runs_the_gguf_with_qats_perplexity(llamacpp_recipe_checkpoint, tmp_path, qtype):
    """The same held-out token ids in llama.cpp (the exported GGUF) and in qat (the checkpoint): perplexities
    within PERPLEXITY_RTOL, and the same next-token argmax at TOP1_AGREEMENT of the positions."""
    from qat.checkpoint.trained import load_trained_model
    from qat.cli.main import main
    from qat.data.datamodule import TextDataModule

    llama_cpp = llama_cpp_module()
    out = tmp_path / f"gguf-{qtype}"
    assert main(["export", str(llamacpp_recipe_checkpoint), "--out_dir", str(out), "--format", f"gguf-{qtype}"]) == 0
    trained = load_trained_model(str(llamacpp_recipe_checkpoint))
    data = TextDataModule(**{k: v for k, v in trained.data_hparams.items() if not k.startswith("_")})
    data.setup()
    blocks = np.array(data.datasets["validation"].blocks[:HELD_OUT_BLOCKS], dtype=np.int64)
    seq_len = blocks.shape[1]

    with torch.no_grad():
        qat_logits = trained.model(input_ids=torch.from_numpy(blocks)).logits.numpy()
    llm = llama_cpp.Llama(model_path=str(out / f"model-{qtype}.gguf"), logits_all=True, n_ctx=seq_len,
                          n_batch=seq_len, n_threads=2, verbose=False)
    assert llm.n_vocab() == trained.model.config.vocab_size
    qat_nll = llama_nll = 0.0
    tokens = same_top1 = 0
    for block, logits in zip(blocks, qat_logits):
        llm.reset()
        llm.eval(block.tolist())
        scores = np.asarray(llm.scores[:seq_len])
        nll, n = _perplexity(scores, block)
        llama_nll += nll
        qat_nll += _perplexity(logits, block)[0]
        same_top1 += int((scores.argmax(-1) == logits.argmax(-1)).sum())
        tokens += n
    llm.close()
    qat_ppl, llama_ppl = math.exp(qat_nll / tokens), math.exp(llama_nll / tokens)
    print(f"{qtype}: {tokens} held-out tokens, perplexity qat {qat_ppl:.3f}, llama.cpp {llama_ppl:.3f} "
          f"({llama_ppl / qat_ppl - 1:+.3%}), top-1 agreement {same_top1 / blocks.size:.4f}")
    # The model learned something (uniform guessing: perplexity = vocabulary size), so the comparison means something.
    assert qat_ppl < trained.model.config.vocab_size / 2
    assert llama_ppl == pytest.approx(qat_ppl, rel=PERPLEXITY_RTOL)
    assert same_top1 / blocks.size >= TOP1_AGREEMENT
