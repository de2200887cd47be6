"""Configs refuse impossible settings when built, with messages that name the recipe key and the fix."""

import dataclasses

import pytest
import torch
from torch import nn

from qat.errors import RecipeError
from qat.nn.config import ArchConfig, QuantConfig
from qat.nn.convert import convert_to_qat
from qat.nn.quantized import quantized_layers
from qat.nn.schemes import SCHEMES
from tests.conftest import REPO, run_qat


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_every_scheme_builds_with_each_setting_it_supports(name):
    scheme = SCHEMES[name]
    for granularity in scheme.granularities:
        for activation in scheme.activations:
            assert QuantConfig(weight=name, granularity=granularity, activation=activation).weight == name


def test_unknown_scheme_lists_the_known_ones():
    with pytest.raises(RecipeError, match=r"unknown quantization scheme 'absmax_ternery'; known: "
                                          r"absmean_binary, absmean_ternary, .*onebit.*model\.quant\.weight"):
        QuantConfig(weight="absmax_ternery")


@pytest.mark.parametrize("group_size", [0, -128])
def test_group_size_must_be_positive(group_size):
    with pytest.raises(RecipeError, match=rf"model\.quant\.group_size={group_size} must be >= 1"):
        QuantConfig(granularity="group", group_size=group_size)


@pytest.mark.parametrize("weight,granularity", [("fbi_binary", "row"), ("onebit", "group"),
                                                ("absmean_ternary", "column")])
def test_granularity_the_scheme_does_not_support(weight, granularity):
    with pytest.raises(RecipeError, match=rf"model\.quant\.granularity='{granularity}' is not supported by "
                                          rf"scheme '{weight}'"):
        QuantConfig(weight=weight, granularity=granularity, activation="none")


@pytest.mark.parametrize("weight", ["fbi_binary", "onebit"])
def test_w1a16_schemes_refuse_int8_activations_and_say_to_set_none(weight):
    with pytest.raises(RecipeError, match=rf"model\.quant\.activation='int8_per_token' is not supported by "
                                          rf"scheme '{weight}'.*set model\.quant\.activation: none"):
        QuantConfig(weight=weight, activation="int8_per_token")


def test_inlayer_norm_only_for_schemes_whose_layers_have_one():
    assert QuantConfig(weight="absmean_binary", norm_placement="inlayer").norm_placement == "inlayer"
    with pytest.raises(RecipeError, match=r"model\.quant\.norm_placement=inlayer.*'fbi_binary' \(FBILinear\) "
                                          r"have no in-layer RMSNorm; set model\.quant\.norm_placement: subln"):
        QuantConfig(weight="fbi_binary", activation="none", norm_placement="inlayer")


def test_arch_defaults_are_valid():
    assert ArchConfig().hidden_size == 256


@pytest.mark.parametrize("key", ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                 "num_key_value_heads", "max_position_embeddings"])
def test_arch_sizes_must_be_at_least_one(key):
    with pytest.raises(RecipeError, match=rf"model\.arch\.{key}=0 must be >= 1"):
        ArchConfig(**{key: 0})


def test_arch_vocab_size_must_not_be_negative():
    assert ArchConfig(vocab_size=0).vocab_size == 0   # 0 = the tokenizer's size
    with pytest.raises(RecipeError, match=r"model\.arch\.vocab_size=-1 must be >= 0"):
        ArchConfig(vocab_size=-1)


def test_arch_head_divisibility():
    with pytest.raises(RecipeError, match=r"model\.arch\.hidden_size=250 is not divisible by "
                                          r"model\.arch\.num_attention_heads=4"):
        ArchConfig(hidden_size=250)
    with pytest.raises(RecipeError, match=r"model\.arch\.num_attention_heads=4 is not divisible by "
                                          r"model\.arch\.num_key_value_heads=3"):
        ArchConfig(num_key_value_heads=3)
    assert ArchConfig(num_attention_heads=8, num_key_value_heads=2).num_key_value_heads == 2


def test_configs_loaded_from_a_checkpoint_dict_are_validated_too():
    # Checkpoints store asdict(config); loading rebuilds the dataclass, so a bad stored value is refused as well.
    stored = dataclasses.asdict(QuantConfig())
    with pytest.raises(RecipeError, match="group_size"):
        QuantConfig(**{**stored, "group_size": 0})


def test_group_size_must_divide_every_quantized_width_checked_before_any_replacement():
    model = nn.Sequential(nn.Linear(256, 96), nn.Linear(96, 8))
    with pytest.raises(RecipeError, match=r"model\.quant\.group_size=64 does not divide in_features=96 of 1\b"):
        convert_to_qat(model, QuantConfig(granularity="group", group_size=64, keep_full_precision=[]))
    assert [type(m) for m in model] == [nn.Linear, nn.Linear]   # nothing was replaced
    # A kept full-precision layer does not need to fit the group size; other granularities ignore it.
    convert_to_qat(model, QuantConfig(granularity="group", group_size=64, keep_full_precision=["1"]))
    assert list(quantized_layers(model)) == ["0"]
    model = convert_to_qat(nn.Sequential(nn.Linear(96, 8)), QuantConfig(granularity="row", group_size=64,
                                                                         keep_full_precision=[]))
    assert model[0](torch.randn(2, 96)).shape == (2, 8)


