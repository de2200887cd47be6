"""``qat run --config RECIPE [overrides]``: the whole path in one command — fit, export (packed), evaluate."""

from pathlib import Path

from qat.checkpoint.layout import RunLayout
from qat.cli.evaluate import evaluate
from qat.cli.export import export
from qat.eval.plots import plot_loss_curves


def run_pipeline(fit_args: list[str], export_format: str = "hf") -> dict:
    from qat.cli.fit import fit_cli

    cli = fit_cli(["fit", *fit_args])
    trainer = cli.trainer
    checkpoint = RunLayout(Path(trainer.default_root_dir)).last_checkpoint
    fmt = export_format if cli.model.quant is not None else "hf-fp"
    out = export(str(checkpoint), format=fmt, dtype="float32")
    results = evaluate(out)
    if trainer.is_global_zero:
        png = plot_loss_curves({cli.config.fit.run.name: trainer.default_root_dir},
                               Path(trainer.default_root_dir) / "loss.png")
        print(f"loss curves: {png}")
    return results
