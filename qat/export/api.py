"""``export_model``: write any qat model (a ``TrainedModel``'s or one a user converted) with its tokenizer in a
format of :mod:`qat.export.formats`, through the shared folder I/O of :mod:`qat.export.folder`."""

from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable, Optional

from torch import nn

from qat.checkpoint.integrity import state_dict_sha256
from qat.export.exporter import check_dtype, check_one_setting, model_quant, model_scheme
from qat.export.folder import check_export_target, check_finite, tokenizer_files_of, write_export_folder
from qat.export.formats import default_format, get_format
from qat.export.model_card import base_model_provenance, render_model_card

MODEL_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "vocab_size", "tie_word_embeddings")


def export_model(model: nn.Module, tokenizer: Any, out_dir: str | Path, format: Optional[str] = None, *,
                 dtype: str = "float32", force: bool = False, protected: Iterable[str | Path] = (),
                 **provenance: Any) -> Path:
    """Export ``model`` and its tokenizer to ``out_dir``; return the folder.

    Args:
        model: an HF causal LM, converted by qat (quantized layers) or full precision.
        tokenizer: an HF tokenizer, or ``{file name: text}`` of its files (as a qat checkpoint stores them).
        out_dir: the export folder; must not exist, be empty, or (with ``force``) be a previous qat export.
        format: a name of :data:`qat.export.formats.EXPORT_FORMATS`; None = the scheme's default format.
        dtype: dtype of the tensors the format keeps unpacked (hf, hf-fp).
        force: replace a previous qat export at ``out_dir`` (never any other folder).
        protected: paths ``out_dir`` must not hold (the source checkpoint, its run folder).
        **provenance: recorded in the manifest and the model card, e.g. ``run_name``, ``global_step``,
            ``source_checkpoint`` (manifest only; ``qat eval`` compares against it), ``data``, ``optim``,
            ``teacher``, ``distill``. JSON values.

    Example usage::

        from qat.export import export_model
        folder = export_model(qat_model, tokenizer, "exports/my-model", run_name="my-run", global_step=1000)

    Raises:
        ExportError: the format cannot hold the model exactly (the message says which format can), non-finite
            weights, or an ``out_dir`` that qat may not replace.
    """
    fmt = get_format(format) if format else default_format(model)
    check_dtype(dtype)
    out = check_export_target(out_dir, force, protected)
    check_one_setting(model, fmt)
    fmt.check(model)
    check_finite(model.state_dict())
    scheme, quant = model_scheme(model), model_quant(model)
    provenance = {**base_model_provenance(model), **provenance}    # the Hub id a fine-tune started from
    config = model.config.to_dict() if hasattr(model, "config") else {}
    manifest: dict[str, Any] = {
        "format": fmt.name, "dtype": dtype if fmt.uses_dtype else "float32",
        "model": {k: config[k] for k in MODEL_KEYS if k in config},
        "quant": asdict(quant) if quant else None,
        "scheme": {"name": scheme.name, "description": scheme.description, "bits": scheme.bits,
                   "levels_count": len(scheme.levels)} if scheme else None,
        "weights_sha256": state_dict_sha256(model.state_dict()),
        "provenance": {k: v for k, v in provenance.items() if k != "source_checkpoint"},
    }
    if provenance.get("source_checkpoint"):
        manifest["source_checkpoint"] = str(Path(provenance["source_checkpoint"]).resolve())
    name = provenance.get("run_name") or out.name

    def write_contents(folder: Path) -> None:
        fmt.write(model, folder, dtype)
        manifest["bits_per_weight"] = fmt.bits_per_weight(folder)
        (folder / "README.md").write_text(render_model_card(name, manifest))

    return write_export_folder(out, write_contents, tokenizer_files_of(tokenizer), manifest, force, protected)
