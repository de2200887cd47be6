"""``qat export CHECKPOINT [OUT_DIR] --format hf|hf-fp|gguf-tq2_0|gguf-tq1_0``: pack a trained checkpoint."""

from pathlib import Path
from typing import Literal, Optional

from qat.errors import ExportError
from qat.checkpoint.trained import load_trained_model
from qat.export.hf_bitnet import export_hf_bitnet, linear_bits_per_weight, write_export_folder
from qat.export.model_card import render_model_card

Format = Literal["hf", "hf-fp", "gguf-tq2_0", "gguf-tq1_0", "binary"]


def default_export_dir(checkpoint: str, fmt: str) -> Path:
    """``runs/<name>/checkpoints/last.ckpt`` -> ``runs/<name>/export-<fmt>``."""
    ckpt = Path(checkpoint)
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    return run_dir / f"export-{fmt}"


def export(checkpoint: str, out_dir: Optional[str] = None, format: Format = "hf", dtype: str = "bfloat16") -> str:
    """Pack a `qat fit` checkpoint (.ckpt file or DeepSpeed checkpoint folder) into a published format.

    Args:
        checkpoint: training checkpoint, e.g. runs/bitnet-b158-tiny/checkpoints/last.ckpt.
        out_dir: output folder (default: runs/<name>/export-<format>).
        format: hf (HF BitNet, 2-bit packed), hf-fp (plain HF folder, for full-precision runs),
            gguf-tq2_0 / gguf-tq1_0 (llama.cpp ternary GGUF), binary (fbi_binary/onebit runs: 1 bit/weight +
            scales, loads through qat only).
        dtype: dtype of the tensors that stay unpacked (embeddings, norms, lm_head, scales).

    Raises:
        ExportError: the checkpoint cannot be written in that format (e.g. not ternary for hf/gguf).
    """
    trained = load_trained_model(checkpoint)
    out = Path(out_dir) if out_dir else default_export_dir(checkpoint, format)
    manifest = {"format": format, "source_checkpoint": str(Path(checkpoint).resolve()),
                "global_step": trained.global_step, "data": trained.data_hparams}
    name = out.parent.name if out.parent.name != "." else out.name
    if format == "hf":
        export_hf_bitnet(trained, out, dtype=dtype, manifest=manifest)
        bits = linear_bits_per_weight(out)
        (out / "README.md").write_text(render_model_card(name, "hf-bitnet", trained, bits, source=checkpoint))
    elif format == "hf-fp":
        if trained.quant is not None:
            raise ExportError("--format hf-fp writes full-precision models; this checkpoint is quantized, use --format hf")
        from qat.export.hf_bitnet import DTYPES
        state = {k: v.to(DTYPES[dtype]).contiguous() for k, v in trained.model.state_dict().items()}
        if trained.arch.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        config = trained.model.config.to_dict()
        config["dtype"] = dtype
        config["architectures"] = [type(trained.model).__name__]
        write_export_folder(out, state, config, trained.tokenizer_files,
                            render_model_card(name, "hf-fp", trained, None, source=checkpoint), manifest)
    elif format == "binary":
        from qat.export.binary import export_binary
        export_binary(trained, out, manifest=manifest, source=checkpoint)
    else:
        from qat.export.gguf import export_gguf_from_trained
        out = export_gguf_from_trained(trained, out, format.split("-", 1)[1], manifest=manifest)
    print(f"exported {checkpoint} -> {out}")
    return str(out)
