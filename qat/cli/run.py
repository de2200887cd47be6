"""``qat run --config RECIPE [overrides]``: the whole path in one command — fit (or distill, for a recipe with a
teacher), export in the format the recipe's quantization scheme allows, evaluate the export."""

from pathlib import Path
from typing import Optional

import yaml

from qat.checkpoint.layout import RunLayout
from qat.cli.evaluate import evaluate
from qat.cli.export import export
from qat.errors import RecipeError
from qat.eval.plots import plot_loss_curves
from qat.export.formats import default_format_name

# `qat run` flag (not a recipe key): evaluate only the first N held-out blocks (0 = all).
EVAL_MAX_BLOCKS = "--eval_max_blocks"
DISTILL_KEYS = ("teacher", "distill")


def _config_files(args: list[str]) -> list[Path]:
    files = []
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            files.append(Path(args[i + 1]))
        elif arg.startswith("--config="):
            files.append(Path(arg.split("=", 1)[1]))
    return files


def uses_distillation(args: list[str]) -> bool:
    """True when a recipe of ``args`` has a ``model.teacher`` or ``model.distill`` section (a `qat distill` recipe)."""
    for path in _config_files(args):
        try:
            recipe = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise RecipeError(f"cannot read recipe {path}: {e}") from None
        model = recipe.get("model") if isinstance(recipe, dict) else None
        if isinstance(model, dict) and any(key in model for key in DISTILL_KEYS):
            return True
    return False


def split_run_args(args: list[str]) -> tuple[list[str], int]:
    """(the `qat fit` arguments, the eval block limit) of ``qat run``'s arguments."""
    fit_args, max_blocks, i = [], 0, 0
    while i < len(args):
        arg = args[i]
        if arg == EVAL_MAX_BLOCKS or arg.startswith(EVAL_MAX_BLOCKS + "="):
            value = arg.split("=", 1)[1] if "=" in arg else (args[i + 1] if i + 1 < len(args) else "")
            i += 1 if "=" in arg else 2
            try:
                max_blocks = int(value)
            except ValueError:
                raise RecipeError(f"{EVAL_MAX_BLOCKS} needs a number of blocks, got {value!r}") from None
            continue
        fit_args.append(arg)
        i += 1
    return fit_args, max_blocks


def run_pipeline(args: list[str], export_format: Optional[str] = None) -> dict:
    """Fit, export (``export_format``, default: the scheme's default format) and evaluate; returns the eval."""
    from qat.cli.fit import fit_cli

    fit_args, max_blocks = split_run_args(args)
    if uses_distillation(fit_args):
        from qat.train.distill_module import DistillationLanguageModel

        cli = fit_cli(["fit", *fit_args], model_class=DistillationLanguageModel)
    else:
        cli = fit_cli(["fit", *fit_args])
    trainer = cli.trainer
    layout = RunLayout(Path(trainer.default_root_dir))
    quant = cli.model.quant
    fmt = export_format or default_format_name(quant.weight if quant is not None else None)
    # force: a rerun of the recipe replaces its own previous export (and only a qat export).
    out = export(str(layout.last_checkpoint), str(layout.export_dir(fmt)), format=fmt, dtype="float32", force=True)
    results = evaluate(out, max_blocks=max_blocks)
    if trainer.is_global_zero:
        png = plot_loss_curves({cli.config.fit.run.name: trainer.default_root_dir}, layout.loss_plot)
        print(f"loss curves: {png}")
    return results
