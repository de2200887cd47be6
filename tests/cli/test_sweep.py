"""`qat sweep`: the Pareto front on hand data, the points it plans, resume (finished points are not rerun), the
SLURM job-array script, the W&B group, bad input, and (slow) a real small sweep producing sweep.csv, the table
and pareto.png."""

import csv
import json
import shlex
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from qat.cli import sweep as sweep_cli
from qat.cli.main import main
from qat.cluster.submit import SlurmJob
from qat.cluster.sweep import render_array_script
from qat.errors import RecipeError
from qat.eval import sweep as sweep_eval
from qat.eval.sweep import bit_schemes, markdown_table, model_size_bits, pareto_front, parse_bits, plan_points
from tests.conftest import REPO, run_qat

RECIPE = REPO / "recipes" / "bitnet-b158-tiny.yaml"
SCHEMES = {"1": "absmean_binary", "1.58": "absmean_ternary"}


def test_pareto_front_of_hand_data():
    # (size, quality; lower is better for both)
    points = [(10, 5.0), (4, 6.0), (4, 7.0), (2, 9.0), (6, 5.5), (12, 4.0), (12, 4.5), (3, 9.5), (2, 9.0)]
    # (4, 7) is beaten by (4, 6); (6, 5.5) by nothing (smaller than 10, better than 4);
    # (12, 4.5) by (12, 4); (3, 9.5) by (2, 9); the two equal (2, 9) points do not beat each other.
    assert pareto_front(points) == [3, 8, 1, 4, 0, 5]
    assert pareto_front([]) == [] and pareto_front([(1.0, 1.0)]) == [0]


def test_bits_and_schemes_are_checked_before_anything_runs():
    assert parse_bits("1, 1.58,2,4.0") == ["1", "1.58", "2", "4"]
    for bad in ("1,x", "0", "1,1", ""):
        with pytest.raises(RecipeError, match="--bits"):
            parse_bits(bad)
    assert bit_schemes(["1", "1.58"], "absmean_binary,absmean_ternary") == SCHEMES
    assert bit_schemes(parse_bits("1,1.58,2,3,4")) == {   # the default: ParetoQ's scheme per width
        "1": "paretoq_1bit", "1.58": "paretoq_ternary", "2": "paretoq_2bit", "3": "paretoq_3bit", "4": "paretoq_4bit"}
    with pytest.raises(RecipeError, match="one scheme per bit width"):
        bit_schemes(["1", "1.58"], "absmean_binary")
    with pytest.raises(RecipeError, match="unknown quantization scheme 'nope'"):
        bit_schemes(["1"], "nope")
    with pytest.raises(RecipeError, match="no scheme for bit width"):
        bit_schemes(["5"])
    assert bit_schemes(["1.58"], mapping={"1.58": "absmean_ternary"}) == {"1.58": "absmean_ternary"}
    with pytest.raises(RecipeError, match="--parallel must be at least 1, got 0"):
        sweep_cli.sweep(str(RECIPE), parallel=0)
    with pytest.raises(RecipeError, match="with --submit every point is its own array task"):
        sweep_cli.sweep(str(RECIPE), parallel=2, submit=True)


def test_plan_has_fp_then_qat_and_ptq_per_bit_width(tmp_path):
    points = plan_points("tiny", SCHEMES, runs_root=tmp_path)
    assert [(p.name, p.kind, p.bits, p.scheme, p.export_format) for p in points] == [
        ("tiny-fp", "fp", "16", None, "hf-fp"),
        ("tiny-w1", "qat", "1", "absmean_binary", "hf"), ("tiny-w1-ptq", "ptq", "1", "absmean_binary", "hf"),
        ("tiny-w1.58", "qat", "1.58", "absmean_ternary", "hf"),
        ("tiny-w1.58-ptq", "ptq", "1.58", "absmean_ternary", "hf")]
    assert points[1].run_dir == tmp_path / "tiny-w1" and points[1].eval_file == tmp_path / "tiny-w1/export-hf/eval.json"
    assert [p.kind for p in plan_points("tiny", SCHEMES, fp=False, ptq=True, runs_root=tmp_path)] == ["qat", "qat"]


