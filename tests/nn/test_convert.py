import numpy as np
import pytest
import torch
from torch import nn

from qat.errors import RecipeError
from qat.nn.bitlinear import BitLinear
from qat.nn.config import ArchConfig, QuantConfig
from qat.nn.convert import bitlinear_layers, build_model, convert_to_qat
from tests.references.bitnet_reference import bitnet_forward_ref

ARCH = ArchConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=64)


def _randomize(model: nn.Module) -> None:
    # Fresh non-trivial norms too, so the reference really checks where each norm sits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p))


@pytest.mark.parametrize("grad_enabled", [True, False], ids=["training-forward", "inference-forward"])
def test_converted_bitnet_matches_float64_hand_written_forward(grad_enabled):
    torch.manual_seed(0)
    model = convert_to_qat(build_model(ARCH, dtype=torch.float64), QuantConfig())
    _randomize(model)
    assert set(bitlinear_layers(model)) == {f"model.layers.{i}.{m}" for i in range(2) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert type(model.lm_head) is nn.Linear  # kept in full precision by default
    ids = torch.randint(0, ARCH.vocab_size, (1, 23))
    with torch.set_grad_enabled(grad_enabled):
        logits = model(input_ids=ids).logits[0].detach().numpy()
    weights = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    ref = bitnet_forward_ref(weights, ids[0].numpy(), ARCH.num_hidden_layers, ARCH.num_attention_heads,
                             ARCH.rms_norm_eps, ARCH.rope_theta)
    # HF builds its RoPE cos/sin tables in float32 even in a float64 model: agreement is ~1e-7, not 1e-15.
    # A misplaced norm or quantizer would be off by O(1).
    np.testing.assert_allclose(logits, ref, rtol=0, atol=1e-6)


def test_keep_full_precision_patterns_and_inlayer_norms():
    model = build_model(ArchConfig(family="llama", vocab_size=97, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4))
    convert_to_qat(model, QuantConfig(norm_placement="inlayer", keep_full_precision=["lm_head", "*down_proj"]))
    layer = model.model.layers[0]
    assert type(layer.mlp.down_proj) is nn.Linear and isinstance(layer.mlp.up_proj, BitLinear)
    assert isinstance(layer.input_layernorm, nn.Identity) and isinstance(layer.post_attention_layernorm, nn.Identity)
    assert isinstance(layer.self_attn.q_proj.rms_norm, nn.RMSNorm)
    assert model(input_ids=torch.randint(0, 97, (2, 9))).logits.shape == (2, 9, 97)


def test_converting_a_model_with_nothing_to_quantize_is_an_error():
    with pytest.raises(RecipeError, match="keep_full_precision"):
        convert_to_qat(nn.Sequential(nn.Linear(4, 4)), QuantConfig(keep_full_precision=["*"]))


def test_pretrained_folder_without_config_is_a_recipe_error(tmp_path):
    with pytest.raises(RecipeError, match="config.json"):
        build_model(ArchConfig(pretrained=str(tmp_path)))
