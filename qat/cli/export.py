"""``qat export CHECKPOINT [--out_dir D] [--format F] [--force]``: pack a trained checkpoint into a published
format (:mod:`qat.export.formats`)."""

from pathlib import Path
from typing import Literal, Optional

from qat.checkpoint.layout import RunLayout
from qat.checkpoint.trained import TrainedModel, load_trained_model
from qat.errors import CheckpointError
from qat.export.api import export_model
from qat.export.folder import check_export_target
from qat.export.formats import EXPORT_FORMATS, default_format_name, get_format

Format = Literal[tuple(EXPORT_FORMATS)]  # the choices come from the table of formats


def provenance(trained: TrainedModel, checkpoint: str | Path) -> dict:
    """What the manifest and model card record about where an export came from (no local paths in the card)."""
    hp = trained.hparams
    teacher = hp.get("teacher")
    return {"run_name": RunLayout.of_checkpoint(checkpoint).name, "global_step": trained.global_step,
            "source_checkpoint": str(checkpoint), "data": trained.data_hparams, "optim": hp.get("optim"),
            "teacher": teacher, "distill": hp.get("distill") if teacher else None}


def export(checkpoint: str, out_dir: Optional[str] = None, format: Optional[Format] = None, dtype: str = "bfloat16",
           force: bool = False) -> str:
    """Pack a `qat fit` checkpoint (.ckpt file or DeepSpeed checkpoint folder) into a published format.

    Args:
        checkpoint: training checkpoint, e.g. runs/bitnet-b158-tiny/checkpoints/last.ckpt.
        out_dir: output folder (default: runs/<name>/export-<format>). It must be new, empty, or a previous qat
            export (replaced only with --force); any other folder is refused, never emptied.
        format: hf (HF BitNet, 2-bit packed), hf-fp (plain HF folder, for full-precision runs),
            gguf-tq2_0 / gguf-tq1_0 (llama.cpp ternary GGUF), gguf-q4_0 (llama.cpp Q4_0 of llama models:
            ParetoQ / row-scaled codes in [-8, 7]), binary (fbi_binary/onebit runs: 1 bit/weight + scales, loads
            through qat only), qat-packed (ParetoQ codes at their true bit width + scales, loads through qat only).
            Default: the format the checkpoint's quantization scheme exports to.
        dtype: dtype of the tensors that stay unpacked (embeddings, norms, lm_head, scales) in hf / hf-fp.
        force: replace a previous qat export at out_dir.

    Raises:
        ExportError: the checkpoint cannot be written in that format, or out_dir may not be replaced.
    """
    if not Path(checkpoint).exists():
        raise CheckpointError(f"checkpoint {checkpoint} does not exist (no such path); pass a .ckpt file or DeepSpeed "
                              "checkpoint folder written "
                              "by `qat fit` (e.g. runs/<name>/checkpoints/last.ckpt)")
    layout = RunLayout.of_checkpoint(checkpoint)
    protected = [checkpoint, layout.run_dir]
    if format:
        get_format(format)
    if out_dir:  # refuse a wrong target before the (slow) checkpoint load
        check_export_target(out_dir, force, protected)
    trained = load_trained_model(checkpoint)
    fmt = format or default_format_name(trained.quant.weight if trained.quant else None)
    out = Path(out_dir) if out_dir else layout.export_dir(fmt)
    folder = export_model(trained.model, trained.tokenizer_files, out, fmt, dtype=dtype, force=force,
                          protected=protected, **provenance(trained, checkpoint))
    print(f"exported {checkpoint} -> {folder}")
    return str(folder)
