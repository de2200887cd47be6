"""`qat compare`: the side-by-side table and PNG of several evaluations; its refusals; a real run end to end."""

import json

import matplotlib.image
import pytest

from qat.cli.compare import compare, comparison_rows, comparison_table, find_evaluations
from qat.errors import CheckpointError, RecipeError
from tests.conftest import run_qat


def _evaluation(ppl: float, swap: float) -> dict:
    """An eval.json as `qat eval --suite` writes it (the fields compare reads)."""
    return {"unigram_perplexity": 1000.0,
            "exported": {"perplexity": ppl, "bits_per_byte": 2.0, "tokens": 100, "nll_per_token": 1.0},
            "suite": {"corpora": {"wikipedia": {"perplexity": ppl, "bits_per_byte": 2.25, "tokens": 64},
                                  "kjv": {"perplexity": ppl / 2, "bits_per_byte": 1.5, "tokens": 64}},
                      "probes": {"last_word": {"accuracy": 0.1, "chance": 0.002, "items": 10},
                                 "swap": {"accuracy": swap, "chance": 0.5, "items": 10}},
                      "reference": {"kl_nats_per_token": 0.3, "top1_agreement": 0.7, "tokens": 64},
                      "skipped": {}}}


def _eval_files(tmp_path) -> list[str]:
    paths = []
    for name, ppl, swap in (("ternary", 333.6, 0.75), ("fp", 329.25, 0.8125)):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "eval.json").write_text(json.dumps(_evaluation(ppl, swap)))
        paths.append(str(folder / "eval.json"))
    return paths


def test_rows_and_table_put_models_side_by_side(tmp_path):
    rows = comparison_rows(_evaluation(333.6, 0.75))
    assert rows["wikipedia perplexity"] == 333.6 and rows["kjv bits/byte"] == 1.5
    assert rows["swap acc"] == 0.75 and rows["swap acc (chance)"] == 0.5 and rows["last-word acc (chance)"] == 0.002
    assert rows["top-1 agreement with reference"] == 0.7
    table = comparison_table({"ternary": rows, "fp": comparison_rows(_evaluation(329.25, 0.8125))})
    assert table.splitlines()[0] == "| | ternary | fp |"
    assert "| wikipedia perplexity | 333.6 | 329.2 |" in table
    assert "| swap acc | 0.75 | 0.8125 |" in table
    # A model lacking a measure shows a dash, not a number.
    assert "| extra | — | 1 |" in comparison_table({"a": {}, "b": {"extra": 1.0}})


def test_compare_prints_the_table_and_writes_a_png(tmp_path, capsys):
    out = tmp_path / "cmp.png"
    result = compare(_eval_files(tmp_path), out=str(out))
    assert list(result["columns"]) == ["ternary", "fp"]
    assert "| kjv perplexity | 166.8 | 164.6 |" in capsys.readouterr().out
    image = matplotlib.image.imread(out)
    assert image.shape[0] > 300 and image.shape[1] > 1000   # 15 x 4.5 in at 110 dpi


def test_compare_refuses_bad_paths_and_an_existing_plot(tmp_path):
    paths = _eval_files(tmp_path)
    existing = tmp_path / "mine.png"
    existing.write_bytes(b"not qat's")
    with pytest.raises(RecipeError, match="exists; pass --force"):
        compare(paths, out=str(existing))
    assert existing.read_bytes() == b"not qat's"
    compare(paths, out=str(existing), force=True)
    assert existing.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(RecipeError, match="PNG"):
        compare(paths, out=str(tmp_path / "x.jpg"))
    with pytest.raises(CheckpointError, match="no such path"):
        find_evaluations(str(tmp_path / "nothing"))
    with pytest.raises(CheckpointError, match="neither a qat export"):
        find_evaluations(str(tmp_path))
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert find_evaluations(str(run)) == [("run", None, run / "checkpoints" / "last.ckpt")]
    with pytest.raises(CheckpointError, match="pass --evaluate"):
        compare([str(run)], out=str(tmp_path / "y.png"))


def test_qat_compare_verb_exit_codes(tmp_path, capsys):
    from qat.cli.main import main

    paths = _eval_files(tmp_path)
    assert main(["compare", *paths, f"--out={tmp_path / 'c.png'}"]) == 0
    assert "| wikipedia bits/byte | 2.25 | 2.25 |" in capsys.readouterr().out and (tmp_path / "c.png").is_file()
    assert main(["compare", *paths, f"--out={tmp_path / 'c.png'}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("qat compare: error: --out") and "exists; pass --force" in err and len(err.splitlines()) == 1
    assert main(["compare", *paths, f"--out={tmp_path / 'c.png'}", "--force"]) == 0


@pytest.mark.slow
def test_qat_compare_evaluates_a_real_export_when_asked(tiny_ternary_run, tmp_path, capsys):
    from qat.cli.main import main

    export = tmp_path / "export-hf"
    assert run_qat("export", str(tiny_ternary_run / "checkpoints" / "last.ckpt"), f"--out_dir={export}").returncode == 0
    # The refusals in this process (each `qat` subprocess costs ~6 s of imports); the evaluation through the CLI.
    assert main(["compare", str(export), f"--out={tmp_path / 'a.png'}"]) == 2
    assert "pass --evaluate" in capsys.readouterr().err
    assert main(["compare", str(export), str(tiny_ternary_run / "checkpoints" / "last.ckpt"),
                 f"--out={tmp_path / 'a.png'}", "--evaluate"]) == 2
    assert "neither a qat export" in capsys.readouterr().err            # a checkpoint file is not a run
    assert not (tmp_path / "a.png").exists()
    result = run_qat("compare", str(export), f"--out={tmp_path / 'a.png'}", "--evaluate", "--max-blocks=2",
                     "--suite_tokens=1024", "--probe_items=20")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| wikipedia perplexity |" in result.stdout and "| swap acc (chance) | 0.5 |" in result.stdout
    assert (tmp_path / "a.png").is_file()
    evaluation = json.loads((export / "eval.json").read_text())   # written by the evaluation compare ran
    assert evaluation["suite"]["probes"]["swap"]["items"] == 20 and evaluation["exported"]["tokens"] == 2 * 255
