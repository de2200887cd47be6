"""Distributed strategies: the recipe's ``strategy`` choice turned into a Lightning strategy, on GPU or CPU.

On GPU, DeepSpeed is Lightning's ``DeepSpeedStrategy`` as is. On CPU Lightning refuses it; ``CPUDeepSpeedStrategy``
is the thin adaptation that runs the same recipe with DeepSpeed on gloo: DDP's environment set-up instead of the
CUDA check, ranks without CUDA device indices, and ``device_rank`` from ``LOCAL_RANK`` for ``deepspeed.initialize``.

Example usage::

    strategy = build_strategy("deepspeed_stage_3", accelerator="cpu")
    strategy = build_strategy(StrategyConfig(name="deepspeed", stage=2, config="ds.json"), accelerator="gpu")
    Trainer(accelerator="cpu", devices=2, strategy=strategy)
"""

import argparse
import copy
import json
import os
import pickle
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal, Optional, Union

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_warn
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, Strategy

from qat.errors import CheckpointError, RecipeError
from qat.paths import cache_dir
from qat.train.precision import cpu_has_fast_bf16

__all__ = ["StrategyConfig", "CPUDeepSpeedStrategy", "WeightsOnlyDeepSpeedStrategy", "build_strategy", "parse_strategy"]


@dataclass
class StrategyConfig:
    """How training is spread over devices and nodes.

    Attributes:
        name: ``auto`` (one device), ``ddp`` (replicated model, all-reduced gradients) or ``deepspeed`` (ZeRO).
        stage: ZeRO stage: 1 shards optimizer states, 2 also gradients, 3 also parameters.
        offload_optimizer: keep optimizer states in CPU memory (ZeRO-Offload; GPU only makes it useful).
        offload_parameters: keep parameters in CPU memory (ZeRO-3 only).
        config: a DeepSpeed JSON config (path or dict), passed to DeepSpeed as is; replaces ``stage`` and the
            offload flags. Batch size and gradient accumulation still come from the recipe when left out.
    """

    name: Literal["auto", "ddp", "deepspeed"] = "auto"
    stage: Literal[1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_parameters: bool = False
    config: Optional[Union[str, dict]] = None


CPU_BUCKET_ELEMENTS = 5_000_000

# Lightning's registered DeepSpeed names: deepspeed, deepspeed_stage_1, deepspeed_stage_2_offload, ...
_DEEPSPEED_NAME = re.compile(r"^deepspeed(?:_stage_(?P<stage>[123]))?(?P<offload>_offload)?(?P<nvme>_nvme)?$")


def parse_strategy(spec: Union[str, dict, StrategyConfig]) -> StrategyConfig:
    """A ``StrategyConfig`` from a Lightning-style name (``ddp``, ``deepspeed_stage_3_offload``), a mapping of
    ``StrategyConfig`` fields, or a ``StrategyConfig``.

    Raises:
        RecipeError: the name or a field is unknown, or the combination is invalid.
    """
    if isinstance(spec, StrategyConfig):
        cfg = spec
    elif isinstance(spec, dict):
        unknown = set(spec) - set(StrategyConfig.__dataclass_fields__)
        if unknown:
            raise RecipeError(f"strategy: unknown keys {sorted(unknown)}; allowed: "
                              f"{sorted(StrategyConfig.__dataclass_fields__)}")
        cfg = StrategyConfig(**spec)
    elif isinstance(spec, str):
        cfg = _parse_strategy_name(spec)
    else:
        raise RecipeError(f"strategy: expected a name or a mapping, got {type(spec).__name__}")
    if cfg.name not in ("auto", "ddp", "deepspeed"):
        raise RecipeError(f"strategy.name: {cfg.name!r} is not one of auto, ddp, deepspeed")
    if cfg.stage not in (1, 2, 3):
        raise RecipeError(f"strategy.stage: ZeRO stage must be 1, 2 or 3, got {cfg.stage!r}")
    if cfg.offload_parameters and cfg.stage != 3:
        raise RecipeError("strategy.offload_parameters needs ZeRO stage 3 (only stage 3 partitions parameters); "
                          "set stage: 3 or drop offload_parameters")
    if cfg.name != "deepspeed" and (cfg.config is not None or cfg.offload_optimizer or cfg.offload_parameters):
        raise RecipeError(f"strategy: config/offload options are DeepSpeed settings but name is {cfg.name!r}; "
                          "set name: deepspeed")
    return cfg


def _parse_strategy_name(name: str) -> StrategyConfig:
    if name in ("auto", "ddp"):
        return StrategyConfig(name=name)
    match = _DEEPSPEED_NAME.match(name)
    if match is None:
        raise RecipeError(f"strategy: unknown name {name!r}; use auto, ddp, deepspeed, deepspeed_stage_1|2|3, "
                          "deepspeed_stage_2_offload or deepspeed_stage_3_offload")
    if match["nvme"]:
        raise RecipeError(f"strategy: {name!r} (NVMe offload) is not supported; pass a DeepSpeed JSON config "
                          "with strategy.config instead")
    stage = int(match["stage"] or 2)
    offload = bool(match["offload"])
    return StrategyConfig(name="deepspeed", stage=stage, offload_optimizer=offload,
                          offload_parameters=offload and stage == 3)


def _load_deepspeed_config(config: Union[str, dict]) -> dict:
    if isinstance(config, dict):
        return copy.deepcopy(config)
    path = Path(config)
    if not path.is_file():
        raise RecipeError(f"strategy.config: DeepSpeed config file {str(path)!r} does not exist; "
                          "give the path of a JSON file or inline the settings as a mapping")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RecipeError(f"strategy.config: {str(path)!r} is not valid JSON ({exc})") from exc


def _check_cpu_deepspeed_config(config: dict) -> None:
    # DeepSpeed's own Adam on CPU JIT-compiles a C++ op for ~2 minutes on first use (environment.md §5);
    # the recipe's torch optimizer (or torch_adam) does the same work without a compile.
    optimizer = config.get("optimizer") or {}
    torch_adam = optimizer.get("params", {}).get("torch_adam")
    if str(optimizer.get("type", "")).lower() in ("adam", "adamw") and not torch_adam:
        raise RecipeError("strategy.config: a DeepSpeed Adam/AdamW optimizer on CPU compiles a C++ op on first use "
                          "(~2 min); add \"torch_adam\": true to optimizer.params or drop the optimizer block so "
                          "the recipe's optimizer is used")


def build_strategy(spec: Union[str, dict, StrategyConfig], accelerator: str = "auto") -> Union[str, Strategy]:
    """The Lightning strategy for ``spec`` on ``accelerator`` (``cpu``, ``gpu``/``cuda`` or ``auto``).

    Returns ``"auto"``/``"ddp"`` unchanged (Lightning picks gloo on CPU, NCCL on GPU), Lightning's
    ``DeepSpeedStrategy`` on GPU (resuming without unpickling code) and ``CPUDeepSpeedStrategy`` on CPU.

    Raises:
        RecipeError: invalid strategy settings, or a DeepSpeed config that would not run on this accelerator.
    """
    cfg = parse_strategy(spec)
    if cfg.name != "deepspeed":
        return cfg.name
    on_cpu = _resolve_accelerator(accelerator) == "cpu"
    if cfg.config is not None:
        ds_config = _load_deepspeed_config(cfg.config)
        if on_cpu:
            _check_cpu_deepspeed_config(ds_config)
        kwargs: dict[str, Any] = {"config": ds_config}
    else:
        kwargs = {"stage": cfg.stage, "offload_optimizer": cfg.offload_optimizer,
                  "offload_parameters": cfg.offload_parameters}
    return CPUDeepSpeedStrategy(**kwargs) if on_cpu else WeightsOnlyDeepSpeedStrategy(**kwargs)


def _resolve_accelerator(accelerator: str) -> str:
    if accelerator in ("gpu", "cuda"):
        return "gpu"
    if accelerator == "cpu":
        return "cpu"
    if accelerator == "auto":
        return "gpu" if torch.cuda.is_available() else "cpu"
    raise RecipeError(f"trainer.accelerator: {accelerator!r} is not supported with DeepSpeed; use cpu, gpu or auto")


class WeightsOnlyDeepSpeedStrategy(DeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` whose resume reads the checkpoint folder without running pickled code.

    DeepSpeed's engine loads every shard with ``torch.load(weights_only=False)``: a tampered ``.pt`` in a run's
    checkpoint folder would execute on ``--resume``. Here each load is ``weights_only=True`` with the allow-list
    of plain classes DeepSpeed stores (``qat.checkpoint.deepspeed.weights_only_loads``).
    """

    def save_checkpoint(self, checkpoint: dict, filepath, storage_options: Optional[Any] = None) -> None:
        # The weights' checksum travels in the client state (model-states file) and is verified against the
        # consolidated weights when the folder is exported. Under ZeRO-3 this rank's state_dict holds only
        # placeholders, so there is nothing to hash.
        if not self.zero_stage_3:
            from qat.checkpoint.io import with_state_checksum

            checkpoint = with_state_checksum(checkpoint, record_dtypes=True)
        super().save_checkpoint(checkpoint, filepath, storage_options)

    def load_checkpoint(self, checkpoint_path, weights_only: Optional[bool] = None) -> dict[str, Any]:
        from qat.checkpoint.deepspeed import weights_only_loads
        from qat.checkpoint.integrity import load_error_reason

        try:
            with weights_only_loads():
                return super().load_checkpoint(checkpoint_path, weights_only=True)
        except pickle.UnpicklingError as exc:
            raise CheckpointError(f"cannot resume from DeepSpeed checkpoint {checkpoint_path}: "
                                  f"{load_error_reason(exc)}. Resume from another checkpoint (--resume <path>) "
                                  "or retrain") from exc


class CPUDeepSpeedStrategy(WeightsOnlyDeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` on CPU processes with gloo.

    Three things in Lightning 2.6 assume CUDA (environment.md §5), overridden here and nothing else:
    ``setup_environment`` rejects a non-CUDA accelerator, ``setup_distributed`` validates CUDA device indices,
    and ``deepspeed.initialize`` gets ``device_rank=root_device.index``, which is ``None`` on CPU.
    """

    strategy_name = "deepspeed_cpu"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Lightning's 2e8-element (DeepSpeed's 5e8) communication buckets cost ~3 s of page faults per step on
        # CPU (ZeRO-2 tiny model: 89 s vs 35 s per run); gloo gains nothing from buckets this large.
        kwargs.setdefault("reduce_bucket_size", CPU_BUCKET_ELEMENTS)
        kwargs.setdefault("allgather_bucket_size", CPU_BUCKET_ELEMENTS)
        super().__init__(*args, **kwargs)
        zero = self.config.setdefault("zero_optimization", {})
        zero.setdefault("reduce_bucket_size", CPU_BUCKET_ELEMENTS)
        zero.setdefault("allgather_bucket_size", CPU_BUCKET_ELEMENTS)
        if zero.get("offload_optimizer"):
            # On CPU the "offloaded" states already live in CPU memory; DeepSpeed would otherwise insist on its
            # compiled DeepSpeedCPUAdam instead of the recipe's torch optimizer.
            self.config.setdefault("zero_force_ds_cpu_optimizer", False)

    def setup_environment(self) -> None:
        _warn_if_slow_cpu_bf16(self.precision_plugin.precision)
        _default_torch_extensions_dir()
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        _skip_shared_memory_allreduce_build()
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        with _device_rank_from_local_rank():
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)

    def _initialize_deepspeed_inference(self, model) -> None:
        with _device_rank_from_local_rank():
            super()._initialize_deepspeed_inference(model)


def _warn_if_slow_cpu_bf16(precision: str) -> None:
    # DeepSpeed's bf16 keeps bf16 weights and runs every GEMM, backward included, in bf16: without AMX or
    # AVX512-BF16 torch has no fast bf16 CPU kernel and a step takes 10-60x longer than in fp32.
    if str(precision).startswith("bf16") and not cpu_has_fast_bf16():
        rank_zero_warn(f"DeepSpeed with precision={precision!r} on a CPU without AMX/AVX512-BF16: bf16 matmuls "
                       "run 10-60x slower than fp32 here. Use trainer.precision: 32-true (or run.precision: auto, "
                       "which picks it on this CPU).", category=UserWarning)


@contextmanager
def _device_rank_from_local_rank() -> Iterator[None]:
    """Within the block, ``deepspeed.initialize`` gets this process's local rank when Lightning passes the CPU
    device index ``None`` (DeepSpeed compares it with 0 and fails)."""
    import deepspeed

    initialize = deepspeed.initialize

    def initialize_with_device_rank(*args: Any, **kwargs: Any):
        ds_args = kwargs.get("args")
        if isinstance(ds_args, argparse.Namespace) and getattr(ds_args, "device_rank", 0) is None:
            local_rank = int(os.environ.get("LOCAL_RANK", 0))
            kwargs["args"] = argparse.Namespace(**{**vars(ds_args), "device_rank": local_rank})
        return initialize(*args, **kwargs)

    deepspeed.initialize = initialize_with_device_rank
    try:
        yield
    finally:
        deepspeed.initialize = initialize


def _default_torch_extensions_dir() -> None:
    # Any op DeepSpeed JIT-builds lands in the git-ignored cache and is reused by the next run.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(cache_dir("torch_extensions")))


def _skip_shared_memory_allreduce_build() -> None:
    # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (~55 s on a fresh machine) that only
    # ``inference_all_reduce`` uses; training collectives go through torch.distributed/gloo. Marking the op
    # incompatible is DeepSpeed's own "not available here" path (deepspeed/comm/torch.py build_shm_op).
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def release_process_group() -> None:
    """Destroy the default process group, if one was set up, while the interpreter is still whole.

    Left to interpreter exit, gloo's worker threads can still hold work objects whose destruction needs the GIL; a
    run that finished cleanly then aborts (SIGABRT, "terminate called without an active exception"), and ``srun
    --kill-on-bad-exit`` reports the job failed (pytorch/pytorch#179291). Call it once the run is done."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
