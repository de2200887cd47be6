"""The ``qat`` command: a table of verbs. ``fit``/``validate`` are LightningCLI subcommands; every other verb is
a typed function whose signature and docstring jsonargparse turns into flags and ``--help``."""

import importlib
import json
import os
import sys
import traceback
import typing

from qat.errors import QATError

LIGHTNING_VERBS = ("fit", "validate")
PIPELINE_VERB = "run"  # fit + export + eval; takes the same arguments as `qat fit`
# Verbs over the distillation module taking `qat fit` arguments: train with a teacher / precompute its top-k logits.
DISTILL_VERBS = {"distill": "qat.cli.distill:distill", "cache-teacher": "qat.cli.distill:cache_teacher"}

# Verbs that parse their own argument list: `qat compare` takes a list of positional paths (auto_cli cannot);
# `qat sweep --config R.yaml` (jsonargparse reserves --config).
ARGV_VERBS = {"compare": "qat.cli.compare:compare_cli", "sweep": "qat.cli.sweep:sweep_main"}

CLUSTER_VERBS = ("submit", "status", "cancel")
# verb -> "module:function"; imported lazily so `qat --help` stays fast.
COMMANDS = {
    "export": "qat.cli.export:export",
    "eval": "qat.cli.evaluate:evaluate",
    "generate": "qat.cli.generate:generate",
    "publish": "qat.cli.publish:publish",
    "submit": "qat.cli.submit:submit",
    "status": "qat.cli.submit:status",
    "cancel": "qat.cli.submit:cancel",
}


# Verbs that talk to the Hugging Face Hub (uploads only; they download nothing).
HUB_VERBS = ("publish",)


def _set_offline_defaults(verb: str = "") -> None:
    # Nothing is ever downloaded from a hub at run time.
    defaults = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false"}
    if verb in HUB_VERBS:
        defaults.pop("HF_HUB_OFFLINE")
    for key, value in defaults.items():
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


DEBUG_FLAG = "--debug"
# Failures a user causes with a bad file or path they named; shown as one line (exit 2) like a QATError.
USER_FILE_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, UnicodeDecodeError,
                    json.JSONDecodeError)
# Values jsonargparse reads as a boolean (case-insensitive).
BOOL_WORDS = {"true", "false", "yes", "no", "on", "off"}


def _bool_flags_without_value(args: list[str], function) -> list[str]:
    """``--dry_run`` alone means ``--dry_run=true``: jsonargparse wants a value after a bool option; a value that
    follows (``--dry_run false``) is kept."""
    hints = typing.get_type_hints(function)
    flags = {f"--{name}" for name, kind in hints.items() if kind in (bool, typing.Optional[bool])}
    out = []
    for i, arg in enumerate(args):
        following = args[i + 1] if i + 1 < len(args) else None
        if arg in flags and (following is None or following.lower() not in BOOL_WORDS):
            arg += "=true"
        out.append(arg)
    return out


def usage() -> str:
    verbs = ", ".join((*LIGHTNING_VERBS, PIPELINE_VERB, *DISTILL_VERBS, *COMMANDS, *ARGV_VERBS))
    return (f"usage: qat [--debug] <verb> [--help] ...\nverbs: {verbs}\n"
            f"  {DEBUG_FLAG}  show the Python traceback of an error (also accepted after the verb)")


def _one_line(text: str, limit: int = 2000) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _safetensors_error_type() -> type | None:
    # Only when safetensors was imported by the failing command: importing it here would slow every verb down.
    module = sys.modules.get("safetensors")
    return getattr(module, "SafetensorError", None) if module is not None else None


def _qat_error_cause(error: BaseException | None) -> QATError | None:
    """The ``QATError`` in ``error``'s cause chain: jsonargparse wraps what a recipe dataclass raises when it is
    built as an Optional (``model.quant``) into its own ValueError."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, QATError):
            return error
        seen.add(id(error))
        error = error.__cause__
    return None


def user_error_message(e: BaseException) -> str | None:
    """The one-line message for an error the user caused (a ``QATError``, or a bad file they named); None for a bug."""
    cause = _qat_error_cause(e)
    if cause is not None:
        return _one_line(str(cause))
    if isinstance(e, OSError) and isinstance(e, USER_FILE_ERRORS):
        return _one_line(f"{e.filename}: {e.strerror}" if e.filename is not None and e.strerror else str(e))
    if isinstance(e, UnicodeDecodeError):
        return _one_line(f"a file is not valid UTF-8 text ({e}); re-encode it as UTF-8")
    if isinstance(e, json.JSONDecodeError):
        return _one_line(f"a file is not valid JSON ({e})")
    safetensors_error = _safetensors_error_type()
    if safetensors_error is not None and isinstance(e, safetensors_error):
        return _one_line(f"not a valid safetensors file ({e}); re-export or re-download it")
    return None


def _split_debug_flag(argv: list[str]) -> tuple[list[str], bool]:
    return [a for a in argv if a != DEBUG_FLAG], DEBUG_FLAG in argv


def main(argv: list[str] | None = None) -> int:
    argv, debug = _split_debug_flag(list(sys.argv[1:] if argv is None else argv))
    _set_offline_defaults(argv[0] if argv else "")
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    verb, rest = argv[0], argv[1:]
    try:
        code = _run_verb(verb, rest)
        _release_process_group()
        return code
    except Exception as e:  # noqa: BLE001 -- the one place where every failure becomes a message and an exit code
        message = user_error_message(e)
        if debug:
            traceback.print_exc()
        if message is not None:
            print(f"qat {verb}: error: {message}", file=sys.stderr)
            return 2
        print(f"qat {verb}: unexpected error: {type(e).__name__}: {_one_line(str(e), 500)} "
              f"({'traceback above' if debug else 'run with --debug for the traceback'})", file=sys.stderr)
        return 1


def _release_process_group() -> None:
    if "torch.distributed" in sys.modules:  # only a verb that imported torch can have set one up
        from qat.train.strategies import release_process_group

        release_process_group()


def _run_verb(verb: str, rest: list[str]) -> int:
    if verb not in CLUSTER_VERBS:  # these only call sbatch/squeue/scancel: no torch import
        _default_deepspeed_accelerator()
    if verb in LIGHTNING_VERBS:
        from qat.cli.fit import fit_cli

        fit_cli([verb, *rest])
        return 0
    if verb in DISTILL_VERBS or verb in ARGV_VERBS:
        module, function = {**DISTILL_VERBS, **ARGV_VERBS}[verb].split(":")
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

    module, name = COMMANDS[verb].split(":")
    function = getattr(importlib.import_module(module), name)
    args = _bool_flags_without_value([_option_name_with_underscores(a) for a in rest], function)
    auto_cli(function, args=args, as_positional=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
