"""QAT from a pretrained model: ``model.arch.pretrained`` sources are checked before anything is built, the data
must use the model's tokenizer, a local HF folder loads with its weights, self-distillation needs a pretrained
model, and (slow) the SmolLM2 4-bit recipe runs end to end through `qat run` into a reloaded qat-packed export."""

import json
from pathlib import Path

import pytest
import torch

from qat.cli.main import main
from qat.errors import RecipeError
from qat.nn.config import ArchConfig, QuantConfig
from qat.nn.convert import build_model, check_pretrained_tokenizer, convert_to_qat
from tests.conftest import REPO, run_qat

RECIPE_4BIT = str(REPO / "recipes" / "smollm2-135m-4bit.yaml")
RECIPE_TERNARY = str(REPO / "recipes" / "smollm2-135m-ternary.yaml")


def test_pretrained_source_is_checked_when_the_recipe_loads(tmp_path):
    with pytest.raises(RecipeError, match=r"model\.arch\.pretrained='.*nope' does not exist; set"):
        ArchConfig(pretrained=str(tmp_path / "nope"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(RecipeError, match=r"is a file but not a \.gguf"):
        ArchConfig(pretrained=str(tmp_path / "weights.bin"))
    with pytest.raises(RecipeError, match="has no config.json"):
        ArchConfig(pretrained=str(tmp_path))
    assert ArchConfig(pretrained="smollm2").pretrained == "smollm2"


def _tiny_hf_folder(tmp_path: Path) -> Path:
    """A small pretrained Llama saved as an HF folder with the cached BPE tokenizer."""
    from tests.export.conftest import bpe_tokenizer_files

    torch.manual_seed(0)
    model = build_model(ArchConfig(family="llama", vocab_size=4096, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2))
    folder = tmp_path / "pretrained"
    model.save_pretrained(folder)
    for name, text in bpe_tokenizer_files().items():
        (folder / name).write_text(text)
    return folder


def test_a_local_hf_folder_loads_with_its_weights_and_quantizes(tmp_path):
    folder = _tiny_hf_folder(tmp_path)
    original = build_model(ArchConfig(pretrained=str(folder)))
    again = build_model(ArchConfig(pretrained=str(folder)))
    assert all(torch.equal(a, b) for a, b in zip(original.state_dict().values(), again.state_dict().values()))
    quantized = convert_to_qat(build_model(ArchConfig(pretrained=str(folder))),
                               QuantConfig(weight="paretoq_4bit", granularity="row", activation="none"))
    q_proj = quantized.model.layers[0].self_attn.q_proj
    assert torch.equal(q_proj.weight, original.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(q_proj.alpha, original.model.layers[0].self_attn.q_proj.weight.abs().amax(1) / 7)


def test_data_with_another_tokenizer_is_refused(tmp_path):
    folder = _tiny_hf_folder(tmp_path)
    check_pretrained_tokenizer(str(folder), folder)   # the model's own tokenizer passes
    from qat.data.tokenizer import tokenizer_dir

    smollm2 = tokenizer_dir("smollm2", [], "text", 0, "")
    with pytest.raises(RecipeError, match=r"trained with its own tokenizer \(4096 tokens\).*\(49152 tokens\); set "
                                          rf"data\.tokenizer: {folder}"):
        check_pretrained_tokenizer(str(folder), smollm2)


def _exit_code(args: list[str]) -> int:
    try:
        return main(args)
    except SystemExit as e:
        return e.code


def test_recipe_with_the_wrong_data_tokenizer_fails_before_training(tmp_path, capsys):
    code = _exit_code(["fit", "--config", RECIPE_4BIT, "--data.tokenizer=bpe", "--trainer.max_steps=1",
                       f"--trainer.default_root_dir={tmp_path / 'run'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "model.arch.pretrained='smollm2' was trained with its own tokenizer" in err
    assert "set data.tokenizer: smollm2" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_self_distillation_needs_a_pretrained_model():
    from qat.teachers.load import TeacherConfig
    from qat.train.distill_module import DistillationLanguageModel

    with pytest.raises(RecipeError, match="model.teacher.source: self .* needs model.arch.pretrained"):
        DistillationLanguageModel(ArchConfig(vocab_size=64), QuantConfig(), teacher=TeacherConfig(source="self"))


def test_pretrained_recipes_use_paretoq_fine_tuning_defaults():
    import yaml

    for recipe in (RECIPE_4BIT, RECIPE_TERNARY):
        cfg = yaml.safe_load(Path(recipe).read_text())
        assert cfg["model"]["arch"]["pretrained"] == "smollm2" and cfg["data"]["tokenizer"] == "smollm2"
        optim = cfg["model"]["optim"]
        assert (optim["schedule"], optim["lr"], optim["warmup_steps"], optim["weight_decay"]) == \
            ("cosine", 2.0e-5, 0, 0.0)
        assert "Budget:" in Path(recipe).read_text()


@pytest.mark.slow
def test_smollm2_4bit_recipe_runs_into_a_reloaded_packed_export(tmp_path):
    from qat.checkpoint.trained import load_trained_model
    from qat.export.qat_packed import load_packed_export

    run_dir = tmp_path / "run"
    result = run_qat("run", "--config", RECIPE_4BIT, f"--trainer.default_root_dir={run_dir}",
                     "--trainer.max_steps=3", "--trainer.val_check_interval=3", "--trainer.limit_val_batches=2",
                     "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false", "--data.seq_len=64",
                     "--data.batch_size=2", "--data.max_train_blocks=8", "--data.max_val_blocks=4",
                     "--run.wandb_mode=offline", "--eval_max_blocks=4")
    assert result.returncode == 0, result.stderr[-4000:]
    assert "held-out perplexity FP" in result.stdout and "PTQ (paretoq_4bit, no training)" in result.stdout
    export = run_dir / "export-qat-packed"
    manifest = json.loads((export / "qat_export.json").read_text())
    assert manifest["format"] == "qat-packed" and 4 <= manifest["bits_per_weight"] < 4.1
    trained = load_trained_model(str(run_dir / "checkpoints" / "last.ckpt"))
    reloaded = load_packed_export(export)
    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, trained.model(input_ids=ids).logits)
    # The run started from SmolLM2's weights (not a fresh init): 3 AdamW steps at lr 2e-5 move each embedding
    # by at most ~6e-5, while the pretrained embeddings are O(0.1).
    original = build_model(ArchConfig(pretrained="smollm2"))
    drift = (reloaded.model.embed_tokens.weight - original.model.embed_tokens.weight).abs().max().item()
    assert drift < 1e-3 < original.model.embed_tokens.weight.abs().max().item()
    assert json.loads((export / "eval.json").read_text())
