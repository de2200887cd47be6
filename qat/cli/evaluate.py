"""``qat eval PATH``: held-out perplexity of an export (reloaded by the runtime its format names) and of the
training checkpoint it came from, and a check that the two compute the same model; with ``--suite``, also the
evaluation suite (corpora, probes, reference agreement) and, with ``--lm_eval_tasks``, lm-eval tasks."""

import json
import sys
from dataclasses import replace
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
from qat.eval.suite import SuiteConfig, check_reference_tokenizer, run_suite, suite_table_markdown
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


def evaluate(path: str, max_blocks: int = 0, batch_size: int = 8, suite: bool = False,
             reference: Optional[str] = None, suite_corpora: Optional[list[str]] = None, suite_tokens: int = 16384,
             probe_items: int = 200, lm_eval_tasks: Optional[list[str]] = None, lm_eval_limit: int = 0) -> dict:
    """Evaluate on the held-out split of the data the model was trained on.

    An export is checked first: every file against the SHA-256 in its manifest, then its logits against its
    source checkpoint's (when present) on the first batch of held-out blocks; a disagreement beyond the tolerance
    of its storage precision (:data:`qat.eval.agreement.AGREEMENT_TOLERANCES`) is an error, raised before the
    held-out evaluation, once eval.json holds the agreement. An export whose format runs on qat's packed kernels is
    also scored on them (``packed_kernels``), through qat's packed decoder as `qat generate` runs it.

    Args:
        path: an exported folder (from `qat export`; its source checkpoint is evaluated too when present) or a
            training checkpoint.
        max_blocks: evaluate only the first N held-out blocks (0 = all).
        batch_size: blocks per forward pass.
        suite: also run the evaluation suite (``qat/eval/suite.py``) on the export (or the checkpoint's model):
            perplexity and bits/byte on every installed corpus, the last-word and word-swap probes with their
            chance levels; its table goes into eval.json and the model card.
        reference: an export or checkpoint with the same tokenizer (e.g. the FP baseline or a teacher); the suite
            reports KL(reference || model) and top-1 agreement. Implies ``suite``.
        suite_corpora: corpora of the suite (default: wikipedia, kjv, shakespeare, python-docs; one not installed
            is skipped with a note).
        suite_tokens: held-out tokens per corpus in the suite.
        probe_items: items per zero-shot probe.
        lm_eval_tasks: lm-eval task YAML files (e.g. a task over local JSONL: ``dataset_path: json``,
            ``dataset_kwargs: {data_files: ...}``) run through lm-eval's HFLM on the same model.
        lm_eval_limit: at most N documents per lm-eval task (0 = all).

    Raises:
        CheckpointError: no such path, or neither an export nor a checkpoint.
        ExportError: a damaged or tampered export, or one that computes another model than its checkpoint.
    """
    from qat.data.datamodule import TextDataModule

    kind = classify_path(path)
    # Every option is checked before any model is loaded or evaluated.
    suite = suite or reference is not None
    suite_config = SuiteConfig(corpora=tuple(suite_corpora) if suite_corpora else SuiteConfig.corpora,
                               budget_tokens=suite_tokens, probe_items=probe_items, batch_size=batch_size)
    if reference is not None:
        classify_path(reference)
    if lm_eval_tasks:
        from qat.eval.lm_eval_adapter import check_task_files

        check_task_files(lm_eval_tasks)
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
    suite_config = replace(suite_config, seq_len=int(data_hparams.get("seq_len", 256)))
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
            source_logits = fmt.reference(trained.model)(input_ids=ids).logits
            results["agreement"] = logits_agreement(source_logits, exported(input_ids=ids).logits)
        agreement_error = check_agreement(results["agreement"], manifest.get("dtype", "float32"),
                                          float(source_logits.abs().max()))
    if agreement_error:
        (export_dir / EVAL_FILE).write_text(json.dumps(results, indent=2))
        update_manifest_files(export_dir, [EVAL_FILE])
        print(json.dumps(results, indent=2))
        raise ExportError(agreement_error)
    if trained is not None:
        results["qat_model"] = heldout_metrics(lambda ids: trained.model(input_ids=ids).logits, blocks, batch_size,
                                               bpt, desc="eval qat model")
    evaluated = exported if export_dir is not None else trained.model
    if suite:
        results.update(_suite(evaluated, data, suite_config, reference))
    if lm_eval_tasks:
        from qat.eval.lm_eval_adapter import evaluate_lm_eval_tasks

        results["lm_eval"] = evaluate_lm_eval_tasks(evaluated, data.tokenizer, lm_eval_tasks, batch_size,
                                                    lm_eval_limit)
    if export_dir is not None:
        results["exported"] = heldout_metrics(lambda ids: exported(input_ids=ids).logits, blocks, batch_size, bpt,
                                              desc="eval exported")
        if fmt.packed_kernels:
            results["packed_kernels"] = _packed_kernels_metrics(exported, blocks, batch_size, bpt)
        (export_dir / EVAL_FILE).write_text(json.dumps(results, indent=2))
        name = (manifest.get("provenance") or {}).get("run_name") or export_dir.name
        (export_dir / CARD_FILE).write_text(render_model_card(name, manifest, results))
        update_manifest_files(export_dir, [EVAL_FILE, CARD_FILE])
    print(json.dumps(results, indent=2))
    if "suite_table" in results:
        print(results["suite_table"])
    return results


def _packed_kernels_metrics(exported: torch.nn.Module, blocks, batch_size: int, bytes_per_token: float) -> dict:
    """Held-out metrics of ``exported`` on qat's packed kernels, computed as `qat generate` runs it: through qat's
    ``PackedDecoder`` (its logits equal the packed model's), or the packed HF model's forward for a model the decoder
    does not run. ``runtime`` says which."""
    from qat.nn.decoder import DecoderError, PackedDecoder
    from qat.nn.packed_linear import pack_model

    packed = pack_model(exported)
    try:
        logits_fn, runtime = PackedDecoder(packed).sequence_logits, "qat decoder"
    except DecoderError as err:
        print(f"[qat] evaluating the packed kernels with the HF forward: {err}", file=sys.stderr)
        logits_fn, runtime = (lambda ids: packed(input_ids=ids).logits), "HF forward"
    metrics = heldout_metrics(logits_fn, blocks, batch_size, bytes_per_token, desc="eval packed kernels")
    return {**metrics, "runtime": runtime}


def _suite(model: torch.nn.Module, data, config: SuiteConfig, reference: Optional[str]) -> dict:
    """The suite's results and table for ``model``, tokenized with the tokenizer it was trained with."""
    reference_fn = None
    if reference is not None:
        from qat.eval.loading import load_model_and_tokenizer

        ref_model, ref_tokenizer = load_model_and_tokenizer(reference)
        check_reference_tokenizer(data.tokenizer, ref_tokenizer, reference)
        reference_fn = lambda ids: ref_model(input_ids=ids).logits  # noqa: E731
    counts = np.bincount(np.asarray(data.datasets["train"].blocks).reshape(-1), minlength=data.vocab_size)
    suite = run_suite(lambda ids: model(input_ids=ids).logits, data.tokenizer, config, reference_fn, counts)
    if reference is not None:
        suite["reference"]["path"] = str(reference)
    return {"suite": suite, "suite_table": suite_table_markdown(suite)}
