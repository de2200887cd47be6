"""The size-quality sweep: which points a sweep runs, what each one measured, the Pareto front, and the outputs
(``sweep.csv``, ``sweep.md``, ``pareto.png``).

A sweep of a recipe over bit widths has one full-precision point (the recipe trained without quantization), one
QAT point per bit width (trained with the scheme of that width) and one PTQ point per bit width (the FP point's
weights quantized with that scheme, no training). Each point is an ordinary run folder
(``RunLayout.for_run(f"{name}-w{bits}")``); it is finished when its export holds an ``eval.json``.

Model size is counted from the exported weight files: the bytes of every tensor (packed codes, scales,
embeddings, norms, full-precision layers) times 8, headers and tokenizers left out.
"""

import csv
import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from qat.checkpoint.layout import RunLayout
from qat.errors import ExportError, RecipeError

# Bit width -> scheme of a sweep unless ``--schemes`` says otherwise (the ParetoQ family).
DEFAULT_BIT_SCHEMES = {"1": "paretoq_1bit", "1.58": "paretoq_ternary", "2": "paretoq_2bit", "3": "paretoq_3bit",
                       "4": "paretoq_4bit"}
KINDS = ("fp", "ptq", "qat")
EVAL_FILE = "eval.json"
CSV_FILE, TABLE_FILE, PLOT_FILE = "sweep.csv", "sweep.md", "pareto.png"
CSV_COLUMNS = ("point", "size", "kind", "bits", "scheme", "format", "size_bits", "size_mib", "perplexity",
               "bits_per_byte", "run_dir")


@dataclass(frozen=True)
class SweepPoint:
    """One run of a sweep.

    Attributes:
        name: the run name (``<recipe run name>-w<bits>``, ``-fp``, ``-w<bits>-ptq``).
        kind: ``fp``, ``ptq`` or ``qat``.
        bits: the bit width label (``1.58``), ``16`` for the FP point.
        scheme: the quantization scheme, None for the FP point.
        export_format: the format the point is exported and evaluated in.
        run_dir: the point's run folder.
        size: the model-size label of a sweep over sizes ("" without one).
        size_args: the ``qat run`` overrides that give the model that size.
    """

    name: str
    kind: str
    bits: str
    scheme: Optional[str]
    export_format: str
    run_dir: Path
    size: str = ""
    size_args: tuple[str, ...] = ()

    @property
    def export_dir(self) -> Path:
        return RunLayout(self.run_dir).export_dir(self.export_format)

    @property
    def eval_file(self) -> Path:
        return self.export_dir / EVAL_FILE

    @property
    def finished(self) -> bool:
        """Evaluated: its export holds eval.json (an interrupted sweep skips it)."""
        return self.eval_file.is_file()


def parse_bits(bits: str | Sequence) -> list[str]:
    """``"1,1.58,4"`` (or a list) -> ``["1", "1.58", "4"]``; RecipeError for anything that is not a positive number."""
    items = [str(b).strip() for b in (bits.split(",") if isinstance(bits, str) else bits)]
    out = []
    for item in items:
        try:
            value = float(item)
        except ValueError:
            value = math.nan
        if not item or not value > 0 or value > 16:
            raise RecipeError(f"--bits {bits!r}: {item!r} is not a bit width; pass numbers such as 1,1.58,2,3,4")
        out.append(f"{value:g}")
    if len(set(out)) != len(out):
        raise RecipeError(f"--bits {bits!r} names a bit width twice")
    return out


def bit_schemes(bits: list[str], schemes: Optional[str | Sequence] = None,
                mapping: Optional[dict[str, str]] = None) -> dict[str, str]:
    """Bit width -> registered scheme name: ``schemes`` in the order of ``bits``, else ``mapping`` (default
    :data:`DEFAULT_BIT_SCHEMES`).

    Raises:
        RecipeError: a count mismatch, a bit width without a scheme, or a scheme that is not registered.
    """
    from qat.nn.schemes import get_scheme

    if schemes is not None:
        names = [s.strip() for s in (schemes.split(",") if isinstance(schemes, str) else schemes)]
        if len(names) != len(bits):
            raise RecipeError(f"--schemes names {len(names)} scheme(s) for {len(bits)} bit width(s) "
                              f"({','.join(bits)}); give one scheme per bit width, in the same order")
        chosen = dict(zip(bits, names))
    else:
        mapping = DEFAULT_BIT_SCHEMES if mapping is None else mapping
        missing = [b for b in bits if b not in mapping]
        if missing:
            raise RecipeError(f"no scheme for bit width(s) {', '.join(missing)}; pass --schemes with one scheme per "
                              f"bit width (known bit widths: {', '.join(mapping)})")
        chosen = {b: mapping[b] for b in bits}
    for name in chosen.values():
        get_scheme(name)                      # RecipeError listing the registered schemes
    return chosen


