"""``qat sweep --config R.yaml --bits 1,1.58,2,3,4``: one run per bit width (plus an FP and PTQ points), locally
(one after another, or ``--parallel N`` at once) or as a SLURM job array, then ``sweep.csv``, ``sweep.md`` and
``pareto.png`` (qat/eval/sweep.py)."""

import os
import subprocess
import sys
from pathlib import Path
from typing import Optional

from qat.checkpoint.layout import RunLayout
from qat.cluster.submit import SlurmJob, check_recipe_script_texts, load_recipe
from qat.errors import QATError, RecipeError
from qat.eval.sweep import (
    SweepPoint,
    bit_schemes,
    check_sizes,
    parse_bits,
    plan_points,
    write_ptq_checkpoint,
    write_sweep_outputs,
)
from qat.train.wandb_logger import GROUP_ENV


def point_args(point: SweepPoint) -> list[str]:
    """The ``qat run`` arguments that make the recipe this point (besides its run folder)."""
    args = [f"--run.name={point.name}", *point.size_args]
    if point.kind == "fp":
        return args + ["--model.quant=null"]
    return args + [f"--model.quant.weight={point.scheme}"]


def _recipe_quant(recipe: dict, config: str) -> dict:
    model = recipe.get("model") or {}
    quant = model.get("quant") if isinstance(model, dict) else None
    if not isinstance(quant, dict):
        raise RecipeError(f"recipe {config} has no model.quant section; a sweep quantizes the recipe's model (its "
                          "FP point is the same recipe with model.quant: null). Add model.quant (see "
                          "recipes/bitnet-b158-tiny.yaml)")
    return quant


