"""Every recipe through `qat run` (a few steps): trains (`qat distill`'s module for recipes with a teacher),
exports in the format its quantization scheme allows, reloads the export in that format's runtime and evaluates
it against the checkpoint."""

import json

import pytest

from qat.cli.run import split_run_args, uses_distillation
from qat.errors import RecipeError
from tests.conftest import REPO, run_qat

RECIPES = sorted(p.name for p in (REPO / "recipes").glob("*.yaml"))
EXPECTED_FORMAT = {"bitnet-b158-tiny.yaml": "hf", "bitnet-b1-binary-tiny.yaml": "hf", "fp-baseline-tiny.yaml": "hf-fp",
                   "bitnet-b158-tiny-llamacpp.yaml": "hf", "fp-baseline-tiny-fp8.yaml": "hf-fp",
                   "fbi-binary-tiny-ad.yaml": "binary", "fbi-binary-tiny-ce.yaml": "binary",
                   "smollm2-135m-4bit.yaml": "qat-packed", "smollm2-135m-ternary.yaml": "qat-packed"}
# Recipes whose `qat run` another test already drives end to end with stronger checks (a second run here would
# only repeat ~75 s of the suite): recipe -> that test.
RUN_ELSEWHERE = {"smollm2-135m-4bit.yaml":
                 "tests/spine/test_pretrained.py::test_smollm2_4bit_recipe_runs_into_a_reloaded_packed_export"}
FEW_STEPS = ["--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
             "--run.checkpoint_every_n_steps=2", "--trainer.enable_progress_bar=false", "--model.optim.warmup_steps=1",
             "--data.max_train_blocks=8", "--data.max_val_blocks=2", "--data.seq_len=64", "--data.batch_size=2",
             "--eval_max_blocks=2"]


def test_every_recipe_has_an_expected_format():
    assert sorted(EXPECTED_FORMAT) == RECIPES


def test_recipes_run_elsewhere_are_run_there():
    for recipe, test in RUN_ELSEWHERE.items():
        path, name = test.split("::")
        assert recipe in RECIPES and f"def {name}(" in (REPO / path).read_text()


def test_no_recipe_pins_its_run_folder():
    """The run folder is ``$QAT_RUNS_DIR/<run.name>`` (default ``runs/``); a pinned ``trainer.default_root_dir`` would
    ignore the user's ``QAT_RUNS_DIR``."""
    import yaml

    pinned = [name for name in RECIPES
              if "default_root_dir" in (yaml.safe_load((REPO / "recipes" / name).read_text()).get("trainer") or {})]
    assert pinned == []


def test_distillation_recipes_are_recognised_and_eval_flag_is_split_off():
    assert uses_distillation(["--config", str(REPO / "recipes" / "fbi-binary-tiny-ad.yaml")])
    assert not uses_distillation([f"--config={REPO / 'recipes' / 'fbi-binary-tiny-ce.yaml'}"])
    assert split_run_args(["--a=1", "--eval_max_blocks", "3", "--b"]) == (["--a=1", "--b"], 3)
    with pytest.raises(RecipeError, match="eval_max_blocks"):
        split_run_args(["--eval_max_blocks=many"])


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [r for r in RECIPES if r not in RUN_ELSEWHERE])
def test_recipe_trains_exports_and_evaluates(tmp_path, recipe):
    run_dir = tmp_path / "run"
    extra = ["--model.distill.mode=online"] if recipe.endswith("-ad.yaml") else []   # no teacher cache needed
    result = run_qat("run", "--config", str(REPO / "recipes" / recipe), *FEW_STEPS, *extra,
                     f"--trainer.default_root_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    fmt = EXPECTED_FORMAT[recipe]
    export_dir = run_dir / f"export-{fmt}"
    manifest = json.loads((export_dir / "qat_export.json").read_text())
    assert manifest["format"] == fmt and manifest["provenance"]["global_step"] == 2
    evaluation = json.loads((export_dir / "eval.json").read_text())
    assert evaluation["agreement"]["top1_agreement"] >= 0.999
    assert evaluation["exported"]["perplexity"] == pytest.approx(evaluation["qat_model"]["perplexity"], rel=1e-3)
    assert (run_dir / "loss.png").is_file()