SIZES = {"h64": ["--model.arch.hidden_size=64", "--model.arch.intermediate_size=192"],
         "h128": ["--model.arch.hidden_size=128", "--model.arch.intermediate_size=384"]}


def test_plan_over_sizes_has_each_sizes_fp_qat_and_ptq_with_its_overrides(tmp_path):
    points = plan_points("tiny", {"1.58": "absmean_ternary"}, runs_root=tmp_path, sizes=SIZES)
    assert [(p.name, p.size, p.kind) for p in points] == [
        ("tiny-h64-fp", "h64", "fp"), ("tiny-h64-w1.58", "h64", "qat"), ("tiny-h64-w1.58-ptq", "h64", "ptq"),
        ("tiny-h128-fp", "h128", "fp"), ("tiny-h128-w1.58", "h128", "qat"), ("tiny-h128-w1.58-ptq", "h128", "ptq")]
    assert sweep_cli.point_args(points[4]) == ["--run.name=tiny-h128-w1.58", *SIZES["h128"],
                                               "--model.quant.weight=absmean_ternary"]
    assert sweep_cli.point_args(points[0])[1:3] == SIZES["h64"]


@pytest.mark.parametrize("sizes,message", [
    ('{"../x": ["--model.arch.hidden_size=64"]}', "label '../x'"),
    ('{"small": []}', "needs qat run overrides"),
    ('{"small": ["hidden_size=64"]}', "needs qat run overrides"),
])
def test_bad_sizes_are_one_line_exit_2_before_anything_runs(sizes, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("QAT_RUNS_DIR", str(tmp_path))
    assert main(["sweep", "--config", str(RECIPE), "--bits", "1.58", "--sizes", sizes]) == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not any(tmp_path.iterdir())


def _finish(point, tensor_bytes: int, ppl: float, bpb: float) -> None:
    """Make ``point`` look evaluated: an export with a weight file and eval.json."""
    point.export_dir.mkdir(parents=True)
    save_file({"w": torch.zeros(tensor_bytes // 4, dtype=torch.float32)}, point.export_dir / "model.safetensors")
    (point.export_dir / "eval.json").write_text(json.dumps({"exported": {"perplexity": ppl, "bits_per_byte": bpb}}))


def test_model_size_counts_every_tensor_of_the_exported_files(tmp_path):
    save_file({"a": torch.zeros(10, dtype=torch.uint8), "b": torch.zeros(3, 4, dtype=torch.float16)},
              tmp_path / "model.safetensors")
    (tmp_path / "tokenizer.json").write_text("{}" * 1000)                  # not a weight: not counted
    assert model_size_bits(tmp_path) == (10 + 3 * 4 * 2) * 8


def test_resume_skips_finished_points_and_runs_the_rest(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("QAT_RUNS_DIR", str(tmp_path / "runs"))
    points = plan_points("bitnet-b158-tiny", SCHEMES)
    assert points[0].run_dir == tmp_path / "runs" / "bitnet-b158-tiny-fp"
    values = {"fp": (4000, 2.0, 3.0), "qat": (1000, 3.0, 3.2), "ptq": (1000, 9.0, 4.0)}
    unfinished = points[3]                                                # tiny-w1.58 (QAT) was interrupted
    for p in points:
        if p is not unfinished:
            _finish(p, *values[p.kind])
    ran = []

    def fake_run_point(point, config, overrides, eval_max_blocks, group):
        ran.append((point.name, group, overrides))
        _finish(point, 1000, 2.5, 3.1)

    monkeypatch.setattr(sweep_cli, "_run_point", fake_run_point)
    monkeypatch.setattr(sweep_cli, "_run_ptq_point", lambda *a: ran.append(("ptq", a[0].name)))
    sweep_cli.sweep(str(RECIPE), bits="1,1.58", schemes="absmean_binary,absmean_ternary",
                    overrides=["--trainer.max_steps=3"])
    assert ran == [("bitnet-b158-tiny-w1.58", "bitnet-b158-tiny-sweep", ["--trainer.max_steps=3"])]
    out = capsys.readouterr().out
    assert "bitnet-b158-tiny-fp is finished" in out
    sweep_dir = tmp_path / "runs" / "bitnet-b158-tiny-sweep"
    rows = list(csv.DictReader((sweep_dir / "sweep.csv").open()))
    assert [r["point"] for r in rows] == [p.name for p in points]
    assert {r["point"]: int(r["size_bits"]) for r in rows}["bitnet-b158-tiny-fp"] == 4000 * 8
    table = (sweep_dir / "sweep.md").read_text()
    # the front: the resumed w1.58 point (smallest, best among the small ones) and FP (best quality)
    front = [line.split("|")[1].strip() for line in table.splitlines() if line.endswith("| yes |")]
    assert front == ["bitnet-b158-tiny-fp", "bitnet-b158-tiny-w1.58"]
    assert (sweep_dir / "pareto.png").read_bytes()[:4] == b"\x89PNG"


def test_outputs_of_hand_rows(tmp_path):
    points = plan_points("x", {"1.58": "absmean_ternary"}, runs_root=tmp_path)
    for p, (size, bpb) in zip(points, [(400, 1.0), (100, 1.2), (100, 1.5)]):
        _finish(p, size, 2 ** bpb, bpb)
    outputs = sweep_eval.write_sweep_outputs(points, tmp_path / "out")
    table = markdown_table(list(csv.DictReader(outputs["csv"].open())))
    assert table.splitlines()[0].startswith("| point | kind | bits |")
    assert [line.split("|")[-2].strip() for line in table.splitlines()[2:]] == ["yes", "yes", ""]


def test_array_script_runs_one_point_per_task(tmp_path):
    points = [p for p in plan_points("tiny", SCHEMES, runs_root=tmp_path) if p.kind != "ptq"]
    job = SlurmJob(recipe=RECIPE, nodes=1, time="00:20:00", run_dir=tmp_path / "sweep",
                   overrides=["--trainer.max_steps=5"])
    script = render_array_script(job, [(p.run_dir, sweep_cli.point_args(p)) for p in points], "tiny-sweep",
                                 eval_max_blocks=2, partition="debug")
    lines = script.splitlines()
    assert "#SBATCH --array=0-2" in lines and "#SBATCH --partition=debug" in lines
    assert f"#SBATCH --output={tmp_path}/sweep/slurm-%A_%a.out" in lines
    assert "export QAT_WANDB_GROUP=tiny-sweep" in lines
    tasks = [line for line in lines if line.lstrip().startswith(("0)", "1)", "2)"))]
    assert len(tasks) == 3
    for task, point in zip(tasks, points):
        argv = shlex.split(task.split(")", 1)[1].rstrip(" ;"))
        assert argv[:2] == ["srun", "--kill-on-bad-exit=1"] and argv[4:7] == ["qat.cli.main", "run", "--config"]
        assert f"--trainer.default_root_dir={point.run_dir}" in argv and f"--run.name={point.name}" in argv
        assert argv[-4:] == ["--resume", "auto", "--trainer.max_steps=5", "--eval_max_blocks=2"]
    assert "--model.quant=null" in tasks[0] and "--model.quant.weight=absmean_binary" in tasks[1]
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


def test_sweep_dry_run_prints_the_array_script(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("QAT_RUNS_DIR", str(tmp_path))
    assert main(["sweep", "--config", str(RECIPE), "--bits", "1,1.58", "--schemes", "absmean_binary,absmean_ternary",
                 "--submit", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --array=0-2" in out and f"--trainer.default_root_dir={tmp_path}/bitnet-b158-tiny-w1.58" in out
    assert not any(tmp_path.iterdir())                                   # a dry run creates nothing


@pytest.mark.parametrize("args,message", [
    (["--bits", "1", "--schemes", "paretoq_9bit"], "unknown quantization scheme 'paretoq_9bit'"),
    (["--bits", "1,1.58", "--schemes", "absmean_ternary"], "one scheme per bit width"),
    (["--bits", "1", "--schemes", "fbi_binary"], "model.quant.activation='int8_per_token' is not supported"),
    (["--bits", "1", "--schemes", "absmean_binary", "--fp", "false"], "--ptq needs the FP point"),
])
def test_bad_input_is_one_line_exit_2_before_anything_runs(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("QAT_RUNS_DIR", str(tmp_path))
    assert main(["sweep", "--config", str(RECIPE), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("qat sweep: error: ") and message in err[-1]
    assert not any(tmp_path.iterdir())


def test_a_recipe_without_quant_is_refused(tmp_path, capsys):
    recipe = tmp_path / "fp.yaml"
    recipe.write_text((REPO / "recipes" / "fp-baseline-tiny.yaml").read_text())
    assert main(["sweep", "--config", str(recipe), "--bits", "1", "--schemes", "absmean_binary"]) == 2
    assert "has no model.quant section" in capsys.readouterr().err


def test_wandb_logger_takes_the_sweep_group(tmp_path, monkeypatch):
    from qat.train.wandb_logger import GROUP_ENV, QATWandbLogger

    monkeypatch.setenv(GROUP_ENV, "tiny-sweep")
    assert QATWandbLogger(save_dir=str(tmp_path), mode="offline")._wandb_init["group"] == "tiny-sweep"
    assert QATWandbLogger(save_dir=str(tmp_path), mode="offline", group="g")._wandb_init["group"] == "g"
    monkeypatch.delenv(GROUP_ENV)
    assert "group" not in QATWandbLogger(save_dir=str(tmp_path), mode="offline")._wandb_init


@pytest.mark.slow
def test_a_real_sweep_over_paretoq_bit_widths_writes_the_csv_table_and_plot(tmp_path):
    """The tiny recipe over {1.58, 4} bits with the default (ParetoQ) schemes: FP, two QAT points and their PTQ
    points, each a real run or quantization with its export and evaluation. (The plan over all five widths is
    checked above without running; every width's export is run in tests/export/test_qat_packed.py.)"""
    env_runs = tmp_path / "runs"
    steps = ["--overrides+=--trainer.max_steps=6", "--overrides+=--trainer.val_check_interval=6",
             "--overrides+=--trainer.limit_val_batches=1", "--overrides+=--trainer.enable_progress_bar=false",
             "--overrides+=--data.max_val_blocks=4"]
    widths = ("1.58", "4")
    # --parallel 2: the FP and QAT points side by side, one thread each, their output in the sweep's logs folder.
    result = run_qat("sweep", "--config", str(RECIPE), "--bits", ",".join(widths), "--eval_max_blocks", "2", *steps,
                     "--parallel", "2", cwd=tmp_path, timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:] + result.stdout[-4000:]
    sweep_dir = env_runs / "bitnet-b158-tiny-sweep"
    logs = sorted(p.name for p in (sweep_dir / "logs").iterdir())
    assert logs == ["bitnet-b158-tiny-fp.log", "bitnet-b158-tiny-w1.58.log", "bitnet-b158-tiny-w4.log"]
    for name in logs:   # each holds its own run's output
        point = name.removesuffix(".log")
        assert f"loss curves: {env_runs / point / 'loss.png'}" in (sweep_dir / "logs" / name).read_text()
    rows = list(csv.DictReader((sweep_dir / "sweep.csv").open()))
    assert [(r["kind"], r["bits"]) for r in rows] == [("fp", "16")] + [
        (kind, bits) for bits in widths for kind in ("qat", "ptq")]
    assert {r["scheme"] for r in rows if r["kind"] == "qat"} == {"paretoq_ternary", "paretoq_4bit"}
    sizes = {r["point"]: int(r["size_bits"]) for r in rows}
    # the packed codes grow with the bit width (the fp32 embeddings, head and alphas are the same in every point)
    assert sizes["bitnet-b158-tiny-w1.58"] < sizes["bitnet-b158-tiny-w4"] < sizes["bitnet-b158-tiny-fp"]
    assert sizes["bitnet-b158-tiny-w1.58-ptq"] == sizes["bitnet-b158-tiny-w1.58"]     # same architecture and packing
    assert all(float(r["perplexity"]) > 1 and float(r["bits_per_byte"]) > 0 for r in rows)
    table = (sweep_dir / "sweep.md").read_text()
    marked = [line.split("|")[1].strip() for line in table.splitlines() if line.endswith("| yes |")]
    front = pareto_front([(int(r["size_bits"]), float(r["bits_per_byte"])) for r in rows])
    assert "| Pareto front |" in table and sorted(marked) == sorted(rows[i]["point"] for i in front)
    assert (sweep_dir / "pareto.png").stat().st_size > 10_000
    # W&B: each trained point is its own offline run, all in one group.
    assert all(Path(env_runs / name / "wandb").is_dir() for name in ("bitnet-b158-tiny-fp", "bitnet-b158-tiny-w4"))
    # Rerun: every point is finished, nothing is retrained.
    again = run_qat("sweep", "--config", str(RECIPE), "--bits", ",".join(widths), cwd=tmp_path, timeout=600)
    assert again.returncode == 0 and again.stdout.count("is finished") == 5, again.stderr[-2000:]


@pytest.mark.slow
def test_a_real_sweep_over_two_model_sizes(tmp_path):
    """--sizes: each size gets its FP, QAT and PTQ points (its PTQ quantizes its own FP checkpoint), one front."""
    result = run_qat("sweep", "--config", str(RECIPE), "--bits", "1.58", "--eval_max_blocks", "1",
                     "--sizes", json.dumps(SIZES), "--overrides+=--trainer.max_steps=3",
                     "--overrides+=--trainer.val_check_interval=3", "--overrides+=--trainer.limit_val_batches=1",
                     "--overrides+=--trainer.enable_progress_bar=false", "--overrides+=--data.max_val_blocks=2",
                     "--parallel", "2", cwd=tmp_path, timeout=1800)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = list(csv.DictReader((tmp_path / "runs" / "bitnet-b158-tiny-sweep" / "sweep.csv").open()))
    assert [(r["size"], r["kind"]) for r in rows] == [(s, k) for s in SIZES for k in ("fp", "qat", "ptq")]
    size = {(r["size"], r["kind"]): int(r["size_bits"]) for r in rows}
    assert size[("h128", "qat")] > size[("h64", "qat")] and size[("h128", "fp")] > size[("h64", "fp")]
    assert size[("h64", "ptq")] == size[("h64", "qat")]                  # same architecture, same packing
    assert (tmp_path / "runs" / "bitnet-b158-tiny-sweep" / "pareto.png").stat().st_size > 10_000


@pytest.mark.cluster
@pytest.mark.slow
@pytest.mark.usefixtures("slurm_cluster")
def test_a_sweep_runs_as_a_job_array_on_the_local_cluster(tmp_path, monkeypatch, capsys):
    """Submit: one array task per trained point; then the same command without --submit adds the PTQ points."""
    import time

    monkeypatch.setenv("QAT_RUNS_DIR", str(tmp_path / "runs"))
    args = dict(bits="1.58", schemes="absmean_ternary", eval_max_blocks=1,
                overrides=["--trainer.max_steps=4", "--trainer.val_check_interval=4", "--trainer.limit_val_batches=1",
                           "--trainer.enable_progress_bar=false"])
    sweep_cli.sweep(str(RECIPE), submit=True, time="00:20:00", **args)
    assert "submitted job array" in capsys.readouterr().out
    trained = [p for p in plan_points("bitnet-b158-tiny", {"1.58": "absmean_ternary"}) if p.kind != "ptq"]
    deadline = time.monotonic() + 1200
    while not all(p.finished for p in trained) and time.monotonic() < deadline:
        time.sleep(5)
    outputs = sorted((tmp_path / "runs" / "bitnet-b158-tiny-sweep").glob("slurm-*_*.out"))
    assert all(p.finished for p in trained), [o.read_text()[-2000:] for o in outputs]
    assert len(outputs) == 2                                   # one output file per array task
    sweep_cli.sweep(str(RECIPE), **args)
    rows = list(csv.DictReader((tmp_path / "runs" / "bitnet-b158-tiny-sweep" / "sweep.csv").open()))
    assert [r["kind"] for r in rows] == ["fp", "qat", "ptq"]
