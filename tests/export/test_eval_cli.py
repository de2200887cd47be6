"""`qat eval` checks what it evaluates: a missing path, a folder that is neither an export nor a checkpoint, a
damaged or tampered export, and an export that computes another model than its source checkpoint are each a
one-line error with exit code 2 (no traceback); a good export evaluates and its card and manifest stay valid."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qat.cli.main import main
from qat.export.folder import EXPORT_MANIFEST, update_manifest_files, verify_export
from tests.conftest import run_qat


def _export(checkpoint, out, *extra) -> None:
    assert main(["export", str(checkpoint), "--out_dir", str(out), "--dtype", "float32", *extra]) == 0


def _assert_clean_error(result, message: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("qat eval: error:")]
    assert len(errors) == 1, result.stderr[-2000:]


@pytest.mark.slow
def test_a_missing_path_and_a_random_folder_are_named(tmp_path):
    _assert_clean_error(run_qat("eval", str(tmp_path / "nowhere")), "no such path")
    (tmp_path / "random").mkdir()
    (tmp_path / "random" / "notes.txt").write_text("hi")
    _assert_clean_error(run_qat("eval", str(tmp_path / "random")), "not a qat export or checkpoint")


def test_a_file_of_an_export_points_to_its_folder(ternary_checkpoint, tmp_path, capsys):
    out = tmp_path / "export"
    _export(ternary_checkpoint, out)
    assert main(["eval", str(out / "model.safetensors")]) == 2
    assert f"pass the folder: qat eval {out}" in capsys.readouterr().err


@pytest.mark.slow
def test_a_tampered_export_and_a_corrupt_header_are_one_line_errors(ternary_checkpoint, tmp_path):
    out = tmp_path / "export"
    _export(ternary_checkpoint, out)
    weights = out / "model.safetensors"
    original = weights.read_bytes()
    data = bytearray(original)
    data[len(data) // 2] ^= 0x5A                      # one flipped byte in the tensor data
    weights.write_bytes(bytes(data))
    _assert_clean_error(run_qat("eval", str(out), "--max_blocks", "2"), "does not match the SHA-256")
    # A header that is not JSON, with the checksum updated so the loader itself meets it.
    weights.write_bytes(original[:8] + b"{not json" + original[17:])
    update_manifest_files(out, ["model.safetensors"])
    _assert_clean_error(run_qat("eval", str(out), "--max_blocks", "2"), "cannot load")


def test_an_export_that_disagrees_with_its_checkpoint_fails(ternary_checkpoint, tmp_path, capsys):
    out = tmp_path / "export"
    _export(ternary_checkpoint, out)
    weights = out / "model.safetensors"
    state = load_file(str(weights))
    state["model.embed_tokens.weight"] = torch.roll(state["model.embed_tokens.weight"], 1, dims=0)
    save_file(state, str(weights), metadata={"format": "pt"})
    update_manifest_files(out, ["model.safetensors"])  # consistent checksums: only the logits can tell
    assert main(["eval", str(out), "--max_blocks", "2"]) == 2
    err = capsys.readouterr().err
    assert "does not compute its source checkpoint's model" in err and "top-1 agreement" in err
    assert json.loads((out / "eval.json").read_text())["agreement"]["top1_agreement"] < 0.5
    verify_export(out)                                 # eval.json recorded in the manifest


@pytest.mark.slow
def test_a_good_export_evaluates_and_stays_verifiable(ternary_checkpoint, tmp_path, capsys):
    out = tmp_path / "export"
    _export(ternary_checkpoint, out)
    assert main(["eval", str(out), "--max_blocks", "2"]) == 0
    evaluation = json.loads((out / "eval.json").read_text())
    assert evaluation["agreement"]["top1_agreement"] == 1.0
    assert evaluation["exported"]["perplexity"] == pytest.approx(evaluation["qat_model"]["perplexity"], rel=1e-3)
    manifest = verify_export(out)
    assert {"eval.json", "README.md"} <= set(manifest["files"])
    card = (out / "README.md").read_text()
    assert "| exported |" in card and str(tmp_path) not in card


def test_packed_kernels_are_evaluated_through_the_packed_decoder(ternary_checkpoint, tmp_path, monkeypatch):
    """`qat eval` scores an HF BitNet export on the packed kernels through qat's PackedDecoder, with the loss of the
    packed HF model's forward (which it falls back to for a model the decoder does not run)."""
    from qat.cli.evaluate import evaluate
    from qat.nn.decoder import DecoderError, PackedDecoder

    out = tmp_path / "export"
    _export(ternary_checkpoint, out)
    decoded = evaluate(str(out), max_blocks=3, batch_size=2)["packed_kernels"]

    def refuse(self, model, int8_head=False):
        raise DecoderError("not this model")

    monkeypatch.setattr(PackedDecoder, "__init__", refuse)
    forward = evaluate(str(out), max_blocks=3, batch_size=2)["packed_kernels"]
    assert (decoded["runtime"], forward["runtime"]) == ("qat decoder", "HF forward")
    assert decoded["tokens"] == forward["tokens"] > 0
    assert decoded["nll_per_token"] == pytest.approx(forward["nll_per_token"], rel=1e-5)
    assert decoded["bits_per_byte"] == pytest.approx(forward["bits_per_byte"], rel=1e-5)


def test_a_changed_source_checkpoint_is_named(ternary_checkpoint, tmp_path, capsys):
    from qat.nn.config import QuantConfig
    from tests.export.conftest import tiny_model, write_checkpoint

    out = tmp_path / "export"
    _export(ternary_checkpoint, out)
    write_checkpoint(ternary_checkpoint, tiny_model(QuantConfig(), seed=1), QuantConfig())   # training went on
    assert main(["eval", str(out), "--max_blocks", "2"]) == 2
    assert "holds other weights" in capsys.readouterr().err
    assert EXPORT_MANIFEST in {p.name for p in out.iterdir()}


def test_generate_refuses_a_tampered_export(ternary_checkpoint, tmp_path, capsys):
    out = tmp_path / "export"
    _export(ternary_checkpoint, out)
    config = (out / "config.json").read_text()
    (out / "config.json").write_text(config.replace('"hidden_size": 64', '"hidden_size": 65'))
    assert main(["generate", str(out), "The"]) == 2
    assert "config.json does not match the SHA-256" in capsys.readouterr().err
