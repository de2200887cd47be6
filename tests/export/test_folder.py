"""The shared export folder I/O never loses a user's files: it replaces only a previous qat export, swaps
atomically, cleans up after a failed write, writes readable files, refuses crafted tokenizer names and
non-finite weights, and records checksums that catch a changed file."""

import hashlib
import json
import os
import stat

import pytest
import torch

from qat.cli.main import main
from qat.errors import ExportError
from qat.export import export_model, get_format
from qat.export.folder import EXPORT_MANIFEST, verify_export
from qat.nn.config import QuantConfig
from tests.export.conftest import bpe_tokenizer_files, tiny_model


@pytest.fixture(scope="module")
def tokenizer_files():
    return bpe_tokenizer_files()


@pytest.fixture(scope="module")
def ternary():
    return tiny_model(QuantConfig())


def _leftovers(parent):
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


def test_a_folder_that_is_not_an_export_is_refused_and_keeps_its_files(tmp_path, ternary, tokenizer_files):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("my work")
    for force in (False, True):
        with pytest.raises(ExportError, match="not a qat export"):
            export_model(ternary, tokenizer_files, target, force=force)
        assert (target / "notes.txt").read_text() == "my work" and sorted(os.listdir(target)) == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ExportError, match="is a file"):
        export_model(ternary, tokenizer_files, tmp_path / "file")
    assert (tmp_path / "file").read_text() == "x"
    assert not _leftovers(tmp_path)


def test_a_second_export_replaces_the_first_only_with_force(tmp_path, ternary, tokenizer_files):
    out = export_model(ternary, tokenizer_files, tmp_path / "export")
    (tmp_path / "empty").mkdir()
    assert export_model(ternary, tokenizer_files, tmp_path / "empty").is_dir()       # an empty folder is fine
    (out / "stale.bin").write_text("from the first export")
    with pytest.raises(ExportError, match="--force"):
        export_model(ternary, tokenizer_files, out)
    assert (out / "stale.bin").is_file()
    export_model(ternary, tokenizer_files, out, force=True)
    assert not (out / "stale.bin").exists()                    # the old export was replaced as a whole
    verify_export(out)
    assert not _leftovers(tmp_path)


def test_the_working_directory_and_the_run_folder_are_refused(tmp_path, ternary, tokenizer_files, monkeypatch):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_text("weights")
    monkeypatch.chdir(run)
    for out in (".", str(tmp_path)):
        with pytest.raises(ExportError, match="working directory"):
            export_model(ternary, tokenizer_files, out, force=True)
    # Even a previous export is not replaced while it is the working directory.
    previous = export_model(ternary, tokenizer_files, tmp_path / "previous")
    monkeypatch.chdir(previous)
    with pytest.raises(ExportError, match="working directory"):
        export_model(ternary, tokenizer_files, ".", force=True)
    assert (previous / EXPORT_MANIFEST).is_file()
    monkeypatch.chdir(tmp_path)
    for out in (run, run / "checkpoints"):
        with pytest.raises(ExportError, match="source checkpoint"):
            export_model(ternary, tokenizer_files, out, force=True, protected=[run / "checkpoints" / "last.ckpt", run])
    assert (run / "checkpoints" / "last.ckpt").read_text() == "weights"


