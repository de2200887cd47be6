"""``FP8Linear``: a linear layer whose GEMMs run on FP8-rounded operands, emulating Transformer Engine's FP8
training on any device (TE has no CPU path), and the model surgery that selects which linears train in FP8.

Forward: input and weight are cast to E4M3 with the recipe's scales; the matmul runs on the FP8 values (exact in
bf16/fp32) and the per-tensor scales are applied to its output, as TE's FP8 GEMM does. Backward: the output
gradient is cast to E5M2 (``format: hybrid``) or E4M3, and both gradient GEMMs reuse the FP8 input and weight of
the forward. Under ``mxfp8`` every GEMM operand is quantized in blocks of 32 along that GEMM's reduction dim.

Example usage::

    cfg = FP8Config(recipe="delayed", amax_history_len=16)
    convert_to_fp8(model, cfg)          # swaps the selected nn.Linear for FP8Linear, in place
"""

import fnmatch
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from jsonargparse.typing import NonNegativeInt, PositiveInt
from torch import nn

from qat.errors import RecipeError
from qat.nn.quantized import QuantizedLinear
from qat.quant.fp8 import (
    E4M3,
    E5M2,
    FP8_MAX,
    amax,
    delayed_scaling_update,
    fake_quantize_fp8_current,
    fp8_cast_stats,
    mx_cast_stats,
    mx_fake_quantize,
    quantize_fp8,
    scale_from_amax,
)
from qat.quant.ste import straight_through

RECIPES = ("delayed", "current", "mxfp8")
FORMATS = ("hybrid", "e4m3")
BACKENDS = ("emulated", "te")
# Index of each GEMM operand in the state buffers.
INPUT, WEIGHT, GRAD_OUTPUT = 0, 1, 2
OPERANDS = ("input", "weight", "grad_output")
# Buffer names of the FP8 state: written to checkpoints, not part of an exported model.
FP8_STATE_BUFFERS = ("fp8_amax_history", "fp8_scale")


@dataclass
class FP8Config:
    """Mixed FP8 training of linear layers (``model.fp8`` in a recipe).

    Attributes:
        recipe: ``delayed`` (TE ``DelayedScaling``: scales from an amax history), ``current`` (TE
            ``Float8CurrentScaling``: per-tensor scale from the tensor itself) or ``mxfp8`` (TE
            ``MXFP8BlockScaling``: blocks of 32 with power-of-two E8M0 scales, OCP MX v1.0).
        format: ``hybrid`` (E4M3 forward, E5M2 gradients) or ``e4m3`` (E4M3 everywhere).
        amax_history_len: amax history window of ``delayed``.
        amax_compute_algo: ``max`` over the window or the ``most_recent`` amax (``delayed``).
        margin: scale = (fp8_max / amax) / 2^margin (``delayed``).
        reduce_amax: take the maximum of each recorded amax over all ranks (``delayed``; TE's default), so that
            every rank casts with the same scales and the FP8 state in a checkpoint holds for all of them.
        backend: ``emulated`` (FP8 rounding emulated in PyTorch, any device) or ``te`` (Transformer Engine
            ``te.Linear``, CUDA with compute capability >= 8.9; install ``qat[te]``).
        quantized_layer_inputs: also cast the inputs of quantized layers (BitLinear) to E4M3 with a per-tensor
            current scale (straight-through gradient), so their GEMM is FP8 activations x ternary codes, both exact
            in E4M3. Needs ``model.quant.activation: none`` (FP8 replaces the int8 activations); emulated only.
        keep_high_precision: module-name patterns (fnmatch, full name or last component) of linears that stay
            in high precision; by default the output layer and the first decoder layer, as TE and the FP8
            training papers recommend.
    """

    recipe: Literal["delayed", "current", "mxfp8"] = "delayed"
    format: Literal["hybrid", "e4m3"] = "hybrid"
    # Restricted types: a recipe with a bad value is rejected while parsing, with the key named.
    amax_history_len: PositiveInt = 1024
    amax_compute_algo: Literal["max", "most_recent"] = "max"
    margin: NonNegativeInt = 0
    reduce_amax: bool = True
    quantized_layer_inputs: bool = False
    backend: Literal["emulated", "te"] = "emulated"
    keep_high_precision: list[str] = field(default_factory=lambda: ["lm_head", "model.layers.0.*"])

    def __post_init__(self):
        for key, value, allowed in (("recipe", self.recipe, RECIPES), ("format", self.format, FORMATS),
                                    ("amax_compute_algo", self.amax_compute_algo, ("max", "most_recent")),
                                    ("backend", self.backend, BACKENDS)):
            if value not in allowed:
                raise RecipeError(f"model.fp8.{key}={value!r} is not one of {', '.join(allowed)}")
        if not isinstance(self.amax_history_len, int) or self.amax_history_len < 1:
            raise RecipeError(f"model.fp8.amax_history_len={self.amax_history_len!r} must be a positive integer "
                              "(TE's default is 1024)")
        if not isinstance(self.margin, int) or self.margin < 0:
            raise RecipeError(f"model.fp8.margin={self.margin!r} must be a non-negative integer")
        # Plain ints: checkpoints store this config and are loaded with weights_only=True.
        self.amax_history_len, self.margin = int(self.amax_history_len), int(self.margin)
        if isinstance(self.keep_high_precision, str):
            raise RecipeError("model.fp8.keep_high_precision must be a list of module-name patterns, "
                              f"e.g. [{self.keep_high_precision!r}]")

    def check_recipe_options(self) -> None:
        """Options that only one recipe reads must not be set for another (checked when the model is built: a
        dataclass error inside ``Optional[FP8Config]`` would reach the CLI wrapped in a parser traceback)."""
        if self.recipe != "delayed" and (self.margin != 0 or self.amax_compute_algo != "max"):
            raise RecipeError(f"model.fp8.margin and model.fp8.amax_compute_algo apply to recipe 'delayed' only; "
                              f"remove them for recipe {self.recipe!r}")
        if self.quantized_layer_inputs and self.backend != "emulated":
            raise RecipeError("model.fp8.quantized_layer_inputs is emulated only; set model.fp8.backend=emulated")

    @property
    def history_len(self) -> int:
        return self.amax_history_len if self.recipe == "delayed" else 1

    @property
    def grad_dtype(self) -> torch.dtype:
        return E5M2 if self.format == "hybrid" else E4M3