def _run_point(point: SweepPoint, config: str, overrides: list[str], eval_max_blocks: int, group: str,
               log: Optional[Path] = None, threads: Optional[int] = None) -> None:
    """One FP or QAT point as a ``qat run`` subprocess; with ``log``, its output goes there (points running side by
    side) and ``threads`` sets its OMP_NUM_THREADS unless the user set one."""
    command = [sys.executable, "-m", "qat.cli.main", "run", "--config", config,
               f"--trainer.default_root_dir={point.run_dir}", *point_args(point), "--resume", "auto", *overrides]
    if eval_max_blocks:
        command.append(f"--eval_max_blocks={eval_max_blocks}")
    env = {**os.environ, GROUP_ENV: group}
    env.pop("WANDB_SERVICE", None)                       # each point is a W&B process of its own
    if threads and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(threads)
    where = f"; output in {log}" if log else ""
    print(f"qat sweep: running {point.name} ({point.kind}, {point.scheme or 'full precision'}){where}", flush=True)
    if log is None:
        result = subprocess.run(command, env=env)
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as out:
            result = subprocess.run(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        output = f"in {log}" if log else "above"
        raise QATError(f"sweep point {point.name} failed (exit {result.returncode}, output {output}); fix it and rerun "
                       "the same `qat sweep` command: finished points are kept")


def _run_points(points: list[SweepPoint], parallel: int, config: str, overrides: list[str], eval_max_blocks: int,
                group: str, log_dir: Path) -> None:
    """The FP and QAT points, ``parallel`` at a time (each with its share of the cores, its output in
    ``log_dir/<point>.log``); every point runs even if another fails, then the failures are reported together."""
    if parallel <= 1:
        for point in points:
            _run_point(point, config, overrides, eval_max_blocks, group)
        return
    from concurrent.futures import ThreadPoolExecutor

    threads = max(1, (os.cpu_count() or 1) // parallel)

    def run(point: SweepPoint) -> Optional[str]:
        try:
            _run_point(point, config, overrides, eval_max_blocks, group, log_dir / f"{point.name}.log", threads)
        except QATError as err:
            print(f"qat sweep: {err}", flush=True)
            return str(err)
        print(f"qat sweep: {point.name} finished", flush=True)
        return None

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        failures = [err for err in pool.map(run, points) if err]
    if failures:
        raise QATError(f"{len(failures)} of {len(points)} sweep points failed: " + " | ".join(failures))


def _run_ptq_point(point: SweepPoint, fp_point: SweepPoint, quant: dict, eval_max_blocks: int) -> None:
    from qat.cli.evaluate import evaluate
    from qat.cli.export import export
    from qat.nn.config import QuantConfig

    print(f"qat sweep: quantizing {fp_point.name} as {point.name} ({point.scheme}, no training)", flush=True)
    layout = RunLayout(point.run_dir)
    checkpoint = write_ptq_checkpoint(RunLayout(fp_point.run_dir).last_checkpoint,
                                      QuantConfig(**{**quant, "weight": point.scheme}), layout.last_checkpoint)
    out = export(str(checkpoint), str(point.export_dir), format=point.export_format, dtype="float32", force=True)
    evaluate(out, max_blocks=eval_max_blocks)


def sweep(recipe: str, bits: str = "1,1.58,2,3,4", schemes: Optional[str] = None, fp: bool = True,
          ptq: bool = True, eval_max_blocks: int = 0, out_dir: Optional[str] = None,
          overrides: Optional[list[str]] = None, submit: bool = False, nodes: int = 1, gpus_per_node: int = 0,
          ranks_per_node: int = 1, cpus_per_task: int = 1, partition: Optional[str] = None, time: str = "01:00:00",
          dry_run: bool = False, sizes: Optional[dict[str, list[str]]] = None, parallel: int = 1) -> None:
    """Train and evaluate a recipe at several bit widths and draw the size-quality front.

    Every point is a normal ``qat run`` (fit, export, eval) in its own run folder ``<run.name>-w<bits>`` and W&B
    run, all in the W&B group ``<run.name>-sweep``; the FP point (``-fp``) trains the recipe without quantization
    and each PTQ point (``-w<bits>-ptq``) quantizes the FP weights without training. Finished points (their export
    holds eval.json) are skipped, so an interrupted sweep resumes where it stopped.

    Args:
        recipe: the recipe (LightningCLI YAML with a model.quant section), also accepted as ``--config R.yaml``.
        bits: bit widths, comma-separated, e.g. 1,1.58,2,3,4.
        schemes: quantization schemes in the order of --bits (default: paretoq_1bit, paretoq_ternary,
            paretoq_2bit, paretoq_3bit, paretoq_4bit for 1, 1.58, 2, 3, 4), e.g. absmean_binary,absmean_ternary.
        fp: also run the full-precision point.
        ptq: also run the PTQ points (needs fp).
        eval_max_blocks: evaluate only the first N held-out blocks (0 = all).
        out_dir: where sweep.csv, sweep.md and pareto.png go (default: runs/<run.name>-sweep).
        overrides: extra `qat run` arguments for every point, e.g. ``--overrides+=--trainer.max_steps=50``.
        submit: run the FP and QAT points as one SLURM job array (one task per point); rerun without --submit
            once it finished to add the PTQ points and write the outputs.
        nodes: nodes per array task (with --submit).
        gpus_per_node: GPUs per node (with --submit); 0 trains on CPU.
        ranks_per_node: CPU training processes per node (with --submit).
        cpus_per_task: CPU cores per rank (with --submit).
        partition: SLURM partition (default: the cluster's default).
        time: time limit per array task, HH:MM:SS.
        dry_run: with --submit, print the sbatch script instead of submitting it.
        sizes: also sweep model sizes: label -> the ``qat run`` overrides of that size, e.g.
            ``--sizes '{h128: [--model.arch.hidden_size=128, --model.arch.intermediate_size=384], h256: [...]}'``;
            every size gets its FP, QAT and PTQ points (``<run.name>-<label>-w<bits>``), all on one front.
        parallel: run this many FP / QAT points at once on this machine, each with cores / parallel threads
            (OMP_NUM_THREADS, unless set) and its output in ``<out_dir>/logs/<point>.log``; the PTQ points follow.
            Small models train faster side by side than one after another on all cores.
    """
    config = recipe
    loaded = load_recipe(Path(config))
    check_recipe_script_texts(loaded)
    run_name = str((loaded.get("run") or {}).get("name") or "qat-run")
    quant = _recipe_quant(loaded, config)
    chosen = bit_schemes(parse_bits(bits), schemes)
    sizes = check_sizes(sizes)
    if parallel < 1:
        raise RecipeError(f"--parallel must be at least 1, got {parallel}")
    if parallel > 1 and submit:
        raise RecipeError("--parallel runs points on this machine; with --submit every point is its own array task")
    if ptq and not fp:
        raise RecipeError("--ptq needs the FP point (PTQ quantizes its weights); pass --fp true or --ptq false")
    from qat.nn.config import QuantConfig

    for scheme in chosen.values():                        # every point's settings checked before anything runs
        QuantConfig(**{**quant, "weight": scheme})
    overrides = list(overrides or [])
    group = f"{run_name}-sweep"
    sweep_dir = Path(out_dir) if out_dir else RunLayout.for_run(group).run_dir
    points = plan_points(run_name, chosen, fp=fp, ptq=ptq, sizes=sizes)
    if submit:
        _submit(points, Path(config), sweep_dir, group, eval_max_blocks, overrides, dry_run,
                SlurmJob(recipe=Path(config), nodes=nodes, gpus_per_node=gpus_per_node, ranks_per_node=ranks_per_node,
                         cpus_per_task=cpus_per_task, partition=partition, time=time, run_dir=sweep_dir,
                         overrides=overrides))
        return
    fp_points = {p.size: p for p in points if p.kind == "fp"}
    for point in points:
        if point.finished:
            print(f"qat sweep: {point.name} is finished ({point.eval_file}); kept", flush=True)
    _run_points([p for p in points if p.kind != "ptq" and not p.finished], parallel, config, overrides,
                eval_max_blocks, group, sweep_dir / "logs")
    for point in points:                                  # PTQ points quantize their size's finished FP point
        if point.kind == "ptq" and not point.finished:
            _run_ptq_point(point, fp_points[point.size], quant, eval_max_blocks)
    outputs = write_sweep_outputs(points, sweep_dir, title=f"{run_name}: size vs quality")
    print(outputs["table"].read_text())
    for kind, path in outputs.items():
        print(f"{kind}: {path}")


def sweep_main(argv: list[str]) -> None:
    """``qat sweep`` arguments -> :func:`sweep`. ``--config R.yaml`` names the recipe, as for ``qat run`` (jsonargparse
    reserves ``--config`` for files of its own arguments, so it is turned into the positional recipe here)."""
    from jsonargparse import auto_cli

    from qat.cli.main import _bool_flags_without_value, _option_name_with_underscores

    args, i = [], 0
    while i < len(argv):
        if argv[i] == "--config" and i + 1 < len(argv):
            args.insert(0, argv[i + 1])
            i += 2
            continue
        if argv[i].startswith("--config="):
            args.insert(0, argv[i].split("=", 1)[1])
        else:
            args.append(argv[i])
        i += 1
    args = _bool_flags_without_value([_option_name_with_underscores(a) for a in args], sweep)
    auto_cli(sweep, args=args, as_positional=True)


def _submit(points: list[SweepPoint], recipe: Path, sweep_dir: Path, group: str, eval_max_blocks: int,
            overrides: list[str], dry_run: bool, job: SlurmJob) -> None:
    from qat.cluster.sweep import render_array_script

    todo = [p for p in points if p.kind != "ptq" and not p.finished]
    array = [(p.run_dir, point_args(p)) for p in todo]
    if dry_run:
        print(render_array_script(job, array, group, eval_max_blocks), end="")
        return
    from qat.cluster.slurm import partitions, submit_batch_script
    from qat.cluster.submit import check_job

    resolved = check_job(job, partitions())
    script = render_array_script(job, array, group, eval_max_blocks, resolved.name)
    sweep_dir.mkdir(parents=True, exist_ok=True)           # sbatch --output needs the folder to exist
    job_id = submit_batch_script(script)
    print(f"submitted job array {job_id} ({len(todo)} task(s): {', '.join(p.name for p in todo)}); output "
          f"{sweep_dir}/slurm-{job_id}_<task>.out")
    print("  when it has finished, rerun this command without --submit: it adds the PTQ points and writes "
          "sweep.csv, sweep.md and pareto.png")
