"""Publishing an export: to the Hugging Face Hub (``huggingface_hub``) and/or as a W&B model artifact of its
training run. Only a verified, evaluated export is published: every file matches the manifest's SHA-256, and
``eval.json`` holds the exported model's evaluation, which the model card's ``model-index`` repeats.

What leaves the machine is exactly the files the manifest lists (a stray file in the folder is not uploaded) and a
copy of the manifest without the local path of the source checkpoint. The Hub token is read by
``huggingface_hub`` from ``HF_TOKEN`` or the user's ``hf auth login``; qat never passes, prints or stores it.

Example usage::

    from qat.export.publish import publish_export
    publish_export("runs/bitnet-b158-tiny-llamacpp/export-gguf-tq2_0", repo_id="my-org/bitnet-tiny-gguf",
                   log_to_wandb=True)
"""

import glob
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

from qat.errors import ExportError
from qat.export.folder import EXPORT_MANIFEST, verify_export
from qat.export.model_card import card_disagreement, exported_metrics

EVAL_FILE = "eval.json"      # written by `qat eval`
CARD_FILE = "README.md"      # the model card, rewritten by `qat eval`
REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
TRUE_WORDS = {"1", "true", "yes", "on"}


# ---------------------------------------------------------------------------------------------------- checks
def check_publishable(folder: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(manifest, evaluation)`` of an export fit to publish.

    Raises:
        ExportError: not a qat export, a file missing or changed since export (checksums), no ``eval.json`` in the
            manifest, an evaluation without the exported model's results (the last ``qat eval`` failed), or a
            model card whose model-index disagrees with ``eval.json``.
    """
    folder = Path(folder)
    manifest = verify_export(folder)
    files = manifest["files"]
    if EVAL_FILE not in files:
        raise ExportError(f"{folder} has not been evaluated (no {EVAL_FILE} in its manifest); run `qat eval {folder}` "
                          "before publishing")
    evaluation = json.loads((folder / EVAL_FILE).read_text())
    metrics = exported_metrics(evaluation)
    if not metrics:
        raise ExportError(f"{folder / EVAL_FILE} holds no evaluation of the exported model (the last `qat eval` "
                          f"failed, e.g. its logits disagreed with the checkpoint); fix the export and re-run "
                          f"`qat eval {folder}`")
    if CARD_FILE not in files:
        raise ExportError(f"{folder} has no model card ({CARD_FILE}) in its manifest; re-export it with `qat export`")
    disagreement = card_disagreement((folder / CARD_FILE).read_text(), manifest, evaluation)
    if disagreement:
        raise ExportError(f"{folder / CARD_FILE} disagrees with {EVAL_FILE} ({disagreement}); re-run "
                          f"`qat eval {folder}` to rewrite the card")
    return manifest, evaluation


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in TRUE_WORDS


def check_hub_target(repo_id: str) -> None:
    """ExportError unless ``repo_id`` is ``ORG/NAME``, the Hub is not switched off, and a token is available."""
    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not REPO_ID.fullmatch(repo_id):
        raise ExportError(f"--repo_id {repo_id!r} is not ORG/NAME (e.g. my-org/bitnet-b158-tiny)")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ExportError(f"--repo_id {repo_id!r}: {str(e).splitlines()[0]}") from None
    if _env_true("HF_HUB_OFFLINE"):
        raise ExportError("HF_HUB_OFFLINE is set in the environment: the Hub is switched off; unset it to publish")
    if not get_token():
        raise ExportError("no Hugging Face token: set HF_TOKEN in the environment or run `hf auth login` (qat never "
                          "stores the token)")


def training_run_dir(manifest: dict[str, Any], folder: Path) -> Path:
    """The run folder of the export's source checkpoint (where its W&B run lives).

    Raises:
        ExportError: the export records no source checkpoint, or its run folder is gone.
    """
    from qat.checkpoint.layout import RunLayout

    checkpoint = manifest.get("source_checkpoint")
    if not checkpoint:
        raise ExportError(f"{folder} records no source checkpoint, so its training run is unknown; --wandb logs the "
                          "artifact into that run: re-export from the run's checkpoint, or publish without --wandb")
    run_dir = RunLayout.of_checkpoint(checkpoint).run_dir
    if not run_dir.is_dir():
        raise ExportError(f"the training run folder {run_dir} of {folder} no longer exists; --wandb logs the "
                          "artifact into that run's W&B folder: publish without --wandb")
    return run_dir


# ---------------------------------------------------------------------------------------------------- staging
def stage_export(folder: Path, manifest: dict[str, Any], dest: Path) -> Path:
    """``dest`` holding exactly the files the manifest lists (hard links where possible) and the manifest without
    the local path of the source checkpoint (its ``files`` checksums still verify the copy)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in manifest["files"]:
        try:
            os.link(folder / name, dest / name)
        except OSError:
            shutil.copy2(folder / name, dest / name)
    public = {k: v for k, v in manifest.items() if k != "source_checkpoint"}
    (dest / EXPORT_MANIFEST).write_text(json.dumps(public, indent=2, sort_keys=True))
    verify_export(dest)
    return dest


# ---------------------------------------------------------------------------------------------------- targets
def upload_to_hub(staged: Path, repo_id: str, private: bool, message: str) -> str:
    """Create ``repo_id`` (kept if it exists) and upload the staged export; return the repo URL."""
    from huggingface_hub import HfApi

    api = HfApi()           # token: HF_TOKEN or the `hf auth login` cache, read by huggingface_hub itself
    url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    api.upload_folder(folder_path=str(staged), repo_id=repo_id, repo_type="model", commit_message=message,
                      allow_patterns=[glob.escape(p.name) for p in sorted(staged.iterdir())])
    return str(url)


def artifact_name(manifest: dict[str, Any], folder: Path) -> str:
    name = (manifest.get("provenance") or {}).get("run_name") or folder.name
    return re.sub(r"[^\w.-]", "-", f"{name}-{manifest['format']}")


def log_wandb_artifact(staged: Path, manifest: dict[str, Any], evaluation: dict[str, Any], run_dir: Path,
                       name: str, hub_url: Optional[str] = None) -> dict[str, Any]:
    """Log the staged export as a W&B ``model`` artifact in the training run (same run id when the run folder
    kept one; offline unless ``WANDB_API_KEY`` is set, so it is stored in ``<run>/wandb/`` and syncs later)."""
    import wandb

    from qat.train.wandb_logger import RUN_ID_FILE, offline_run_files, read_wandb_run, wandb_mode

    id_file = run_dir / RUN_ID_FILE
    run_id = id_file.read_text().strip() if id_file.is_file() else None
    runs = [read_wandb_run(f) for f in offline_run_files(run_dir)]
    project = next((r["project"] for r in reversed(runs) if r.get("project") and r.get("run_id") == run_id),
                   None) or "qat"
    prov = manifest.get("provenance") or {}
    metadata = {"format": manifest["format"], "scheme": (manifest.get("scheme") or {}).get("name"),
                "bits_per_weight": manifest.get("bits_per_weight"), "run_name": prov.get("run_name"),
                "global_step": prov.get("global_step"), "weights_sha256": manifest.get("weights_sha256"),
                "eval": evaluation, "hub_url": hub_url}
    env_service = os.environ.pop("WANDB_SERVICE", None)    # a service inherited from a parent holds other runs
    try:
        run = wandb.init(project=project, id=run_id, resume="allow", dir=str(run_dir), mode=wandb_mode("auto"),
                         name=prov.get("run_name"), reinit="create_new")
        artifact = wandb.Artifact(name, type="model", metadata=metadata,
                                  description=f"qat export ({manifest['format']}) of run {prov.get('run_name')}")
        artifact.add_dir(str(staged))                      # copied to W&B's staging area: syncs after we return
        aliases = ["latest"] + ([f"step-{prov['global_step']}"] if prov.get("global_step") is not None else [])
        run.log_artifact(artifact, aliases=aliases)
        info = {"run_id": run.id, "project": project, "artifact": name, "dir": str(run_dir / "wandb")}
        run.finish()
    finally:
        if env_service is not None:
            os.environ["WANDB_SERVICE"] = env_service
    return info


def publish_export(folder: str | Path, repo_id: Optional[str] = None, private: bool = False,
                   log_to_wandb: bool = False) -> dict[str, Any]:
    """Check, then publish the export at ``folder`` to the Hub (``repo_id``) and/or W&B; return where it went.

    Raises:
        ExportError: nothing to do, or any check of :func:`check_publishable`, :func:`check_hub_target`,
            :func:`training_run_dir` fails (all before anything is uploaded).
    """
    folder = Path(folder)
    if not repo_id and not log_to_wandb:
        raise ExportError("nothing to publish to: pass --repo_id ORG/NAME (Hugging Face Hub) and/or --wandb")
    if repo_id and not REPO_ID.fullmatch(repo_id):
        raise ExportError(f"--repo_id {repo_id!r} is not ORG/NAME (e.g. my-org/bitnet-b158-tiny)")
    if not folder.is_dir():
        raise ExportError(f"{folder} is not a folder; pass an export folder written by `qat export`")
    manifest, evaluation = check_publishable(folder)
    if repo_id:
        check_hub_target(repo_id)
    run_dir = training_run_dir(manifest, folder) if log_to_wandb else None
    result: dict[str, Any] = {}
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-publish-", dir=folder.parent))
    except OSError:
        tmp = Path(tempfile.mkdtemp(prefix="qat-publish-"))
    try:
        staged = stage_export(folder, manifest, tmp / folder.name)
        if repo_id:
            step = (manifest.get("provenance") or {}).get("global_step")
            result["hub"] = upload_to_hub(staged, repo_id, private,
                                          f"qat export {manifest['format']}" + (f" (step {step})" if step else ""))
        if run_dir is not None:
            result["wandb"] = log_wandb_artifact(staged, manifest, evaluation, run_dir, artifact_name(manifest, folder),
                                                 result.get("hub"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result
