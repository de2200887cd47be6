"""FP8 numerics (pure functions): saturating casts to E4M3 / E5M2 and the scale recipes of Transformer Engine
(delayed and current per-tensor scaling) and of the OCP Microscaling spec v1.0 (MXFP8: blocks of 32 sharing a
power-of-two E8M0 scale).

Conventions follow TE: a per-tensor ``scale`` multiplies before the cast (``q = fp8(x * scale)``) and its
reciprocal ``scale_inv`` multiplies after (``x ~ q * scale_inv``). MX block scales ``X`` divide before the cast
(``q = fp8(x / X)``, ``x ~ q * X``); being powers of two, both directions are exact in fp32.
"""

import torch

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
FP8_MAX = {E4M3: 448.0, E5M2: 57344.0}
# emax_elem of the OCP MX spec: exponent of the largest normal of the element format (448 = 1.75 * 2^8).
FP8_EMAX = {E4M3: 8, E5M2: 15}
MX_BLOCK_SIZE = 32
E8M0_EXP_MIN, E8M0_EXP_MAX = -127, 127
FP32_MAX = torch.finfo(torch.float32).max
FP8_FORMATS = {"e4m3": E4M3, "e5m2": E5M2}


def cast_to_fp8(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` rounded to the nearest ``dtype`` value (ties to even, subnormals kept), saturating at +-max; NaN stays
    NaN. torch's own E5M2 cast overflows to inf; TE converts with CUDA's ``__NV_SATFINITE``
    mode, which clamps out-of-range values (inf included) to the largest finite value, hence the clamp."""
    limit = FP8_MAX[dtype]
    return x.float().clamp(-limit, limit).to(dtype)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """FP8 codes of ``x * scale`` (per-tensor ``scale``, fp32 multiply as TE)."""
    return cast_to_fp8(x.float() * scale, dtype)


def dequantize_fp8(codes: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """fp32 values ``codes * scale_inv``."""
    return codes.float() * scale_inv


def fake_quantize_fp8_current(x: torch.Tensor, dtype: torch.dtype = E4M3) -> torch.Tensor:
    """``x`` rounded through ``dtype`` with its own per-tensor (current) scale and decoded back, in ``x``'s dtype."""
    scale = scale_from_amax(amax(x), FP8_MAX[dtype])
    return dequantize_fp8(quantize_fp8(x, scale, dtype), scale.reciprocal()).to(x.dtype)


def amax(x: torch.Tensor) -> torch.Tensor:
    """max |x| as an fp32 scalar (NaN if ``x`` holds a NaN, 0 for an empty tensor)."""
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    return x.detach().abs().amax().float()


def scale_from_amax(amax_value: torch.Tensor, fp8_max: float) -> torch.Tensor:
    """Current scaling (TE ``Float8CurrentScaling``, ``compute_scale_from_amax`` with epsilon 0 and no
    power-of-two rounding): ``fp8_max / amax``; 1 when amax is 0, inf or NaN; fp32 max when the quotient
    overflows (amax below ``fp8_max / fp32_max``)."""
    amax_value = amax_value.float()
    scale = torch.tensor(fp8_max, dtype=torch.float32, device=amax_value.device) / amax_value
    scale = torch.where(torch.isinf(scale), torch.full_like(scale, FP32_MAX), scale)
    unusable = torch.isinf(amax_value) | torch.isnan(amax_value) | (amax_value == 0)
    return torch.where(unusable, torch.ones_like(scale), scale)


def delayed_scaling_update(history: torch.Tensor, scale: torch.Tensor, fp8_max: float, margin: int = 0,
                           algo: str = "max") -> tuple[torch.Tensor, torch.Tensor]:
    """One TE ``DelayedScaling`` update (``amax_and_scale_update`` of TE's ``delayed_scaling.cu``).

    ``history`` is ``[amax_history_len, n]`` with row 0 holding the amaxes recorded since the last update;
    ``scale`` is ``[n]``. The amax used is the maximum over the whole window (``algo="max"``) or row 0
    (``"most_recent"``); the new scale is ``fp8_max * 2^-margin / amax``, or the previous scale when that amax is
    0 or not finite. The history is rolled by one (row 0 goes to the end, the next row-0 slot is zeroed), so an
    amax takes part in ``amax_history_len`` updates. Returns ``(new_history, new_scale)``.
    """
    if algo == "max":
        amax_value = history.amax(dim=0)
    elif algo == "most_recent":
        amax_value = history[0]
    else:
        raise ValueError(f"amax_compute_algo must be 'max' or 'most_recent', got {algo!r}")
    scaled_max = fp8_max * 2.0 ** (-margin)
    usable = torch.isfinite(amax_value) & (amax_value > 0)
    new_scale = torch.where(usable, scaled_max / torch.where(usable, amax_value, torch.ones_like(amax_value)), scale)
    new_history = torch.roll(history, shifts=-1, dims=0)
    new_history[0] = 0.0
    return new_history, new_scale


def mx_block_exponents(x: torch.Tensor, dtype: torch.dtype, block_size: int = MX_BLOCK_SIZE) -> torch.Tensor:
    """Shared exponents of the blocks of ``block_size`` along the last dim of ``x`` (zero-padded to a multiple):
    OCP MX v1.0 §6.3, ``floor(log2(amax)) - emax_elem`` clamped to the E8M0 range [-127, 127]; an all-zero block
    gets -127; a block whose amax is inf or NaN gets NaN (the E8M0 NaN encoding: the block decodes to NaN).
    Returns an fp32 tensor of shape ``x.shape[:-1] + (n_blocks,)``."""
    blocks = _blocks(x, block_size)
    block_amax = blocks.abs().amax(dim=-1)
    exponent = torch.floor(torch.log2(block_amax)) - FP8_EMAX[dtype]
    exponent = exponent.clamp(E8M0_EXP_MIN, E8M0_EXP_MAX)  # log2(0) = -inf -> -127
    return torch.where(torch.isfinite(block_amax), exponent, torch.full_like(exponent, float("nan")))


def mx_quantize(x: torch.Tensor, dtype: torch.dtype, dim: int = -1,
                block_size: int = MX_BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """MXFP8 codes of ``x`` in blocks along ``dim`` and their block scales ``X = 2^exponent`` (fp32, exact
    powers of two). Both are returned with ``dim`` last and padded to a multiple of ``block_size``, as
    ``codes [..., n_blocks, block_size]`` and ``scales [..., n_blocks]``."""
    moved = x.float().movedim(dim, -1)
    exponent = mx_block_exponents(moved, dtype, block_size)
    scales = torch.exp2(exponent)
    codes = cast_to_fp8(_blocks(moved, block_size) * torch.exp2(-exponent).unsqueeze(-1), dtype)
    # NaN scale: the whole block decodes to NaN (the cast alone would keep the finite elements finite).
    codes = torch.where(torch.isnan(exponent).unsqueeze(-1), torch.full_like(codes.float(), float("nan")).to(dtype),
                        codes)
    return codes, scales


def mx_fake_quantize(x: torch.Tensor, dtype: torch.dtype, dim: int = -1,
                     block_size: int = MX_BLOCK_SIZE) -> torch.Tensor:
    """``x`` rounded through MXFP8 along ``dim`` and decoded back (fp32, same shape as ``x``). Exact in fp32 and
    bf16 up to their own subnormal range: an FP8 value times a power of two."""
    codes, scales = mx_quantize(x, dtype, dim, block_size)
    decoded = (codes.float() * scales.unsqueeze(-1)).flatten(-2)
    length = x.shape[dim]
    return decoded[..., :length].movedim(-1, dim)


def fp8_cast_stats(x: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> tuple[float, float]:
    """Of the finite values of ``x``: the fraction that saturates (``|x * scale| > fp8_max``) and the fraction of
    nonzeros that underflow to zero when cast to ``dtype`` with ``scale``."""
    x = x.detach().float()
    finite = torch.isfinite(x)
    n = int(finite.sum())
    if n == 0:
        return 0.0, 0.0
    scaled = x * scale
    saturated = int(((scaled.abs() > FP8_MAX[dtype]) & finite).sum())
    nonzero = finite & (x != 0)
    underflow = int(((cast_to_fp8(scaled, dtype).float() == 0) & nonzero).sum())
    return saturated / n, underflow / max(int(nonzero.sum()), 1)


def mx_cast_stats(x: torch.Tensor, dtype: torch.dtype, block_size: int = MX_BLOCK_SIZE) -> tuple[float, float]:
    """:func:`fp8_cast_stats` of an MXFP8 cast in blocks along the last dim (each value divided by its block
    scale; the zero padding of a last partial block counts as values that neither saturate nor underflow)."""
    x = x.detach().float()
    exponent = mx_block_exponents(x, dtype, block_size)
    scaled = _blocks(x, block_size) * torch.exp2(-exponent).unsqueeze(-1)
    return fp8_cast_stats(scaled, torch.ones((), device=x.device), dtype)


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    pad = (-x.shape[-1]) % block_size
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], x.shape[-1] // block_size, block_size)