@dataclass
class _GemmArgs:
    """What the autograd function needs besides tensors: the config and the layer holding the FP8 state."""

    cfg: FP8Config
    layer: "FP8Linear"
    record: bool  # update amax history / scales (training) or only use them (evaluation)


def _per_tensor_scale(layer: "FP8Linear", index: int, x: torch.Tensor, dtype: torch.dtype,
                      args: _GemmArgs) -> torch.Tensor:
    """The scale to cast ``x`` with, recording its amax in the layer's state."""
    x_amax = amax(x)
    if args.cfg.recipe == "current":
        scale = scale_from_amax(x_amax, FP8_MAX[dtype])
        if args.record:
            layer.fp8_amax_history[0, index] = x_amax
            layer.fp8_scale[index] = scale
        return scale
    scale = layer.fp8_scale[index].clone()
    if args.record:
        if args.cfg.reduce_amax and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(x_amax, op=dist.ReduceOp.MAX)
        layer.fp8_amax_history[0, index] = x_amax
    return scale


def _update_delayed(layer: "FP8Linear", indices: slice, fp8_max: float, cfg: FP8Config) -> None:
    # TE updates forward scales when the forward's autocast exits and backward scales after the backward.
    history, scale = delayed_scaling_update(layer.fp8_amax_history[:, indices], layer.fp8_scale[indices], fp8_max,
                                            cfg.margin, cfg.amax_compute_algo)
    layer.fp8_amax_history[:, indices] = history
    layer.fp8_scale[indices] = scale


