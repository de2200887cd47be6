"""`qat publish`: only a verified, evaluated export leaves the machine, and exactly its manifest's files.

No Hub is reachable here, so the Hub tests stop at the exact upload call: `HfApi.create_repo` and
`HfApi.upload_folder` are replaced by recorders of their arguments (the only mock in these tests; everything before
the call is real). The W&B artifact is real: logged by the real CLI into an offline run and read back from it."""

import base64
import hashlib
import json
import shutil
from pathlib import Path

import pytest

from qat.cli.main import main
from qat.export.folder import EXPORT_MANIFEST, update_manifest_files, verify_export
from qat.nn.config import QuantConfig
from tests.conftest import run_qat
from tests.export.conftest import tiny_model, write_checkpoint

TOKEN = "hf_qatTestTokenNeverWritten0123456789"
RUN_ID = "pubtest12345"


@pytest.fixture(scope="module")
def evaluated_export(tmp_path_factory) -> Path:
    """runs/tiny/export-hf of a tiny ternary checkpoint, evaluated by the real `qat eval` (the run folder keeps a
    W&B run id, as `qat fit` leaves it)."""
    root = tmp_path_factory.mktemp("published")
    quant = QuantConfig()
    ckpt = write_checkpoint(root / "runs" / "tiny" / "checkpoints" / "last.ckpt", tiny_model(quant), quant)
    (root / "runs" / "tiny" / "wandb_run_id").write_text(RUN_ID)
    out = root / "runs" / "tiny" / "export-hf"
    assert main(["export", str(ckpt), "--out_dir", str(out), "--dtype", "float32"]) == 0
    assert main(["eval", str(out), "--max_blocks", "2"]) == 0
    return out


@pytest.fixture
def export_copy(evaluated_export, tmp_path) -> Path:
    """A copy of the evaluated export next to the same run folder layout (so its source checkpoint is found)."""
    out = evaluated_export.parent / f"export-copy-{tmp_path.name}"
    shutil.copytree(evaluated_export, out)
    yield out
    shutil.rmtree(out, ignore_errors=True)


@pytest.fixture
def hub_calls(monkeypatch):
    """Record HfApi.create_repo / upload_folder calls (and the folder as it is at the upload) instead of making
    them; a token in the environment only (never passed by qat)."""
    from huggingface_hub import HfApi

    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, *, folder_path, repo_id, **kwargs):
        folder = Path(folder_path)
        files = {p.name: p.read_bytes() for p in folder.iterdir()}
        calls.append(("upload_folder", repo_id, {**kwargs, "folder_path": folder_path, "files": files,
                                                 "manifest_verifies": bool(verify_export(folder))}))

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return calls


def _refused(capsys, args: list[str], message: str) -> None:
    assert main(["publish", *args]) == 2
    err = capsys.readouterr().err
    assert "qat publish: error:" in err and message in err, err


