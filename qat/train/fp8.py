"""Mixed FP8 training, wired into the LightningModule: the emulated backend (``FP8Linear``) or Transformer Engine.

Lightning's TE precision plugin is not used: it swaps every ``nn.Linear`` subclass (BitLinear included) for
``te.Linear``, fails on linears without bias, and refuses DeepSpeed. Here the swap selects layers like the
emulation does and runs in ``configure_model``, before the strategy wraps the model, so DeepSpeed sees TE's
parameters; the forward runs under ``te.autocast`` (``fp8_autocast`` on older TE), the backward outside it.
"""

import contextlib
import importlib.util

import torch
from torch import nn

from qat.errors import RecipeError
from qat.nn.fp8_linear import FP8Config, convert_to_fp8, fp8_candidates

__all__ = ["FP8Config", "prepare_fp8", "swap_to_te", "fp8_autocast", "te_available"]

TE_INSTALL_HINT = 'pip install --no-build-isolation "qat[te]"'


def te_available() -> tuple[bool, str]:
    """Whether Transformer Engine's PyTorch API imports here, and why not."""
    if importlib.util.find_spec("transformer_engine") is None:
        return False, "transformer_engine is not installed"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as exc:  # the CPU meta wheel raises RuntimeError; missing CUDA libraries raise OSError
        return False, f"transformer_engine does not import: {str(exc).splitlines()[0] if str(exc) else exc!r}"
    return True, ""


def require_te() -> None:
    ok, reason = te_available()
    if not ok:
        raise RecipeError(f"model.fp8.backend=te needs Transformer Engine on a CUDA GPU ({reason}); install the "
                          f"`te` extra with `{TE_INSTALL_HINT}` or set model.fp8.backend=emulated")


def prepare_fp8(model: nn.Module, cfg: FP8Config | None) -> list[str]:
    """Names of the linears that train in FP8. The emulated backend swaps them now; ``te`` checks that TE is
    usable (so a missing install fails before any compute) and leaves the swap to :func:`swap_to_te`."""
    if cfg is None:
        return []
    if cfg.backend == "te":
        cfg.check_recipe_options()
        require_te()
        names = fp8_candidates(model, cfg)
        if not names:
            raise RecipeError("model.fp8 selects no linear layer; remove patterns from model.fp8.keep_high_precision")
        return names
    return convert_to_fp8(model, cfg)


def te_recipe(cfg: FP8Config):
    """The TE recipe object of ``cfg``."""
    from transformer_engine.common import recipe

    fmt = recipe.Format.HYBRID if cfg.format == "hybrid" else recipe.Format.E4M3
    if cfg.recipe == "delayed":
        return recipe.DelayedScaling(margin=cfg.margin, fp8_format=fmt, amax_history_len=cfg.amax_history_len,
                                     amax_compute_algo=cfg.amax_compute_algo, reduce_amax=cfg.reduce_amax)
    if cfg.recipe == "current":
        return recipe.Float8CurrentScaling(fp8_format=fmt)
    return recipe.MXFP8BlockScaling(fp8_format=fmt)


def swap_to_te(model: nn.Module, names: list[str]) -> None:
    """Replace the named plain ``nn.Linear`` by ``te.Linear`` holding the same weights (call before the strategy
    wraps the model). Only plain linears are ever named (see ``fp8_candidates``), never a BitLinear."""
    import transformer_engine.pytorch as te

    for name in names:
        linear = model.get_submodule(name)
        if type(linear) is not nn.Linear:  # already swapped (configure_model may run twice) or not a plain linear
            continue
        layer = te.Linear(linear.in_features, linear.out_features, bias=linear.bias is not None,
                          params_dtype=linear.weight.dtype, device="cuda")
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        model.set_submodule(name, layer)


def fp8_autocast(cfg: FP8Config | None):
    """The context the forward runs in: TE's autocast for ``backend: te``, nothing for the emulation."""
    if cfg is None or cfg.backend != "te":
        return contextlib.nullcontext()
    import transformer_engine.pytorch as te

    if hasattr(te, "autocast"):
        return te.autocast(enabled=True, recipe=te_recipe(cfg))
    return te.fp8_autocast(enabled=True, fp8_recipe=te_recipe(cfg))