def _collect(layer: "FP8Linear", index: int, x: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> None:
    """Statistics of one cast when armed; ``scale=None``: MXFP8 blocks along the last dim (no single scale)."""
    if layer.fp8_stats is None:
        return
    saturated, underflow = fp8_cast_stats(x, scale, dtype) if scale is not None else mx_cast_stats(x, dtype)
    name = OPERANDS[index]
    layer.fp8_stats.update({f"{name}/amax": float(amax(x)), f"{name}/saturated_frac": saturated,
                            f"{name}/underflow_frac": underflow})
    if scale is not None:
        layer.fp8_stats[f"{name}/scale"] = float(scale)


def _forward_impl(x2d: torch.Tensor, weight: torch.Tensor, args: _GemmArgs):
    """``y = x @ W^T`` on FP8 operands; returns ``y`` (fp32) and what the backward needs."""
    layer, cfg = args.layer, args.cfg
    if cfg.recipe == "mxfp8":
        _collect(layer, INPUT, x2d, None, E4M3)
        _collect(layer, WEIGHT, weight, None, E4M3)
        y = F.linear(mx_fake_quantize(x2d, E4M3), mx_fake_quantize(weight, E4M3))
        if args.record:
            layer.fp8_amax_history[0, INPUT], layer.fp8_amax_history[0, WEIGHT] = amax(x2d), amax(weight)
        # The gradient GEMMs reduce over other dims (out_features for dgrad, tokens for wgrad), so input and weight
        # are also quantized along those now, as TE's columnwise MXFP8 copies (the weight may be released after
        # the forward, e.g. under ZeRO-3).
        return y, (mx_fake_quantize(x2d, E4M3, dim=0), mx_fake_quantize(weight, E4M3, dim=0))
    scale_x = _per_tensor_scale(layer, INPUT, x2d, E4M3, args)
    scale_w = _per_tensor_scale(layer, WEIGHT, weight, E4M3, args)
    _collect(layer, INPUT, x2d, scale_x, E4M3)
    _collect(layer, WEIGHT, weight, scale_w, E4M3)
    qx, qw = quantize_fp8(x2d, scale_x, E4M3), quantize_fp8(weight, scale_w, E4M3)
    # The GEMM runs on FP8 values (exact in fp32) and the scales multiply its output, as TE's FP8 GEMM.
    y = (qx.float() @ qw.float().t()) * (scale_x.reciprocal() * scale_w.reciprocal())
    if args.record and cfg.recipe == "delayed":
        _update_delayed(layer, slice(INPUT, WEIGHT + 1), FP8_MAX[E4M3], cfg)
    return y, (qx, qw, scale_x, scale_w)


def _backward_impl(grad_y: torch.Tensor, saved: tuple, args: _GemmArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of input (2-D) and weight from the FP8 output gradient."""
    layer, cfg, dtype = args.layer, args.cfg, args.cfg.grad_dtype
    grad_y = grad_y.float()
    if cfg.recipe == "mxfp8":
        x_by_tokens, w_by_out = saved
        _collect(layer, GRAD_OUTPUT, grad_y, None, dtype)
        # Each GEMM quantizes its operands along its own reduction dim: out_features for dgrad, tokens for wgrad.
        grad_x = mx_fake_quantize(grad_y, dtype, dim=-1) @ w_by_out
        grad_w = mx_fake_quantize(grad_y, dtype, dim=0).t() @ x_by_tokens
        if args.record:
            layer.fp8_amax_history[0, GRAD_OUTPUT] = amax(grad_y)
        return grad_x, grad_w
    qx, qw, scale_x, scale_w = saved
    scale_g = _per_tensor_scale(layer, GRAD_OUTPUT, grad_y, dtype, args)
    _collect(layer, GRAD_OUTPUT, grad_y, scale_g, dtype)
    qg = quantize_fp8(grad_y, scale_g, dtype).float()
    inv_g = scale_g.reciprocal()
    grad_x = (qg @ qw.float()) * (inv_g * scale_w.reciprocal())
    grad_w = (qg.t() @ qx.float()) * (inv_g * scale_x.reciprocal())
    if args.record and cfg.recipe == "delayed":
        _update_delayed(layer, slice(GRAD_OUTPUT, GRAD_OUTPUT + 1), FP8_MAX[dtype], cfg)
    return grad_x, grad_w


class _FP8LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, args: _GemmArgs):
        x2d = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            y, saved = _forward_impl(x2d, weight, args)
        ctx.args, ctx.saved_fp8 = args, saved
        ctx.x_shape, ctx.x_dtype, ctx.w_dtype, ctx.has_bias = x.shape, x.dtype, weight.dtype, bias is not None
        if bias is not None:
            y = y + bias.float()  # TE adds the bias in high precision after the FP8 GEMM
        return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        grad_2d = grad_y.reshape(-1, grad_y.shape[-1])
        with torch.no_grad():
            grad_x, grad_w = _backward_impl(grad_2d, ctx.saved_fp8, ctx.args)
        grad_b = grad_2d.float().sum(0) if ctx.has_bias else None  # from the unquantized gradient, as TE
        ctx.saved_fp8 = None
        return (grad_x.to(ctx.x_dtype).reshape(ctx.x_shape), grad_w.to(ctx.w_dtype),
                None if grad_b is None else grad_b.to(ctx.w_dtype), None)


class FP8Linear(nn.Linear):
    """``nn.Linear`` trained with emulated FP8 GEMMs. Its FP8 state is two buffers, saved in checkpoints:
    ``fp8_amax_history [history_len, 3]`` (row 0: amaxes since the last update) and ``fp8_scale [3]``, for
    (input, weight, output gradient).

    Set ``fp8_stats = {}`` to have the next forward/backward fill it with amax, scale, saturated and
    underflow fractions per operand (per-tensor recipes; costs an extra pass over each operand).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, fp8: FP8Config | None = None,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.fp8 = fp8 or FP8Config()
        self.register_buffer("fp8_amax_history", torch.zeros(self.fp8.history_len, 3, device=device))
        self.register_buffer("fp8_scale", torch.ones(3, device=device))
        self.fp8_stats: dict[str, float] | None = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, fp8: FP8Config) -> "FP8Linear":
        """An FP8 layer holding ``linear``'s weight (and bias)."""
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, fp8=fp8,
                    device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def to_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` with this layer's weights (FP8 state dropped)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype)
        linear.load_state_dict({k: v for k, v in self.state_dict().items() if k not in FP8_STATE_BUFFERS})
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        args = _GemmArgs(self.fp8, self, record=self.training and torch.is_grad_enabled())
        return _FP8LinearFunction.apply(x, self.weight, self.bias, args)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8={self.fp8.recipe}/{self.fp8.format}"


def keeps_high_precision(name: str, patterns: list[str]) -> bool:
    last = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(last, p) for p in patterns)


def fp8_candidates(model: nn.Module, cfg: FP8Config) -> list[str]:
    """Names of the linears ``cfg`` selects: plain full-precision ``nn.Linear`` not kept in high precision, never a
    quantized layer such as ``BitLinear`` (its weight is not a full-precision GEMM operand)."""
    # Exact type, not isinstance: every nn.Linear subclass (QuantizedLinear, FP8Linear, ...) is left alone.
    return [name for name, m in model.named_modules()
            if type(m) is nn.Linear and not keeps_high_precision(name, cfg.keep_high_precision)]


def _fp8_input_hook(module: nn.Module, args: tuple) -> tuple:
    x = args[0]
    return (straight_through(x, fake_quantize_fp8_current(x.detach())), *args[1:])


def add_fp8_inputs_to_quantized_layers(model: nn.Module, cfg: FP8Config) -> list[str]:
    """Cast the input of every quantized layer not kept in high precision to E4M3 (forward pre-hook); returns
    their names.

    Raises:
        RecipeError: a quantized layer quantizes its inputs itself (``quant.activation`` is not ``none``).
    """
    names = [name for name, m in model.named_modules()
             if isinstance(m, QuantizedLinear) and not keeps_high_precision(name, cfg.keep_high_precision)]
    for name in names:
        layer = model.get_submodule(name)
        if layer.quant.activation != "none":
            raise RecipeError(f"model.fp8.quantized_layer_inputs replaces the activation quantization of {name}; "
                              f"set model.quant.activation: none (it is {layer.quant.activation!r})")
        layer.register_forward_pre_hook(_fp8_input_hook)
    return names


def convert_to_fp8(model: nn.Module, cfg: FP8Config) -> list[str]:
    """Swap the linears ``cfg`` selects for ``FP8Linear`` (backend ``emulated``), in place, and with
    ``quantized_layer_inputs`` cast the inputs of quantized layers to E4M3; returns the names of all of them.

    Raises:
        RecipeError: options of another recipe are set, or no layer is selected (e.g. a ternary model whose only
            full-precision linear is the kept ``lm_head``).
    """
    cfg.check_recipe_options()
    names = fp8_candidates(model, cfg)
    if cfg.quantized_layer_inputs:
        names += add_fp8_inputs_to_quantized_layers(model, cfg)
    if not names:
        raise RecipeError("model.fp8 selects no linear layer: quantized layers (BitLinear) never run in FP8 and "
                          f"model.fp8.keep_high_precision={cfg.keep_high_precision} keeps the rest; remove patterns "
                          "from keep_high_precision or drop model.fp8")
    for name in names:
        if type(model.get_submodule(name)) is nn.Linear:
            model.set_submodule(name, FP8Linear.from_linear(model.get_submodule(name), cfg))
    return names


def fp8_layers(model: nn.Module) -> dict[str, FP8Linear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, FP8Linear)}