def plan_points(run_name: str, schemes: dict[str, str], fp: bool = True, ptq: bool = True,
                runs_root: Optional[Path] = None, sizes: Optional[dict[str, list[str]]] = None) -> list[SweepPoint]:
    """The points of a sweep in the order they run: per model size (one, or each of ``sizes``: label -> ``qat run``
    overrides), FP, then per bit width QAT (and PTQ, which needs that size's FP)."""
    from qat.export.formats import FULL_PRECISION_FORMAT, default_format_name

    def layout(name: str) -> Path:
        return RunLayout(Path(runs_root) / name).run_dir if runs_root else RunLayout.for_run(name).run_dir

    points = []
    for size, size_args in (sizes or {"": []}).items():
        prefix, extra = (f"{run_name}-{size}" if size else run_name), {"size": size, "size_args": tuple(size_args)}
        if fp:
            name = f"{prefix}-fp"
            points.append(SweepPoint(name, "fp", "16", None, FULL_PRECISION_FORMAT, layout(name), **extra))
        for bits, scheme in schemes.items():
            name = f"{prefix}-w{bits}"
            points.append(SweepPoint(name, "qat", bits, scheme, default_format_name(scheme), layout(name), **extra))
            if ptq and fp:
                name = f"{prefix}-w{bits}-ptq"
                points.append(SweepPoint(name, "ptq", bits, scheme, default_format_name(scheme), layout(name),
                                         **extra))
    return points


SIZE_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._]*$")


def check_sizes(sizes: Optional[dict[str, list[str]]]) -> Optional[dict[str, list[str]]]:
    """``--sizes`` checked: plain labels (they name run folders), each a list of ``--key=value`` overrides.

    Raises:
        RecipeError: naming the bad label or override.
    """
    if not sizes:
        return None
    checked = {}
    for label, args in sizes.items():
        if not isinstance(label, str) or not SIZE_LABEL.match(label):
            raise RecipeError(f"--sizes: label {label!r} must be letters, digits, '.' or '_' (it names run folders)")
        args = [args] if isinstance(args, str) else list(args or [])
        bad = [a for a in args if not (isinstance(a, str) and a.startswith("--") and "=" in a)]
        if not args or bad:
            raise RecipeError(f"--sizes: {label!r} needs qat run overrides like '--model.arch.hidden_size=128', "
                              f"got {bad or args}")
        checked[label] = args
    return checked


# --------------------------------------------------------------------------------------------- measurements
def _safetensors_tensor_bytes(path: Path) -> int:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return sum(end - start for key, v in header.items() if key != "__metadata__"
               for start, end in [v["data_offsets"]])


def _gguf_tensor_bytes(path: Path) -> int:
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors)


def model_size_bits(export_dir: str | Path) -> int:
    """Bits of the whole model as exported: every tensor's stored bytes in the folder's ``.safetensors`` and
    ``.gguf`` files (packed weights, scales and the full-precision parts), times 8.

    Raises:
        ExportError: the folder holds no weight file.
    """
    folder = Path(export_dir)
    total, files = 0, 0
    for path in sorted(folder.iterdir()):
        if path.suffix == ".safetensors":
            total, files = total + _safetensors_tensor_bytes(path), files + 1
        elif path.suffix == ".gguf":
            total, files = total + _gguf_tensor_bytes(path), files + 1
    if not files:
        raise ExportError(f"{folder} holds no .safetensors or .gguf weights; re-export the point")
    return total * 8


def point_row(point: SweepPoint) -> dict:
    """The CSV row of a finished point: held-out perplexity and bits/byte of its export, and its size."""
    results = json.loads(point.eval_file.read_text())
    metrics = results.get("exported") or results.get("qat_model") or {}
    size = model_size_bits(point.export_dir)
    return {"point": point.name, "size": point.size, "kind": point.kind, "bits": point.bits,
            "scheme": point.scheme or "",
            "format": point.export_format, "size_bits": size, "size_mib": round(size / 8 / 2**20, 4),
            "perplexity": metrics.get("perplexity"), "bits_per_byte": metrics.get("bits_per_byte"),
            "run_dir": str(point.run_dir)}


