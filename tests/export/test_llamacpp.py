"""GGUF exports in real llama.cpp (llama-cpp-python, the `test` extra): a model its `bitnet` graph cannot compute
is refused before anything is written; the llama.cpp recipe's TQ2_0/TQ1_0 exports load and give qat's perplexity
on the same token ids."""

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
