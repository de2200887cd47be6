"""Checks that need a CUDA GPU, run by scripts/gpu-check.sh (one summary line each): a Transformer Engine FP8
training step against the emulation, the compiled Triton packed kernel against its float64 reference, and
DeepSpeed ZeRO-2 on NCCL with one GPU (with emulated FP8 layers). Elsewhere they skip, saying why."""

import pytest
import torch

from qat.nn.bitlinear import BitLinear
from qat.nn.config import ArchConfig, QuantConfig
from qat.nn.fp8_linear import FP8Config, FP8Linear
from qat.train.fp8 import fp8_autocast, te_available

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run scripts/gpu-check.sh)")]


def _fp8_capable() -> tuple[bool, str]:
    if not torch.cuda.is_available():
        return False, "no CUDA GPU"
    if torch.cuda.get_device_capability() < (8, 9):
        return False, f"FP8 GEMMs need compute capability >= 8.9, this GPU has {torch.cuda.get_device_capability()}"
    return te_available()


@pytest.mark.parametrize("recipe", ["delayed", "current"])
def test_te_fp8_step_matches_emulation(recipe):
    ok, reason = _fp8_capable()
    if not ok:
        pytest.skip(reason)
    import transformer_engine.pytorch as te

    torch.manual_seed(0)
    cfg = FP8Config(recipe=recipe, amax_history_len=4, backend="te")
    emulated = FP8Linear(256, 128, bias=True, fp8=FP8Config(recipe=recipe, amax_history_len=4)).cuda()
    te_layer = te.Linear(256, 128, bias=True, params_dtype=torch.float32, device="cuda")
    with torch.no_grad():
        te_layer.weight.copy_(emulated.weight)
        te_layer.bias.copy_(emulated.bias)
    for step in range(3):  # delayed: the scales of steps 1 and 2 come from the history
        x = (torch.randn(64, 256, device="cuda") * (step + 1)).requires_grad_(True)
        x_te = x.detach().clone().requires_grad_(True)
        grad = torch.randn(64, 128, device="cuda") * 1e-2
        y = emulated(x)
        with fp8_autocast(cfg):
            y_te = te_layer(x_te)
        y.backward(grad)
        y_te.backward(grad)
        for ours, theirs, what in ((y, y_te, "output"), (x.grad, x_te.grad, "input grad"),
                                   (emulated.weight.grad, te_layer.weight.grad, "weight grad")):
            rel = ((ours.float() - theirs.float()).norm() / theirs.float().norm()).item()
            assert rel < 1e-2, f"step {step} {what}: relative difference {rel:.2e}"
        emulated.weight.grad = None
        te_layer.weight.grad = None


def test_te_backend_in_the_module_swaps_only_full_precision_linears():
    ok, reason = _fp8_capable()
    if not ok:
        pytest.skip(reason)
    import transformer_engine.pytorch as te

    from qat.train.module import QATLanguageModel

    arch = ArchConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2)
    module = QATLanguageModel(arch=arch, quant=QuantConfig(), fp8=FP8Config(backend="te", keep_high_precision=[]))
    n_bitlinear = sum(isinstance(m, BitLinear) for m in module.modules())
    module.configure_model()
    module = module.cuda()
    assert isinstance(module.model.lm_head, te.Linear)
    assert sum(isinstance(m, BitLinear) for m in module.modules()) == n_bitlinear
    ids = torch.randint(0, 256, (2, 64), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = module(ids)
    logits.float().mean().backward()
    assert module.model.lm_head.weight.grad is not None and torch.isfinite(logits).all()


def test_triton_packed_kernel_on_gpu_matches_reference():
    pytest.importorskip("triton")
    from qat.kernels.triton_packed import packed_linear_triton
    from tests.references.packed_linear_reference import assert_matches_reference, random_problem

    for bits, (tokens, rows, in_features, groups) in ((2, (33, 96, 512, 2)), (1, (5, 64, 1024, 1))):
        codes, packed, scale, x = random_problem(bits, tokens, rows, in_features, groups, seed=3)
        y = packed_linear_triton(x.cuda(), packed.cuda(), scale.cuda(), bits, in_features, in_features // groups)
        assert y.is_cuda
        assert_matches_reference(y.cpu(), x, codes, scale)


def test_deepspeed_zero2_on_nccl_one_gpu_with_fp8_layers():
    pytest.importorskip("deepspeed")
    import lightning as L
    from torch.utils.data import DataLoader

    from qat.nn.fp8_linear import convert_to_fp8
    from qat.train.strategies import build_strategy
    from tests.train.distributed_loss_curve import TinyRegressor, make_data

    L.seed_everything(0, verbose=False)
    model = TinyRegressor()
    convert_to_fp8(model.net, FP8Config(keep_high_precision=[]))
    trainer = L.Trainer(accelerator="gpu", devices=1, strategy=build_strategy("deepspeed_stage_2", "gpu"),
                        max_epochs=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(model, DataLoader(make_data(), batch_size=8))
    assert type(trainer.strategy.model).__name__ == "DeepSpeedEngine"
    assert torch.distributed.get_backend() == "nccl"
    assert min(model.global_losses[-4:]) < model.global_losses[0] / 3
