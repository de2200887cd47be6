"""Float64 references of the FP8 formats, built from their bit patterns (OCP 8-bit floating point spec), not from
torch's casts: decode all 256 codes, then round to the nearest finite grid value with ties to the even code,
saturating at the largest finite value (TE's ``__NV_SATFINITE`` conversion). Also the delayed-scaling window and
the OCP MX shared exponent, written from their definitions."""

import math

import numpy as np

# (exponent bits, mantissa bits, bias, whether the all-ones exponent is inf/NaN (IEEE-like) or E4M3FN's NaN-only)
FORMATS = {"e4m3": (4, 3, 7, False), "e5m2": (5, 2, 15, True)}


def decode(code: int, fmt: str) -> float:
    """The value of one 8-bit code."""
    e_bits, m_bits, bias, ieee = FORMATS[fmt]
    sign = -1.0 if code >> 7 else 1.0
    exponent = (code >> m_bits) & ((1 << e_bits) - 1)
    mantissa = code & ((1 << m_bits) - 1)
    top = (1 << e_bits) - 1
    if ieee and exponent == top:
        return sign * math.inf if mantissa == 0 else math.nan
    if not ieee and exponent == top and mantissa == (1 << m_bits) - 1:
        return math.nan  # E4M3FN: S.1111.111 is NaN; no infinities
    if exponent == 0:
        return sign * mantissa / (1 << m_bits) * 2.0 ** (1 - bias)  # subnormal
    return sign * (1 + mantissa / (1 << m_bits)) * 2.0 ** (exponent - bias)


def positive_grid(fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """Finite non-negative values in increasing order and their codes."""
    values, codes = [], []
    for code in range(128):
        v = decode(code, fmt)
        if math.isfinite(v):
            values.append(v)
            codes.append(code)
    order = np.argsort(values)
    return np.asarray(values)[order], np.asarray(codes)[order]


def max_finite(fmt: str) -> float:
    return float(positive_grid(fmt)[0][-1])


def round_to_fp8(x: np.ndarray, fmt: str) -> np.ndarray:
    """float64 round-to-nearest-even onto the format's grid, saturating at +-max finite, NaN kept."""
    x = np.asarray(x, dtype=np.float64)
    values, codes = positive_grid(fmt)
    mag = np.minimum(np.abs(np.nan_to_num(x, nan=0.0, posinf=np.inf, neginf=np.inf)), values[-1])
    hi = np.clip(np.searchsorted(values, mag, side="left"), 0, len(values) - 1)  # first grid value >= mag
    lo = np.clip(hi - 1, 0, len(values) - 1)
    d_lo, d_hi = mag - values[lo], values[hi] - mag
    pick_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (codes[hi] % 2 == 0))
    out = np.where(pick_hi, values[hi], values[lo])
    out = np.where(mag == values[hi], values[hi], out)
    out = np.copysign(out, x)
    return np.where(np.isnan(x), np.nan, out)


def delayed_scales(amaxes: list[float], history_len: int, fp8_max: float, margin: int, algo: str,
                   initial_scale: float = 1.0) -> list[float]:
    """The scale in force after each step's update: from the amaxes of the last ``history_len`` steps (or the
    latest one), the previous scale kept when that amax is 0 or not finite."""
    scales, scale = [], initial_scale
    for t in range(len(amaxes)):
        window = amaxes[max(0, t - history_len + 1): t + 1]
        a = max(window) if algo == "max" else amaxes[t]
        if math.isfinite(a) and a > 0:
            scale = fp8_max / 2.0 ** margin / a
        scales.append(scale)
    return scales


def mx_exponent(block: np.ndarray, emax_elem: int) -> float:
    """OCP MX v1.0: shared_exp = floor(log2(max |V|)) - emax_elem, within E8M0's [-127, 127]."""
    a = float(np.max(np.abs(block)))
    if a == 0:
        return -127.0
    mantissa, exponent = math.frexp(a)  # a = mantissa * 2^exponent, mantissa in [0.5, 1)
    return float(min(max(exponent - 1 - emax_elem, -127), 127))
