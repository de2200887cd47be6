"""The model card of an export, read by `huggingface_hub.ModelCard` (the Hub's own parser): its front matter holds
license, library, tags by scheme and format, base_model of a fine-tune, datasets and (after `qat eval`) a
model-index equal to eval.json; it has no local path in it."""

import json
import re

import pytest
import torch
from huggingface_hub import ModelCard

from qat.cli.main import main
from qat.export import export_model
from qat.export.folder import verify_export
from qat.export.model_card import base_model_provenance, hub_model_id, render_model_card
from qat.nn.config import ArchConfig, QuantConfig
from qat.nn.convert import build_model, convert_to_qat
from tests.export.conftest import bpe_tokenizer_files, tiny_model

# An absolute path in a card: "/" starting a path after a space, quote, backtick or bracket.
ABSOLUTE_PATH = re.compile(r"(?:^|[\s`'\"(\[])/(?:[\w.-]+/)+")


def _card(folder) -> ModelCard:
    return ModelCard((folder / "README.md").read_text())


def test_the_card_of_an_export_parses_as_the_hub_reads_it(ternary_checkpoint, tmp_path):
    out = tmp_path / "export"
    assert main(["export", str(ternary_checkpoint), "--out_dir", str(out), "--dtype", "float32"]) == 0
    card = _card(out)
    data = card.data.to_dict()
    assert data["license"] == "apache-2.0" and data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "text-generation"
    assert {"qat", "bitnet", "ternary", "1.58-bit", "absmean-ternary"} <= set(data["tags"])
    assert data["datasets"] == ["wikimedia/wikipedia"] and "base_model" not in data
    assert card.data.eval_results is None                   # no eval yet: no model-index
    assert "https://arxiv.org/abs/2402.17764" in card.text and "run `tiny`, checkpoint at step 7" in card.text
    assert str(tmp_path) not in card.content and not ABSOLUTE_PATH.search(card.content)


@pytest.mark.parametrize("fmt,tags,library", [("gguf-tq2_0", {"gguf", "tq2_0"}, "gguf"),
                                              ("hf-fp", {"hf-fp"}, "transformers")])
def test_tags_and_library_follow_the_format(tmp_path, fmt, tags, library):
    quant = None if fmt == "hf-fp" else QuantConfig()
    model = tiny_model(quant, hidden=256, llamacpp=True)
    out = export_model(model, bpe_tokenizer_files(), tmp_path / "export", fmt, run_name="r", global_step=3)
    data = _card(out).data.to_dict()
    assert tags <= set(data["tags"]) and data["library_name"] == library
    assert ("ternary" in data["tags"]) == (quant is not None)


def test_a_card_never_shows_a_local_path(tmp_path):
    """Provenance full of absolute paths (a local teacher, user data files, a tokenizer folder, a pretrained
    folder): the card names each by its last component only."""
    secret = tmp_path / "home" / "alice" / "private"
    manifest = {"format": "hf", "model": {"model_type": "bitnet"}, "quant": {"weight": "absmean_ternary"},
                "scheme": {"name": "absmean_ternary", "description": "d", "bits": 1.58, "levels_count": 3},
                "bits_per_weight": 2.0, "source_checkpoint": str(secret / "last.ckpt"),
                "provenance": {"run_name": "r", "global_step": 1, "pretrained_name": str(secret / "base"),
                               "teacher": {"source": str(secret / "teacher.ckpt")}, "distill": {"alpha": 1},
                               "data": {"train_files": [str(secret / "train.jsonl")], "tokenizer": str(secret / "tok"),
                                        "seq_len": 64}}}
    card = render_model_card("r", manifest, {"exported": {"perplexity": 12.5, "bits_per_byte": 1.25, "tokens": 9}})
    assert str(tmp_path) not in card and not ABSOLUTE_PATH.search(card), card
    parsed = ModelCard(card)
    assert "`teacher.ckpt`" in parsed.text and "`tok`" in parsed.text and "`base`" in parsed.text
    assert "datasets" not in parsed.data.to_dict()           # user files: no Hub dataset is claimed


