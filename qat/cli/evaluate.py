"""``qat eval PATH``: held-out perplexity of an exported folder (reloaded by HF transformers) and of the
training checkpoint it came from, and whether their logits agree."""

import json
from pathlib import Path
from typing import Optional

import torch

from qat.data.datamodule import TextDataModule
from qat.errors import CheckpointError
from qat.eval.perplexity import heldout_metrics, logits_agreement, unigram_perplexity
from qat.checkpoint.trained import load_trained_model
from qat.export.hf_bitnet import EXPORT_MANIFEST, linear_bits_per_weight
from qat.export.model_card import render_model_card

EVAL_FILE = "eval.json"


def load_exported_model(export_dir: str | Path, dtype: torch.dtype = torch.float32):
    """Reload an exported folder with plain HF transformers (the other runtime), on CPU; 1-bit binary exports
    (which transformers cannot represent) through qat's loader."""
    from transformers import AutoModelForCausalLM

    from qat.export.binary import BINARY_MODEL_TYPE, load_binary_export

    if json.loads(Path(export_dir, "config.json").read_text()).get("model_type") == BINARY_MODEL_TYPE:
        return load_binary_export(export_dir).eval()

    return AutoModelForCausalLM.from_pretrained(str(export_dir), dtype=dtype, device_map="cpu").eval()


def evaluate(path: str, max_blocks: int = 0, batch_size: int = 8) -> dict:
    """Evaluate on the held-out split of the data the model was trained on.

    Args:
        path: an exported folder (from `qat export`; its source checkpoint is evaluated too when present) or a
            training checkpoint.
        max_blocks: evaluate only the first N held-out blocks (0 = all).
        batch_size: blocks per forward pass.
    """
    path_ = Path(path)
    export_dir = path_ if (path_ / "config.json").is_file() else None
    if export_dir is not None:
        manifest_file = export_dir / EXPORT_MANIFEST
        if not manifest_file.is_file():
            raise CheckpointError(f"{export_dir} has no {EXPORT_MANIFEST}; evaluate folders written by `qat export`")
        manifest = json.loads(manifest_file.read_text())
        checkpoint = manifest["source_checkpoint"]
        data_hparams = manifest["data"]
    else:
        checkpoint, data_hparams = path, None
    trained = load_trained_model(checkpoint) if Path(checkpoint).exists() else None
    data_hparams = data_hparams or (trained.data_hparams if trained else None)
    if not data_hparams:
        raise CheckpointError(f"cannot tell which data {path} was trained on (no data hyper-parameters)")
    data = TextDataModule(**{k: v for k, v in data_hparams.items() if not k.startswith("_")})
    data.setup()
    blocks = data.datasets["validation"].blocks
    blocks = blocks[:max_blocks] if max_blocks else blocks
    bpt = data.validation_bytes_per_token()
    results: dict = {"unigram_perplexity": unigram_perplexity(data.datasets["train"].blocks, blocks, data.vocab_size)}
    if trained is not None:
        results["qat_model"] = heldout_metrics(lambda ids: trained.model(input_ids=ids).logits, blocks, batch_size,
                                               bpt, desc="eval qat model")
    if export_dir is not None:
        exported = load_exported_model(export_dir)
        results["exported"] = heldout_metrics(lambda ids: exported(input_ids=ids).logits, blocks, batch_size, bpt,
                                              desc="eval exported")
        if manifest.get("format") == "hf":
            # The same export on qat's packed kernels (what `qat generate` runs).
            from qat.nn.packed_linear import pack_model

            packed = pack_model(exported)
            results["packed_kernels"] = heldout_metrics(lambda ids: packed(input_ids=ids).logits, blocks, batch_size,
                                                        bpt, desc="eval packed kernels")
        if trained is not None:
            ids = torch.as_tensor(blocks[:batch_size], dtype=torch.long)
            with torch.no_grad():
                results["agreement"] = logits_agreement(trained.model(input_ids=ids).logits,
                                                        exported(input_ids=ids).logits)
        (export_dir / EVAL_FILE).write_text(json.dumps(results, indent=2))
        if trained is not None and manifest.get("format") == "hf":
            card = render_model_card(export_dir.parent.name, "hf-bitnet", trained, linear_bits_per_weight(export_dir),
                                     results, source=checkpoint)
            (export_dir / "README.md").write_text(card)
    print(json.dumps(results, indent=2))
    return results
