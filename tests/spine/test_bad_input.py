"""Bad recipes, data and checkpoints fail fast, with a message that names the problem, before any training."""

import json
from pathlib import Path

import pytest

from qat.cli.main import main
from tests.conftest import REPO, run_qat, run_qat_concurrently

RECIPE = str(REPO / "recipes" / "bitnet-b158-tiny.yaml")


def _fit(tmp_path: Path, *overrides: str) -> int:
    try:
        return main(["fit", "--config", RECIPE, f"--trainer.default_root_dir={tmp_path / 'run'}",
                     "--trainer.max_steps=1", *overrides])
    except SystemExit as e:  # jsonargparse exits 2 on a bad recipe, after printing the error
        return e.code


def _assert_nothing_trained(tmp_path: Path) -> None:
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("override,message", [
    ("--model.quant.wieght=absmean_ternary", "wieght"),
    ("--trainer.max_stepz=3", "max_stepz"),
    ("--data.seq_len=long", "seq_len"),
    ("--model.arch.hidden_size=2.5", "hidden_size"),
])
def test_unknown_key_or_wrong_type_in_recipe(tmp_path, capsys, override, message):
    assert _fit(tmp_path, override) == 2
    assert message in capsys.readouterr().err
    _assert_nothing_trained(tmp_path)


def test_unknown_key_in_recipe_file(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(Path(RECIPE).read_text().replace("  seq_len: 256", "  seq_len: 256\n  shuffle_buffer: 9"))
    try:
        code = main(["fit", "--config", str(recipe), f"--trainer.default_root_dir={tmp_path / 'run'}"])
    except SystemExit as e:
        code = e.code
    assert code == 2 and "shuffle_buffer" in capsys.readouterr().err
    _assert_nothing_trained(tmp_path)


def test_unknown_quantizer_name(tmp_path, capsys):
    assert _fit(tmp_path, "--model.quant.weight=absmax_ternery") == 2
    err = capsys.readouterr().err
    assert "unknown quantization scheme 'absmax_ternery'" in err and "absmean_ternary" in err
    _assert_nothing_trained(tmp_path)


def test_missing_data_file(tmp_path, capsys):
    missing = tmp_path / "nope.jsonl"
    assert _fit(tmp_path, f"--data.train_files=[{missing}]", f"--data.val_files=[{missing}]") == 2
    err = capsys.readouterr().err
    assert "file(s) not found" in err and str(missing) in err
    _assert_nothing_trained(tmp_path)


def test_missing_checkpoint_for_export(tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing.ckpt")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_export_of_a_full_precision_checkpoint_is_refused(tmp_path):
    run_dir = tmp_path / "fp"
    fit = run_qat("fit", "--config", str(REPO / "recipes" / "fp-baseline-tiny.yaml"), "--trainer.max_steps=2",
                  "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false", "--data.batch_size=2",
                  f"--trainer.default_root_dir={run_dir}")
    assert fit.returncode == 0, fit.stderr[-3000:]
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    # The refused format, and the supported route for a full-precision model (its default format, e.g. for a
    # distillation teacher), run side by side.
    result, supported = run_qat_concurrently(
        ["export", str(ckpt), "--out_dir", str(tmp_path / "out"), "--format", "hf"],
        ["export", str(ckpt), "--out_dir", str(tmp_path / "fp-out")])
    assert result.returncode == 2
    assert "full precision" in result.stderr and "hf-fp" in result.stderr
    assert not (tmp_path / "out").exists()
    assert supported.returncode == 0, supported.stderr[-3000:]
    assert json.loads((tmp_path / "fp-out" / "qat_export.json").read_text())["format"] == "hf-fp"
    assert (tmp_path / "fp-out" / "model.safetensors").is_file()