def test_base_model_is_the_hub_id_a_fine_tune_started_from(tmp_path):
    assert hub_model_id("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"
    assert hub_model_id("") is None and hub_model_id(str(tmp_path)) is None
    named = tmp_path / "plain"
    named.mkdir()
    (named / "config.json").write_text(json.dumps({"_name_or_path": "acme/named-base"}))
    assert hub_model_id(str(named)) == "acme/named-base"
    # A model downloaded into the HF cache, then fine-tuned by qat (model.arch.pretrained = the snapshot folder).
    snapshot = tmp_path / "hub" / "models--acme--tiny-bitnet" / "snapshots" / "abc123"
    torch.manual_seed(0)
    arch = ArchConfig(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=4)
    build_model(arch).save_pretrained(snapshot)
    model = convert_to_qat(build_model(ArchConfig(pretrained=str(snapshot))), QuantConfig()).eval()
    assert base_model_provenance(model) == {"base_model": "acme/tiny-bitnet"}
    out = export_model(model, bpe_tokenizer_files(), tmp_path / "export", "hf", run_name="ft", global_step=2)
    card = _card(out)
    assert card.data.base_model == "acme/tiny-bitnet"
    assert "[acme/tiny-bitnet](https://huggingface.co/acme/tiny-bitnet)" in card.text
    assert str(tmp_path) not in card.content
    assert base_model_provenance(tiny_model(None)) == {}


@pytest.mark.slow
def test_qat_eval_rewrites_the_card_with_a_model_index_equal_to_eval_json(ternary_checkpoint, tmp_path):
    out = tmp_path / "export"
    assert main(["export", str(ternary_checkpoint), "--out_dir", str(out), "--dtype", "float32"]) == 0
    assert main(["eval", str(out), "--max_blocks", "2"]) == 0
    verify_export(out)
    evaluation = json.loads((out / "eval.json").read_text())
    card = _card(out)
    results = {r.metric_type: r for r in card.data.eval_results}
    assert set(results) == {"perplexity", "bits_per_byte"}
    assert results["perplexity"].metric_value == pytest.approx(evaluation["exported"]["perplexity"], rel=1e-6)
    assert results["bits_per_byte"].metric_value == pytest.approx(evaluation["exported"]["bits_per_byte"], rel=1e-6)
    assert results["perplexity"].dataset_type == "wikimedia/wikipedia"
    assert card.data.to_dict()["model-index"][0]["name"] == "tiny"
    assert "| exported |" in card.text and str(tmp_path) not in card.content


def test_suite_results_join_the_model_index_and_a_changed_value_is_a_disagreement():
    from qat.export.model_card import card_disagreement

    manifest = {"format": "hf", "model": {"model_type": "bitnet"}, "quant": {}, "bits_per_weight": 2.0,
                "scheme": {"name": "absmean_ternary", "description": "d", "bits": 1.58, "levels_count": 3},
                "provenance": {"run_name": "r", "global_step": 1, "data": {"tokenizer": "bpe", "seq_len": 64}}}
    evaluation = {"exported": {"perplexity": 300.5, "bits_per_byte": 2.5, "tokens": 10},
                  "suite": {"corpora": {"kjv": {"perplexity": 900.25, "bits_per_byte": 3.0, "tokens": 512}},
                            "probes": {"last_word": {"accuracy": 0.125, "chance": 0.01, "items": 8}}},
                  "suite_table": "| eval | perplexity |\n|---|---|\n| kjv | 900.25 |"}
    text = render_model_card("r", manifest, evaluation)
    results = {(r.dataset_type, r.metric_type): r.metric_value for r in ModelCard(text).data.eval_results}
    assert results == {("wikimedia/wikipedia", "perplexity"): 300.5, ("wikimedia/wikipedia", "bits_per_byte"): 2.5,
                       ("kjv", "perplexity"): 900.25, ("kjv", "bits_per_byte"): 3.0,
                       ("wikimedia/wikipedia", "accuracy"): 0.125}
    assert "| kjv | 900.25 |" in text
    assert card_disagreement(text, manifest, evaluation) is None
    evaluation["suite"]["corpora"]["kjv"]["perplexity"] = 901.0
    assert "perplexity on kjv" in card_disagreement(text, manifest, evaluation)
    del evaluation["suite"]
    assert "which eval.json lacks" in card_disagreement(text, manifest, evaluation)
