"""The ``qat`` command: a table of verbs. ``fit``/``validate`` are LightningCLI subcommands; every other verb is
a typed function whose signature and docstring jsonargparse turns into flags and ``--help``."""

import importlib
import os
import sys

from qat.errors import QATError

LIGHTNING_VERBS = ("fit", "validate")
PIPELINE_VERB = "run"  # fit + export + eval; takes the same arguments as `qat fit`
# Verbs over the distillation module taking `qat fit` arguments: train with a teacher / precompute its top-k logits.
DISTILL_VERBS = {"distill": "qat.cli.distill:distill", "cache-teacher": "qat.cli.distill:cache_teacher"}

CLUSTER_VERBS = ("submit", "status", "cancel")
# verb -> "module:function"; imported lazily so `qat --help` stays fast.
COMMANDS = {
    "export": "qat.cli.export:export",
    "eval": "qat.cli.evaluate:evaluate",
    "generate": "qat.cli.generate:generate",
    "submit": "qat.cli.submit:submit",
    "status": "qat.cli.submit:status",
    "cancel": "qat.cli.submit:cancel",
}


def _set_offline_defaults() -> None:
    # Nothing is ever downloaded from a hub at run time.
    for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                       "TOKENIZERS_PARALLELISM": "false"}.items():
        os.environ.setdefault(key, value)


def _default_deepspeed_accelerator() -> None:
    # Without CUDA, DeepSpeed's accelerator auto-detection warns and falls back to CPU; saying so silences it.
    # With CUDA, DeepSpeed detects it.
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"


def _option_name_with_underscores(arg: str) -> str:
    # `--gpus-per-node 2` and `--gpus_per_node 2` both work (jsonargparse names options after the parameters).
    if not arg.startswith("--"):
        return arg
    name, sep, value = arg.partition("=")
    return "--" + name[2:].replace("-", "_") + sep + value


# Boolean switches typed bare (`qat export CKPT --force`); jsonargparse wants a value for a bool.
BARE_SWITCHES = ("--force",)


def _bare_switches_with_values(args: list[str]) -> list[str]:
    return [a + "=true" if a in BARE_SWITCHES and (i + 1 == len(args) or args[i + 1].lower() not in ("true", "false"))
            else a for i, a in enumerate(args)]


def usage() -> str:
    verbs = ", ".join((*LIGHTNING_VERBS, PIPELINE_VERB, *DISTILL_VERBS, *COMMANDS))
    return f"usage: qat <verb> [--help] ...\nverbs: {verbs}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _set_offline_defaults()
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    verb, rest = argv[0], argv[1:]
    if verb not in CLUSTER_VERBS:  # these only call sbatch/squeue/scancel: no torch import
        _default_deepspeed_accelerator()
    try:
        if verb in LIGHTNING_VERBS:
            from qat.cli.fit import fit_cli

            fit_cli([verb, *rest])
            return 0
        if verb in DISTILL_VERBS:
            module, function = DISTILL_VERBS[verb].split(":")
            getattr(importlib.import_module(module), function)(rest)
            return 0
        if verb == PIPELINE_VERB:
            from qat.cli.run import run_pipeline

            run_pipeline(rest)
            return 0
        if verb not in COMMANDS:
            print(f"qat: unknown verb {verb!r}\n{usage()}", file=sys.stderr)
            return 2
        from jsonargparse import auto_cli

        module, function = COMMANDS[verb].split(":")
        auto_cli(getattr(importlib.import_module(module), function), args=_bare_switches_with_values([_option_name_with_underscores(a) for a in rest]),
                 as_positional=True)
        return 0
    except QATError as e:
        print(f"qat {verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