def test_a_failed_write_keeps_the_previous_export_and_leaves_no_temp_folder(tmp_path, ternary, tokenizer_files,
                                                                            monkeypatch):
    import qat.export.hf_bitnet as hf_bitnet

    out = export_model(ternary, tokenizer_files, tmp_path / "export")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def half_written(state, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(hf_bitnet, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        export_model(ternary, tokenizer_files, out, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not _leftovers(tmp_path)
    with pytest.raises(OSError, match="disk full"):
        export_model(ternary, tokenizer_files, tmp_path / "new")
    assert not (tmp_path / "new").exists() and not _leftovers(tmp_path)


def test_exports_are_readable_by_everyone(tmp_path, ternary, tokenizer_files):
    out = export_model(ternary, tokenizer_files, tmp_path / "export")
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o644}


def test_an_unwritable_parent_is_a_one_line_error(tmp_path, ternary, tokenizer_files, monkeypatch):
    import tempfile

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    with pytest.raises(ExportError, match="permission denied") as e:
        export_model(ternary, tokenizer_files, tmp_path / "export")
    assert "\n" not in str(e.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_parent_is_a_one_line_error(tmp_path, ternary, tokenizer_files):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        with pytest.raises(ExportError, match="permission denied"):
            export_model(ternary, tokenizer_files, parent / "export")
    finally:
        parent.chmod(0o755)


@pytest.mark.parametrize("name", ["../escaped.json", "<absolute>", "sub/dir.json", ".."])
def test_tokenizer_file_names_with_folders_are_refused(tmp_path, ternary, tokenizer_files, name):
    absolute = tmp_path / "abs-escape.json"
    name = str(absolute) if name == "<absolute>" else name
    crafted = {**tokenizer_files, name: "{}"}
    with pytest.raises(ExportError, match="unsafe tokenizer file name"):
        export_model(ternary, crafted, tmp_path / "a" / "export")
    assert not (tmp_path / "a" / "escaped.json").exists() and not (tmp_path / "escaped.json").exists()
    assert not absolute.exists()
    assert not (tmp_path / "a" / "export").exists() and not _leftovers(tmp_path / "a")


def test_manifest_holds_the_sha256_of_every_file_and_catches_a_flipped_byte(tmp_path, ternary, tokenizer_files):
    out = export_model(ternary, tokenizer_files, tmp_path / "export")
    manifest = json.loads((out / EXPORT_MANIFEST).read_text())
    files = sorted(p.name for p in out.iterdir() if p.name != EXPORT_MANIFEST)
    assert sorted(manifest["files"]) == files
    for name in files:                                        # an independent digest of the bytes on disk
        assert manifest["files"][name] == hashlib.sha256((out / name).read_bytes()).hexdigest()
    weights = out / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ExportError, match="model.safetensors does not match the SHA-256"):
        verify_export(out)


def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, tokenizer_files):
    model = tiny_model(QuantConfig())
    with torch.no_grad():
        model.model.norm.weight[3] = float("nan")
    with pytest.raises(ExportError, match="model.norm.weight"):
        export_model(model, tokenizer_files, tmp_path / "export")
    assert not (tmp_path / "export").exists()


@pytest.mark.parametrize("quant,fmt", [(QuantConfig(), "hf"), (None, "hf-fp"),
                                       (QuantConfig(weight="fbi_binary", activation="none"), "binary")])
def test_default_format_follows_the_scheme_and_reloads_with_the_same_logits(tmp_path, tokenizer_files, quant, fmt):
    model = tiny_model(quant, family="bitnet" if fmt != "binary" else "llama")
    out = export_model(model, tokenizer_files, tmp_path / "export", run_name="tiny", global_step=5)
    manifest = verify_export(out)
    assert manifest["format"] == fmt
    reloaded = get_format(fmt).load(out)
    ids = torch.randint(0, 4096, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=2e-3)
    card = (out / "README.md").read_text()
    assert "run `tiny`, checkpoint at step 5" in card and str(tmp_path) not in card


def test_the_binary_card_describes_the_binary_scheme_with_measured_bits(tmp_path, tokenizer_files):
    from qat.nn.schemes import get_scheme

    out = export_model(tiny_model(QuantConfig(weight="onebit", activation="none"), family="llama"),
                       tokenizer_files, tmp_path / "export")
    card = (out / "README.md").read_text()
    assert get_scheme("onebit").description in card and "ternary" not in card.lower()
    bits = json.loads((out / "config.json").read_text())["bits_per_linear_weight"]
    assert f"{bits:.4f} bits/weight" in card


def test_qat_export_refuses_the_run_folder_and_the_working_directory(ternary_checkpoint, capsys, monkeypatch):
    run = ternary_checkpoint.parent.parent
    (run / "wandb").mkdir()
    (run / "wandb" / "run.log").write_text("log")
    monkeypatch.chdir(run)
    assert main(["export", str(ternary_checkpoint), "--out_dir", ".", "--force"]) == 2
    assert "working directory" in capsys.readouterr().err
    monkeypatch.chdir(run.parent)
    assert main(["export", str(ternary_checkpoint), "--out_dir", str(run), "--force"]) == 2
    assert "source checkpoint" in capsys.readouterr().err
    assert (run / "wandb" / "run.log").read_text() == "log" and ternary_checkpoint.is_file()
    # The default folder works, a second export needs --force.
    assert main(["export", str(ternary_checkpoint)]) == 0
    assert main(["export", str(ternary_checkpoint)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["export", str(ternary_checkpoint), "--force"]) == 0
    assert verify_export(run / "export-hf")["provenance"]["run_name"] == "tiny"


@pytest.mark.parametrize("name", ["hf", "hf-fp", "gguf-tq2_0", "gguf-tq1_0", "gguf-q4_0", "binary", "qat-packed"])
def test_each_format_refuses_a_model_it_cannot_hold_and_names_the_format_that_can(tmp_path, tokenizer_files, name):
    from qat.export.formats import EXPORT_FORMATS

    assert set(EXPORT_FORMATS) == {"hf", "hf-fp", "gguf-tq2_0", "gguf-tq1_0", "gguf-q4_0", "binary", "qat-packed"}
    models = {"hf-fp": tiny_model(None), "binary": tiny_model(QuantConfig(weight="fbi_binary", activation="none"),
                                                              family="llama"),
              "qat-packed": tiny_model(QuantConfig(weight="paretoq_4bit", granularity="row", activation="none"),
                                       family="llama")}
    from qat.export.exporter import model_scheme

    for right, model in models.items():
        scheme = model_scheme(model)
        if right == name or (scheme is not None and name in scheme.export_formats):
            continue   # a format the scheme lists holds it (ParetoQ codes also fit GGUF Q4_0)
        with pytest.raises(ExportError, match=f"--format {right}"):
            export_model(model, tokenizer_files, tmp_path / "export", name)
        assert not (tmp_path / "export").exists()