LAYER_GROUPS = [{"match": ["*.mlp.*"], "weight": "paretoq_2bit"},
                {"match": "*.mlp.down_proj", "weight": "paretoq_ternary"},       # never reached: the first wins
                {"match": ["o_proj"], "granularity": "group", "group_size": 32, "activation": "int8_per_token"}]


def test_layer_groups_resolve_per_layer_first_match_wins():
    quant = QuantConfig(weight="paretoq_4bit", granularity="row", activation="none", layer_groups=LAYER_GROUPS)
    assert quant.layer_groups[1]["match"] == ["*.mlp.down_proj"]                  # a single pattern becomes a list
    down = quant.for_layer("model.layers.3.mlp.down_proj")
    assert (down.weight, down.granularity, down.layer_groups) == ("paretoq_2bit", "row", [])
    o_proj = quant.for_layer("model.layers.0.self_attn.o_proj")
    assert (o_proj.weight, o_proj.granularity, o_proj.group_size, o_proj.activation) == (
        "paretoq_4bit", "group", 32, "int8_per_token")
    q_proj = quant.for_layer("model.layers.0.self_attn.q_proj")
    assert q_proj == dataclasses.replace(quant, layer_groups=[])
    # a checkpoint stores asdict(config) and rebuilds it: the groups survive the round trip
    assert QuantConfig(**dataclasses.asdict(quant)) == quant


@pytest.mark.parametrize("groups,message", [
    ([{"match": ["*.mlp.*"], "bits": 2}], r"unknown keys \['bits'\]"),
    ([{"weight": "paretoq_2bit"}], "match must list module-name patterns"),
    ([{"match": [], "weight": "paretoq_2bit"}], "match must list module-name patterns"),
    (["*.mlp.*"], "must be a mapping"),
    ([{"match": ["*.mlp.*"], "weight": "paretoq_9bit"}], r"layer_groups\[0\] .*unknown quantization scheme"),
    ([{"match": ["*"], "weight": "fbi_binary"}], r"layer_groups\[0\] .*activation"),
    ([{"match": ["*"], "group_size": 0}], r"layer_groups\[0\] .*group_size=0 must be >= 1"),
])
def test_bad_layer_groups_are_recipe_errors_naming_the_group(groups, message):
    with pytest.raises(RecipeError, match=message):
        QuantConfig(weight="paretoq_4bit", activation="int8_per_token", layer_groups=groups)


def test_convert_gives_each_layer_its_groups_settings_and_checks_them_first():
    from qat.nn.convert import build_model

    arch = ArchConfig(family="llama", vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    quant = QuantConfig(weight="paretoq_4bit", granularity="row", activation="none", layer_groups=LAYER_GROUPS)
    model = convert_to_qat(build_model(arch), quant)
    layers = {name.split(".")[-1]: layer for name, layer in quantized_layers(model).items()}
    assert {name: layer.quant.weight for name, layer in layers.items()} == {
        "q_proj": "paretoq_4bit", "k_proj": "paretoq_4bit", "v_proj": "paretoq_4bit", "o_proj": "paretoq_4bit",
        "gate_proj": "paretoq_2bit", "up_proj": "paretoq_2bit", "down_proj": "paretoq_2bit"}
    assert layers["o_proj"].alpha_shape == (64, 2) and layers["q_proj"].alpha_shape == (64, 1)
    assert layers["o_proj"].quant.activation == "int8_per_token"
    # a group's group size that does not divide its layers is refused before any layer is replaced
    bad = QuantConfig(weight="paretoq_4bit", granularity="row", activation="none",
                      layer_groups=[{"match": ["down_proj"], "granularity": "group", "group_size": 64}])
    fresh = build_model(arch)
    with pytest.raises(RecipeError, match="group_size=64 does not divide in_features=96 of model.layers.0.mlp.down"):
        convert_to_qat(fresh, bad)
    assert not quantized_layers(fresh)


@pytest.mark.slow
@pytest.mark.parametrize("override,message", [
    ("--model.quant.group_size=0", "model.quant.group_size=0 must be >= 1"),
    ("--model.arch.num_key_value_heads=3", "model.arch.num_attention_heads=4 is not divisible by "
                                           "model.arch.num_key_value_heads=3"),
])
def test_qat_fit_reports_a_bad_config_in_one_line_with_exit_2(tmp_path, override, message):
    # model.quant is Optional, so jsonargparse wraps what QuantConfig raises; the CLI still prints it in one line.
    result = run_qat("fit", "--config", str(REPO / "recipes" / "bitnet-b158-tiny.yaml"), override,
                     f"--trainer.default_root_dir={tmp_path / 'run'}", timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"qat fit: error: {message}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()   # refused before anything ran