# ---------------------------------------------------------------------------------------------- the front
def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: none has a size <= and a quality value (lower is better) <=
    with one of them strictly smaller. Sorted by size."""
    front = []
    for i, (size, quality) in enumerate(points):
        dominated = any(s <= size and q <= quality and (s < size or q < quality)
                        for j, (s, q) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], points[i][1]))


def _quality(row: dict) -> tuple[str, Optional[float]]:
    """Bits/byte where the data gives it (comparable across tokenizers), else perplexity."""
    if row.get("bits_per_byte") is not None:
        return "bits/byte", float(row["bits_per_byte"])
    return "perplexity", None if row.get("perplexity") is None else float(row["perplexity"])


def write_csv(rows: list[dict], path: Path) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def markdown_table(rows: list[dict]) -> str:
    """The sweep as a markdown table, points on the Pareto front marked."""
    scored = [(float(r["size_bits"]), _quality(r)[1]) for r in rows]
    front = set(pareto_front([p for p in scored if p[1] is not None]))
    valid = [i for i, p in enumerate(scored) if p[1] is not None]
    on_front = {valid[i] for i in front}
    lines = ["| point | kind | bits | scheme | format | size (MiB) | perplexity | bits/byte | Pareto front |",
             "|---|---|---|---|---|---|---|---|---|"]
    for i, r in enumerate(rows):
        ppl = "" if r["perplexity"] is None else f"{float(r['perplexity']):.2f}"
        bpb = "" if r["bits_per_byte"] is None else f"{float(r['bits_per_byte']):.4f}"
        lines.append(f"| {r['point']} | {r['kind']} | {r['bits']} | {r['scheme'] or '-'} | {r['format']} | "
                     f"{float(r['size_mib']):.3f} | {ppl} | {bpb} | {'yes' if i in on_front else ''} |")
    return "\n".join(lines) + "\n"


def plot_pareto(rows: list[dict], out_png: Path, title: str = "") -> Path:
    """Quality (bits/byte, lower is better) vs model size, FP / PTQ / QAT marked apart, the front drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label = _quality(rows[0])[0] if rows else "bits/byte"
    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"fp": ("k", "*", "FP"), "ptq": ("tab:orange", "s", "PTQ (no training)"), "qat": ("tab:blue", "o", "QAT")}
    points = []
    for r in rows:
        q = _quality(r)[1]
        if q is None:
            continue
        points.append((float(r["size_mib"]), q))
        color, marker, _ = styles[r["kind"]]
        ax.scatter(float(r["size_mib"]), q, c=color, marker=marker, s=70, zorder=3)
        tag = f"{r['bits']}b" if r["kind"] != "fp" else "FP"
        ax.annotate(f"{r['size']} {tag}" if r.get("size") else tag, (float(r["size_mib"]), q),
                    textcoords="offset points", xytext=(5, 4), fontsize=8)
    for kind, (color, marker, name) in styles.items():
        if any(r["kind"] == kind for r in rows):
            ax.scatter([], [], c=color, marker=marker, label=name)
    front = pareto_front(points)
    if front:
        # Rings mark the front's points (a front of one point has no line to see).
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "-o", color="tab:green", lw=2,
                ms=15, mfc="none", mew=2, alpha=0.7, zorder=2, label="Pareto front")
    ax.set_xlabel("model size (MiB, every tensor as exported)")
    ax.set_ylabel(f"held-out {label} (lower is better)")
    ax.set_title(title or "size-quality sweep")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)


def write_sweep_outputs(points: list[SweepPoint], out_dir: Path, title: str = "") -> dict[str, Path]:
    """``sweep.csv``, ``sweep.md`` and ``pareto.png`` of the finished points in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [point_row(p) for p in points if p.finished]
    csv_path = write_csv(rows, out_dir / CSV_FILE)
    (out_dir / TABLE_FILE).write_text(markdown_table(rows))
    png = plot_pareto(rows, out_dir / PLOT_FILE, title)
    return {"csv": csv_path, "table": out_dir / TABLE_FILE, "plot": png}


# ---------------------------------------------------------------------------------------------- PTQ points
def write_ptq_checkpoint(fp_checkpoint: str | Path, quant, out_checkpoint: str | Path) -> Path:
    """``fp_checkpoint``'s model quantized with ``quant`` and no training (post-training quantization), saved as a
    ``qat fit`` checkpoint (so ``qat export`` / ``qat eval`` take it like any other).

    Raises:
        CheckpointError: ``fp_checkpoint`` is missing or not a full-precision ``qat fit`` checkpoint.
    """
    import io
    from dataclasses import asdict

    import torch

    from qat.checkpoint.trained import MODEL_PREFIX, load_trained_model
    from qat.errors import CheckpointError
    from qat.nn.convert import convert_to_qat
    from qat.paths import atomic_write_bytes

    if not Path(fp_checkpoint).exists():
        raise CheckpointError(f"the FP point's checkpoint {fp_checkpoint} does not exist; PTQ points quantize it "
                              "(rerun the sweep: the FP point is trained first)")
    trained = load_trained_model(str(fp_checkpoint))
    if trained.quant is not None:
        raise CheckpointError(f"{fp_checkpoint} is already quantized ({trained.quant.weight}); PTQ starts from the "
                              "full-precision point")
    model = convert_to_qat(trained.model, quant)         # scales initialised from the FP weights
    state = {MODEL_PREFIX + k: v.detach().clone() for k, v in model.state_dict().items()}
    checkpoint = {"state_dict": state, "hyper_parameters": {**trained.hparams, "quant": asdict(quant)},
                  "qat_tokenizer_files": trained.tokenizer_files,
                  "datamodule_hyper_parameters": trained.data_hparams, "global_step": trained.global_step}
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    atomic_write_bytes(Path(out_checkpoint), buffer.getvalue())
    return Path(out_checkpoint)
