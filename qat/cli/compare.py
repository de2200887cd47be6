"""``qat compare RUN_OR_EXPORT ...``: the ``eval.json`` of several exports or runs side by side, printed as one
markdown table and plotted as a PNG (bits/byte and perplexity per corpus, probes beside their chance levels)."""

import json
import math
from pathlib import Path
from typing import Optional

from jsonargparse import ArgumentParser

from qat.errors import CheckpointError, RecipeError
from qat.export.folder import is_export

EVAL_FILE = "eval.json"
RUN_CHECKPOINT = Path("checkpoints") / "last.ckpt"
PROBE_LABELS = {"last_word": "last-word acc", "swap": "swap acc"}


def find_evaluations(path: str) -> list[tuple[str, Optional[Path], Path]]:
    """(label, eval.json or None when not evaluated yet, what ``qat eval`` would evaluate) for an export folder,
    or for each export of a run folder (a run without export: its ``checkpoints/last.ckpt``).

    Raises:
        CheckpointError: no such path, or a folder that is neither an export nor a run.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"no such path: {path}; pass export folders (`qat export`) or run folders (`qat run`)")
    if p.is_file() and p.name == EVAL_FILE:
        return [(p.parent.name, p, p.parent)]
    if is_export(p):
        return [(p.name, p / EVAL_FILE if (p / EVAL_FILE).is_file() else None, p)]
    if p.is_dir():
        exports = sorted(child for child in p.iterdir() if child.is_dir() and is_export(child))
        if exports:
            return [(f"{p.name}/{e.name}", e / EVAL_FILE if (e / EVAL_FILE).is_file() else None, e)
                    for e in exports]
        if (p / RUN_CHECKPOINT).is_file():
            return [(p.name, None, p / RUN_CHECKPOINT)]
    raise CheckpointError(f"{path} is neither a qat export (qat_export.json) nor a run folder with exports or "
                          f"{RUN_CHECKPOINT}")


def comparison_rows(evaluation: dict) -> dict[str, float]:
    """The comparable numbers of one eval.json, flattened to ``row label -> value``."""
    rows: dict[str, float] = {}
    main = evaluation.get("exported") or evaluation.get("qat_model")
    if main:
        rows["training held-out perplexity"] = main["perplexity"]
        if "bits_per_byte" in main:
            rows["training held-out bits/byte"] = main["bits_per_byte"]
    suite = evaluation.get("suite") or {}
    for corpus, m in suite.get("corpora", {}).items():
        rows[f"{corpus} perplexity"] = m["perplexity"]
        rows[f"{corpus} bits/byte"] = m["bits_per_byte"]
    for key, label in PROBE_LABELS.items():
        probe = suite.get("probes", {}).get(key)
        if probe:
            rows[label] = probe["accuracy"]
            rows[f"{label} (chance)"] = probe["chance"]
    ref = suite.get("reference")
    if ref:
        rows["KL to reference (nats/token)"] = ref["kl_nats_per_token"]
        rows["top-1 agreement with reference"] = ref["top1_agreement"]
    for task, metrics in (evaluation.get("lm_eval") or {}).items():
        for metric, value in metrics.items():
            if not metric.endswith("_stderr,none"):
                rows[f"lm-eval {task} {metric.split(',')[0]}"] = value
    return rows


def _cell(value: Optional[float]) -> str:
    if value is None or math.isnan(value):
        return "—"
    return f"{value:.4g}" if abs(value) < 10 else f"{value:.1f}"


def comparison_table(columns: dict[str, dict[str, float]]) -> str:
    """Markdown: one row per measure, one column per model (``—`` where a model lacks it)."""
    labels = list(dict.fromkeys(label for rows in columns.values() for label in rows))
    lines = ["| | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {label} | " + " | ".join(_cell(rows.get(label)) for rows in columns.values()) + " |"
              for label in labels]
    return "\n".join(lines)


def plot_comparison(columns: dict[str, dict[str, float]], out_png: Path) -> Path:
    """Grouped bars per corpus (bits/byte, perplexity on a log axis) and per probe, with chance as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    models = list(columns)
    corpora = list(dict.fromkeys(label[:-len(" bits/byte")] for rows in columns.values() for label in rows
                                 if label.endswith(" bits/byte")))
    probes = [label for label in PROBE_LABELS.values() if any(label in rows for rows in columns.values())]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    width = 0.8 / max(1, len(models))
    for ax, suffix, title in ((axes[0], " bits/byte", "bits per byte (lower is better)"),
                              (axes[1], " perplexity", "perplexity (own tokenizer; lower is better)")):
        x = np.arange(len(corpora))
        for i, model in enumerate(models):
            values = [columns[model].get(c + suffix, np.nan) for c in corpora]
            ax.bar(x + i * width, values, width, label=model)
        ax.set_xticks(x + width * (len(models) - 1) / 2, [c.replace("training held-out", "training") for c in corpora],
                      rotation=20)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    axes[1].set_yscale("log")
    ax = axes[2]
    x = np.arange(len(probes))
    for i, model in enumerate(models):
        ax.bar(x + i * width, [columns[model].get(p, np.nan) for p in probes], width, label=model)
    for j, probe in enumerate(probes):
        chances = [rows[f"{probe} (chance)"] for rows in columns.values() if f"{probe} (chance)" in rows]
        if chances:
            ax.hlines(max(chances), j - width / 2, j + width * (len(models) - 0.5), colors="k", linestyles="--",
                      label="chance" if j == 0 else None)
    ax.set_xticks(x + width * (len(models) - 1) / 2, probes)
    ax.set_ylim(0, 1)
    ax.set_title("zero-shot probes (accuracy)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def compare(paths: list[str], out: str = "qat-compare.png", evaluate: bool = False, force: bool = False,
            max_blocks: int = 0, suite_tokens: int = 16384, probe_items: int = 200) -> dict:
    """Print the side-by-side table of the evaluations of ``paths`` and plot it to ``out``.

    Args:
        paths: export folders, run folders (each of their exports is a column) or eval.json files.
        out: the PNG to write; an existing file is replaced only with ``force``.
        evaluate: run ``qat eval --suite`` on an export (or a run's last checkpoint) that has no eval.json yet;
            without it such a path is an error.
        force: replace ``out`` if it exists.
        max_blocks, suite_tokens, probe_items: passed to ``qat eval`` when ``evaluate`` runs it.

    Raises:
        CheckpointError: a path that is neither an export nor a run; one without eval.json (and no ``evaluate``).
        RecipeError: ``out`` exists (without ``force``), is not a .png or its folder does not exist.
    """
    out_png = Path(out)
    if out_png.suffix.lower() != ".png":
        raise RecipeError(f"--out {out}: the plot is a PNG; name it *.png")
    if not out_png.parent.is_dir():
        raise RecipeError(f"--out {out}: folder {out_png.parent} does not exist")
    if out_png.exists() and not force:
        raise RecipeError(f"--out {out} exists; pass --force to replace it or choose another name")
    found = [found for path in paths for found in find_evaluations(path)]
    missing = [label for label, eval_file, _ in found if eval_file is None]
    if missing and not evaluate:
        raise CheckpointError(f"no {EVAL_FILE} for {', '.join(missing)}; run `qat eval EXPORT --suite` first or pass "
                              "--evaluate")
    columns: dict[str, dict[str, float]] = {}
    for label, eval_file, target in found:
        if eval_file is not None:
            evaluation = json.loads(eval_file.read_text())
            if not isinstance(evaluation, dict):
                raise CheckpointError(f"{eval_file} is not a qat eval.json (not a JSON object)")
        else:
            from qat.cli.evaluate import evaluate as run_eval

            evaluation = run_eval(str(target), max_blocks=max_blocks, suite=True, suite_tokens=suite_tokens,
                                  probe_items=probe_items)
        columns[label] = comparison_rows(evaluation)
    table = comparison_table(columns)
    print(table)
    plot_comparison(columns, out_png)
    print(f"plot: {out_png}")
    return {"columns": columns, "table": table, "plot": str(out_png)}


def compare_cli(argv: list[str]) -> None:
    """``qat compare`` arguments (a list of paths, which jsonargparse's auto_cli cannot take positionally)."""
    from qat.cli.main import _option_name_with_underscores

    parser = ArgumentParser(prog="qat compare", description=compare.__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", help="export folders, run folders or eval.json files")
    parser.add_argument("--out", default="qat-compare.png", help="the PNG to write")
    parser.add_argument("--evaluate", action="store_true",
                        help="run `qat eval --suite` on a path that has no eval.json yet")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--max_blocks", type=int, default=0, help="with --evaluate: `qat eval --max_blocks`")
    parser.add_argument("--suite_tokens", type=int, default=16384, help="with --evaluate: `qat eval --suite_tokens`")
    parser.add_argument("--probe_items", type=int, default=200, help="with --evaluate: `qat eval --probe_items`")
    args = parser.parse_args([_option_name_with_underscores(a) for a in argv])
    compare(list(args.paths), out=args.out, evaluate=args.evaluate, force=args.force, max_blocks=args.max_blocks,
            suite_tokens=args.suite_tokens, probe_items=args.probe_items)