@pytest.mark.slow
def test_publish_uploads_exactly_the_verified_files(export_copy, hub_calls, capsys):
    (export_copy / "notes-with-secrets.txt").write_text("not part of the export")
    assert main(["publish", str(export_copy), "--repo-id", "my-org/bitnet-tiny", "--private"]) == 0
    (create, repo, create_kwargs), (upload, repo2, upload_kwargs) = hub_calls
    assert (create, repo, upload, repo2) == ("create_repo", "my-org/bitnet-tiny", "upload_folder", "my-org/bitnet-tiny")
    assert create_kwargs == {"repo_type": "model", "private": True, "exist_ok": True}
    manifest = json.loads((export_copy / EXPORT_MANIFEST).read_text())
    uploaded = upload_kwargs["files"]
    assert set(uploaded) == set(manifest["files"]) | {EXPORT_MANIFEST}          # the stray file stays home
    assert upload_kwargs["manifest_verifies"] and upload_kwargs["repo_type"] == "model"
    assert all(uploaded[name] == (export_copy / name).read_bytes() for name in manifest["files"])
    public = json.loads(uploaded[EXPORT_MANIFEST])
    assert "source_checkpoint" in manifest and "source_checkpoint" not in public
    assert str(export_copy.parents[2]) not in uploaded[EXPORT_MANIFEST].decode() + uploaded["README.md"].decode()
    # The token is read by huggingface_hub from the environment: qat neither passes nor writes it.
    assert TOKEN not in repr(hub_calls)
    assert not [p for p in export_copy.parents[2].rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert not list(export_copy.parent.glob(f".{export_copy.name}-publish-*"))   # staging removed
    assert '"hub": "https://huggingface.co/my-org/bitnet-tiny"' in capsys.readouterr().out


@pytest.mark.slow
def test_a_tampered_or_unevaluated_export_is_refused_before_any_upload(export_copy, hub_calls, capsys):
    args = [str(export_copy), "--repo_id", "my-org/bitnet-tiny"]
    weights = export_copy / "model.safetensors"
    original = weights.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0x5A
    weights.write_bytes(bytes(data))
    _refused(capsys, args, "does not match the SHA-256")
    weights.write_bytes(original)
    # eval.json edited and re-checksummed: the card's model-index no longer agrees with it.
    evaluation = json.loads((export_copy / "eval.json").read_text())
    evaluation["exported"]["perplexity"] /= 2
    (export_copy / "eval.json").write_text(json.dumps(evaluation))
    update_manifest_files(export_copy, ["eval.json"])
    _refused(capsys, args, "re-run `qat eval")
    # What a failed `qat eval` leaves: eval.json with the agreement only.
    (export_copy / "eval.json").write_text(json.dumps({"agreement": {"top1_agreement": 0.01}}))
    update_manifest_files(export_copy, ["eval.json"])
    _refused(capsys, args, "holds no evaluation of the exported model")
    (export_copy / "eval.json").unlink()
    _refused(capsys, args, "lacks eval.json")
    assert hub_calls == []


def test_an_export_never_evaluated_is_refused(tmp_path, hub_calls, capsys):
    quant = QuantConfig()
    ckpt = write_checkpoint(tmp_path / "runs" / "t" / "checkpoints" / "last.ckpt", tiny_model(quant), quant)
    out = tmp_path / "export"
    assert main(["export", str(ckpt), "--out_dir", str(out), "--dtype", "float32"]) == 0
    _refused(capsys, [str(out), "--repo_id", "my-org/x"], f"run `qat eval {out}` before publishing")
    _refused(capsys, [str(out), "--repo_id", "not-an-org-slash-name"], "is not ORG/NAME")
    _refused(capsys, [str(out)], "nothing to publish to")
    assert hub_calls == []


@pytest.mark.slow
def test_no_token_or_an_offline_hub_is_refused(export_copy, hub_calls, monkeypatch, tmp_path, capsys):
    from huggingface_hub import get_token

    args = [str(export_copy), "--repo_id", "my-org/bitnet-tiny"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _refused(capsys, args, "HF_HUB_OFFLINE is set")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_TOKEN")
    if get_token():
        pytest.skip("this machine has a Hugging Face login; the no-token refusal cannot be shown here")
    _refused(capsys, args, "no Hugging Face token")
    assert hub_calls == []


def _md5_b64(path: Path) -> str:
    return base64.b64encode(hashlib.md5(path.read_bytes()).digest()).decode()


@pytest.mark.slow
def test_wandb_artifact_is_in_the_training_runs_offline_run(export_copy, monkeypatch, tmp_path):
    from qat.train.wandb_logger import offline_run_files, read_wandb_artifacts

    for key in ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR"):      # W&B's staging stays in tmp
        monkeypatch.setenv(key, str(tmp_path / key.lower()))
    run_dir = export_copy.parent
    before = set(offline_run_files(run_dir))
    result = run_qat("publish", str(export_copy), "--wandb")
    assert result.returncode == 0, result.stderr[-3000:]
    new = sorted(set(offline_run_files(run_dir)) - before)
    assert len(new) == 1 and new[0].name == f"run-{RUN_ID}.wandb"          # the training run's id
    (artifact,) = read_wandb_artifacts(new[0])
    manifest = json.loads((export_copy / EXPORT_MANIFEST).read_text())
    assert artifact["type"] == "model" and artifact["run_id"] == RUN_ID and artifact["name"] == "tiny-hf"
    assert set(artifact["files"]) == set(manifest["files"]) | {EXPORT_MANIFEST}
    for name in manifest["files"]:
        assert artifact["files"][name] == _md5_b64(export_copy / name), name
    assert artifact["metadata"]["eval"] == json.loads((export_copy / "eval.json").read_text())
    assert artifact["metadata"]["global_step"] == 7 and "step-7" in artifact["aliases"]
