"""QAT health metrics on hand-made layers: the latent weights are set by hand, so which codes are zero, which flip
between two calls and what the scales are is known exactly."""

import pytest
import torch
from torch import nn

from qat.nn.bitlinear import BitLinear
from qat.nn.config import QuantConfig
from qat.nn.fbi_linear import FBILinear
from qat.train.monitor import QATHealthMonitor


def _model(**layers: nn.Module) -> nn.Module:
    """A model whose layers sit at ``model.layers.0.<name>`` (their health group is ``<name>``)."""
    block = nn.ModuleDict(layers)
    return nn.ModuleDict({"model": nn.ModuleDict({"layers": nn.ModuleList([block])})})


def _set(param: torch.Tensor, values) -> None:
    with torch.no_grad():
        param.copy_(torch.tensor(values, dtype=param.dtype))


def test_bitlinear_zero_flip_and_scale_stats():
    layer = BitLinear(4, 2, quant=QuantConfig(granularity="row"))
    # absmean per row: row 0 scale (0.8 + 0.8) / 4 = 0.4, codes [1, -1, 0, 0];
    #                  row 1 scale 1.8 / 4 = 0.45, 0.6 / 0.45 = 1.33 -> codes [1, 1, -1, 0].
    _set(layer.weight, [[0.8, -0.8, 0.0, 0.0], [0.6, 0.6, -0.6, 0.0]])
    monitor = QATHealthMonitor()
    model = _model(q_proj=layer)
    first = monitor.health_metrics(model)
    assert first["qat/q_proj/zero_frac"] == pytest.approx(3 / 8)
    assert "qat/q_proj/flip_frac" not in first          # nothing to compare against yet
    assert first["qat/q_proj/scale_min"] == pytest.approx(0.4)
    assert first["qat/q_proj/scale_max"] == pytest.approx(0.45)
    assert first["qat/q_proj/scale_mean"] == pytest.approx(0.425)
    # Row 0: one sign flips (-1 -> 1). Row 1: the zero becomes 1 (scale 2.4 / 4 = 0.6, codes [1, 1, -1, 1]).
    _set(layer.weight, [[0.8, 0.8, 0.0, 0.0], [0.6, 0.6, -0.6, 0.6]])
    second = monitor.health_metrics(model)
    assert second["qat/q_proj/flip_frac"] == pytest.approx(2 / 8)
    assert second["qat/q_proj/zero_frac"] == pytest.approx(2 / 8)
    assert second["qat/q_proj/scale_min"] == pytest.approx(0.4)
    assert second["qat/q_proj/scale_max"] == pytest.approx(0.6)
    # Unchanged weights: no flips.
    assert monitor.health_metrics(model)["qat/q_proj/flip_frac"] == 0.0


def test_binary_layer_signs_flips_and_effective_weight_scale():
    layer = FBILinear(3, 2, quant=QuantConfig(weight="fbi_binary", activation="none"))
    _set(layer.weight, [[0.1, -0.1, 0.1], [-0.1, 0.1, -0.1]])
    _set(layer.alpha, [1.0, 2.0, 3.0])
    _set(layer.beta, [0.5, 0.0, 0.0])
    # Effective weight alpha * sign + beta: row 0 [1.5, -2, 3] -> mean |.| 6.5 / 3; row 1 [-0.5, 2, -3] -> 5.5 / 3.
    monitor = QATHealthMonitor()
    model = _model(up_proj=layer)
    first = monitor.health_metrics(model)
    assert first["qat/up_proj/zero_frac"] == 0.0
    assert first["qat/up_proj/scale_min"] == pytest.approx(5.5 / 3)
    assert first["qat/up_proj/scale_max"] == pytest.approx(6.5 / 3)
    assert first["qat/up_proj/scale_mean"] == pytest.approx(2.0)
    # Two codes flip: (0, 1) -0.1 -> 0.1, and (1, 2) -0.1 -> 0.0, since sign(0) = +1 (a binary code is never 0).
    _set(layer.weight, [[0.1, 0.1, 0.1], [-0.1, 0.1, 0.0]])
    second = monitor.health_metrics(model)
    assert second["qat/up_proj/flip_frac"] == pytest.approx(2 / 6)
    assert second["qat/up_proj/zero_frac"] == 0.0
    # Row 0 is now [1.5, 2, 3] -> 6.5 / 3; row 1 [-0.5, 2, 3] -> 5.5 / 3.
    assert second["qat/up_proj/scale_max"] == pytest.approx(6.5 / 3)
    assert second["qat/up_proj/scale_min"] == pytest.approx(5.5 / 3)


def test_layers_of_one_role_aggregate_and_full_precision_layers_are_ignored():
    a, b = BitLinear(4, 1), BitLinear(4, 1)
    _set(a.weight, [[1.0, 0.0, 0.0, 0.0]])       # 3 zeros of 4, scale 0.25
    _set(b.weight, [[1.0, 1.0, 1.0, 1.0]])       # no zero, scale 1
    block_a = nn.ModuleDict({"o_proj": a, "lm_head": nn.Linear(4, 4)})
    model = nn.ModuleDict({"layers": nn.ModuleList([block_a, nn.ModuleDict({"o_proj": b})])})
    metrics = QATHealthMonitor().health_metrics(model)
    assert set(metrics) == {f"qat/o_proj/{k}" for k in ("zero_frac", "scale_mean", "scale_min", "scale_max")}
    assert metrics["qat/o_proj/zero_frac"] == pytest.approx(3 / 8)
    assert metrics["qat/o_proj/scale_mean"] == pytest.approx((0.25 + 1.0) / 2)
