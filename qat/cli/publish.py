"""``qat publish EXPORT [--repo_id ORG/NAME] [--private] [--wandb]``: publish a verified, evaluated export to the
Hugging Face Hub and/or as a W&B model artifact of its training run (:mod:`qat.export.publish`)."""

import json
from typing import Optional

from qat.export.publish import publish_export


def publish(export: str, repo_id: Optional[str] = None, private: bool = False, wandb: bool = False) -> dict:
    """Publish an export folder written by `qat export` and evaluated by `qat eval`.

    Refused (exit 2, nothing uploaded): a file that does not match the manifest's SHA-256, no eval.json, an
    eval.json without the exported model's results, or a model card that disagrees with eval.json. Only the files
    the manifest lists are published, with a manifest copy that omits the local checkpoint path.

    Args:
        export: the export folder, e.g. runs/bitnet-b158-tiny-llamacpp/export-gguf-tq2_0.
        repo_id: Hugging Face Hub model repo ORG/NAME, created if missing. The token comes from HF_TOKEN or
            `hf auth login`; qat never stores it.
        private: create the Hub repo private.
        wandb: log the folder and its evaluation as a W&B model artifact in the training run (offline unless
            WANDB_API_KEY is set: stored in the run's wandb/ folder, `wandb sync` uploads it later).

    Raises:
        ExportError: a refused export, a malformed repo id, no token, or no training run for --wandb.
    """
    result = publish_export(export, repo_id=repo_id, private=private, log_to_wandb=wandb)
    print(json.dumps(result, indent=2))
    return result
