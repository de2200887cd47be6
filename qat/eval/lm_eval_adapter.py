"""qat models evaluated by EleutherAI's lm-eval harness (``pip install lm-eval==0.4.13``, the ``lm-eval`` extra).

lm-eval's ``HFLM`` takes a model object and a tokenizer, so any qat model that is a transformers
``PreTrainedModel`` — a QAT checkpoint's model (BitLinear layers), an HF export reloaded by transformers, or an
export on qat's packed kernels — is scored by lm-eval's own request construction and metrics. Tasks are lm-eval
YAML files; lm-eval ships no task data, so a task reads local files (``dataset_path: json``,
``dataset_kwargs: {data_files: {test: /path/data.jsonl}}``).

Example usage::

    model, tokenizer = load_model_and_tokenizer("runs/bitnet-b158-tiny/export-hf")
    evaluate_lm_eval_tasks(model, tokenizer, ["my_task.yaml"])  # {"my_task": {"acc,none": ..., ...}}
"""

import importlib.util
from pathlib import Path
from typing import Any

import torch
import yaml

from qat.errors import RecipeError

INSTALL_HINT = "pip install lm-eval==0.4.13 (or `pip install -e .[lm-eval]`)"
# Context length lm-eval may use; qat's models are trained on blocks of a few hundred tokens and have RoPE.
DEFAULT_MAX_LENGTH = 1024


class _TaskYamlLoader(yaml.SafeLoader):
    """Reads lm-eval task YAML safely; its ``!function`` tags are lm-eval's to resolve, not ours."""


_TaskYamlLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def check_task_files(task_files: list[str]) -> list[tuple[Path, str]]:
    """(folder, task name) of each lm-eval task YAML file, checked before any model is loaded.

    Raises:
        RecipeError: lm-eval is not installed, a file is missing or unreadable, or it names no ``task``.
    """
    if importlib.util.find_spec("lm_eval") is None:
        raise RecipeError(f"--lm_eval_tasks needs the lm-eval package: {INSTALL_HINT}")
    tasks = []
    for f in task_files:
        path = Path(f)
        if not path.is_file() or path.suffix not in (".yaml", ".yml"):
            raise RecipeError(f"lm-eval task {f}: no such .yaml file; pass lm-eval task YAML files "
                              "(e.g. one with dataset_path: json over local JSONL data)")
        try:
            config = yaml.load(path.read_text(), Loader=_TaskYamlLoader)
        except yaml.YAMLError as e:
            raise RecipeError(f"lm-eval task {f}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(config, dict) or not isinstance(config.get("task"), str):
            raise RecipeError(f"lm-eval task {f}: has no `task: NAME` key")
        tasks.append((path.resolve().parent, config["task"]))
    return tasks


def evaluate_lm_eval_tasks(model: torch.nn.Module, tokenizer: Any, task_files: list[str], batch_size: int = 8,
                           limit: int = 0, max_length: int = DEFAULT_MAX_LENGTH) -> dict[str, dict[str, float]]:
    """lm-eval's metrics (e.g. ``acc,none``, ``acc_norm,none``) of ``model`` on each task, keyed by task name.

    Raises:
        RecipeError: as :func:`check_task_files`; or the model is not a transformers ``PreTrainedModel``.
    """
    tasks = check_task_files(task_files)
    import transformers
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    if not isinstance(model, transformers.PreTrainedModel):
        raise RecipeError(f"lm-eval's HFLM needs a transformers model; got {type(model).__name__} (evaluate the "
                          "hf export or the training checkpoint instead)")
    device = next(model.parameters()).device
    lm = HFLM(pretrained=model.eval(), tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
              device=str(device))
    manager = TaskManager(include_path=sorted({str(folder) for folder, _ in tasks}), include_defaults=False)
    out = simple_evaluate(model=lm, tasks=[name for _, name in tasks], task_manager=manager,
                          limit=limit or None, bootstrap_iters=0, log_samples=False, random_seed=0,
                          numpy_random_seed=0, torch_random_seed=0, fewshot_random_seed=0)
    return {name: {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            for name, metrics in out["results"].items()}
