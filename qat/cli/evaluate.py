"""``qat eval PATH``: held-out perplexity of an export (reloaded by the runtime its format names) and of the
training checkpoint it came from, and a check that the two compute the same model."""

import json
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from qat.checkpoint.deepspeed import is_deepspeed_checkpoint
from qat.checkpoint.integrity import state_dict_sha256
from qat.checkpoint.trained import TrainedModel, load_trained_model
from qat.errors import CheckpointError, ExportError, QATError
from qat.eval.agreement import check_agreement
from qat.eval.perplexity import heldout_metrics, logits_agreement, unigram_perplexity
from qat.export.folder import is_export, update_manifest_files, verify_export
from qat.export.formats import get_format
from qat.export.model_card import render_model_card

EVAL_FILE = "eval.json"
CARD_FILE = "README.md"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_exported_model(export_dir: str | Path, verify: bool = True) -> torch.nn.Module:
    """An export reloaded by its format's runtime (transformers for hf/hf-fp, qat's loaders for binary/GGUF),
    after checking every file against the manifest's SHA-256.

    Raises:
        ExportError: not an export, a file changed since export, or a file the runtime cannot read.
    """
    export_dir = Path(export_dir)
    manifest = verify_export(export_dir) if verify else json.loads((export_dir / "qat_export.json").read_text())
    fmt = get_format(manifest["format"])
    try:
        return fmt.load(export_dir).eval()
    except QATError:
        raise
    except Exception as e:  # safetensors/transformers/gguf errors on a damaged file
        raise ExportError(f"cannot load {export_dir} as a {fmt.name} export: {_one_line(e)}") from None


def classify_path(path: str) -> str:
    """``export`` or ``checkpoint``; CheckpointError for a missing path or anything else."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"no such path: {path}; pass an export folder (`qat export`) or a training checkpoint")
    if is_export(p):
        return "export"
    if p.is_file() and is_export(p.parent):
        raise CheckpointError(f"{path} is one file of the qat export {p.parent}; pass the folder: qat eval {p.parent}")
    if p.is_file() or is_deepspeed_checkpoint(p):
        return "checkpoint"
    raise CheckpointError(f"{path} is not a qat export or checkpoint (no qat_export.json, not a .ckpt file or "
                          "DeepSpeed checkpoint folder)")


def _source_model(manifest: dict) -> Optional[TrainedModel]:
    """The export's source checkpoint when it is still there; ExportError when its weights changed since."""
    checkpoint = manifest.get("source_checkpoint")
    if not checkpoint or not Path(checkpoint).exists():
        return None
    trained = load_trained_model(checkpoint)
    if manifest.get("weights_sha256") and state_dict_sha256(trained.model.state_dict()) != manifest["weights_sha256"]:
        raise ExportError(f"the source checkpoint {checkpoint} holds other weights than when this export was written "
                          "(training continued or it was replaced); re-export it with `qat export --force`")
    return trained


def evaluate(path: str, max_blocks: int = 0, batch_size: int = 8) -> dict:
    """Evaluate on the held-out split of the data the model was trained on.

    An export is checked first: every file against the SHA-256 in its manifest, then its logits against its
    source checkpoint's (when present) on the first batch of held-out blocks; a disagreement beyond the tolerance
    of its storage precision (:data:`qat.eval.agreement.AGREEMENT_TOLERANCES`) is an error, raised before the
    held-out evaluation, once eval.json holds the agreement.

    Args:
        path: an exported folder (from `qat export`; its source checkpoint is evaluated too when present) or a
            training checkpoint.
        max_blocks: evaluate only the first N held-out blocks (0 = all).
        batch_size: blocks per forward pass.

    Raises:
        CheckpointError: no such path, or neither an export nor a checkpoint.
        ExportError: a damaged or tampered export, or one that computes another model than its checkpoint.
    """
    from qat.data.datamodule import TextDataModule

    kind = classify_path(path)
    export_dir = Path(path) if kind == "export" else None
    if export_dir is not None:
        manifest = verify_export(export_dir)
        fmt = get_format(manifest["format"])
        exported = load_exported_model(export_dir, verify=False)
        trained = _source_model(manifest)
        data_hparams = (manifest.get("provenance") or {}).get("data")
    else:
        trained = load_trained_model(path)
        data_hparams = None
    data_hparams = data_hparams or (trained.data_hparams if trained else None)
    if not data_hparams:
        raise CheckpointError(f"cannot tell which data {path} was trained on (no data hyper-parameters)")
    data = TextDataModule(**{k: v for k, v in data_hparams.items() if not k.startswith("_")})
    data.setup()
    blocks = data.datasets["validation"].blocks
    blocks = blocks[:max_blocks] if max_blocks else blocks
    bpt = data.validation_bytes_per_token()
    results: dict = {"unigram_perplexity": unigram_perplexity(data.datasets["train"].blocks, blocks, data.vocab_size)}
    agreement_error = None
    if export_dir is not None and trained is not None:
        # Checked before the long evaluation: a wrong export fails fast.
        ids = torch.tensor(np.asarray(blocks[:batch_size]), dtype=torch.long)  # copy: blocks may be a read-only memmap
        with torch.no_grad():
            reference = fmt.reference(trained.model)(input_ids=ids).logits
            results["agreement"] = logits_agreement(reference, exported(input_ids=ids).logits)
        agreement_error = check_agreement(results["agreement"], manifest.get("dtype", "float32"),
                                          float(reference.abs().max()))
    if agreement_error:
        (export_dir / EVAL_FILE).write_text(json.dumps(results, indent=2))
        update_manifest_files(export_dir, [EVAL_FILE])
        print(json.dumps(results, indent=2))
        raise ExportError(agreement_error)
    if trained is not None:
        results["qat_model"] = heldout_metrics(lambda ids: trained.model(input_ids=ids).logits, blocks, batch_size,
                                               bpt, desc="eval qat model")
    if export_dir is not None:
        results["exported"] = heldout_metrics(lambda ids: exported(input_ids=ids).logits, blocks, batch_size, bpt,
                                              desc="eval exported")
        if fmt.packed_kernels:
            # The same export on qat's packed kernels (what `qat generate` runs).
            from qat.nn.packed_linear import pack_model

            packed = pack_model(exported)
            results["packed_kernels"] = heldout_metrics(lambda ids: packed(input_ids=ids).logits, blocks, batch_size,
                                                        bpt, desc="eval packed kernels")
        (export_dir / EVAL_FILE).write_text(json.dumps(results, indent=2))
        name = (manifest.get("provenance") or {}).get("run_name") or export_dir.name
        (export_dir / CARD_FILE).write_text(render_model_card(name, manifest, results))
        update_manifest_files(export_dir, [EVAL_FILE, CARD_FILE])
    print(json.dumps(results, indent=2))
    return results
