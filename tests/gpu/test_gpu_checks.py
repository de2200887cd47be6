"""Checks that need a CUDA GPU, run by scripts/gpu-check.sh (one summary line each): the FP8 emulation against the
GPU's own FP8 GEMM (``torch._scaled_mm``) and against a Transformer Engine training step, the compiled Triton packed
kernel against its float64 reference, and DeepSpeed ZeRO-2 on NCCL with one GPU (with emulated FP8 layers).
Elsewhere they skip, saying why."""

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


def test_fp8_emulation_matches_the_gpus_fp8_gemm():
    """The emulated FP8 forward (codes cast in torch, GEMM in fp32 on the decoded values) equals the tensor cores'
    E4M3 GEMM on the same codes and scales: the casts and scale conventions the CPU tests check are the hardware's."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip(f"FP8 GEMMs need compute capability >= 8.9, this GPU has {torch.cuda.get_device_capability()}")
    from qat.quant.fp8 import E4M3, FP8_MAX, amax, quantize_fp8, scale_from_amax

    torch.manual_seed(0)
    layer = FP8Linear(512, 256, bias=False, fp8=FP8Config(recipe="current")).cuda()
    for scale_of_x in (1e-3, 1.0, 300.0):  # underflow-prone, plain, and beyond E4M3's range before scaling
        x = torch.randn(128, 512, device="cuda") * scale_of_x
        with torch.no_grad():
            emulated = layer(x)
            scale_x = scale_from_amax(amax(x), FP8_MAX[E4M3])
            scale_w = scale_from_amax(amax(layer.weight), FP8_MAX[E4M3])
            qx, qw = quantize_fp8(x, scale_x, E4M3), quantize_fp8(layer.weight, scale_w, E4M3)
            hardware = torch._scaled_mm(qx, qw.t(), scale_a=scale_x.reciprocal(), scale_b=scale_w.reciprocal(),
                                        out_dtype=torch.float32)
            exact = (qx.double() @ qw.double().t()) * (scale_x.double().reciprocal() * scale_w.double().reciprocal())

        def rel(y):
            return ((y.double() - exact).norm() / exact.norm()).item()

        # The emulation is the float64 product of the codes up to fp32 rounding; Hopper's FP8 tensor cores
        # accumulate with fewer mantissa bits (~14, DeepSeek-V3 report §3.3.2), measured 1.2e-4 here. A wrong
        # scale convention or cast would be off by orders of magnitude more.
        assert rel(emulated) < 1e-6, f"x scale {scale_of_x}: emulation vs float64 {rel(emulated):.2e}"
        assert rel(hardware) < 1e-3, f"x scale {scale_of_x}: tensor-core FP8 GEMM vs float64 {rel(hardware):.2e}"
        print(f"x scale {scale_of_x}: relative to float64: emulated {rel(emulated):.1e}, "
              f"tensor cores {rel(hardware):.1e}")


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


def test_cuda_gemv_on_gpu_matches_reference():
    """kernels/cuda/packed_gemv.cu built for this GPU with nvcc and run through its C launcher: ternary and binary
    decode GEMVs equal the float64 reference (the CPU tests only compile it)."""
    import shutil

    from qat.kernels.cuda_gemv import packed_gemv_cuda
    from tests.references.packed_linear_reference import assert_matches_reference, random_problem

    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not found on PATH")
    for bits, (tokens, rows, in_features) in ((2, (3, 200, 1024)), (1, (2, 96, 2048)), (2, (1, 4096, 4096)),
                                              (1, (4, 4096, 4096))):
        codes, packed, scale, x = random_problem(bits, tokens, rows, in_features, 1, seed=bits + tokens)
        y = packed_gemv_cuda(x.cuda(), packed.cuda(), scale.cuda(), bits, in_features)
        assert y.is_cuda
        assert_matches_reference(y.cpu(), x, codes, scale)


def test_deepspeed_zero2_on_nccl_one_gpu_with_fp8_layers():
    pytest.importorskip("deepspeed")
    import lightning as L
    from torch.utils.data import DataLoader

    from qat.nn.fp8_linear import convert_to_fp8
    from qat.train.strategies import build_strategy
    from tests.train.distributed_loss_curve import TinyRegressor, make_data

    def loss_curve(accelerator: str, strategy) -> tuple[list[float], L.Trainer]:
        L.seed_everything(0, verbose=False)
        model = TinyRegressor()
        convert_to_fp8(model.net, FP8Config(keep_high_precision=[]))
        trainer = L.Trainer(accelerator=accelerator, devices=1, strategy=strategy, max_epochs=4, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            use_distributed_sampler=False)
        trainer.fit(model, DataLoader(make_data(), batch_size=8))
        print(accelerator, type(trainer.strategy).__name__, [round(v, 5) for v in model.global_losses])
        return model.global_losses, trainer

    cpu_losses, _ = loss_curve("cpu", "auto")
    gpu_losses, trainer = loss_curve("gpu", build_strategy("deepspeed_stage_2", "gpu"))
    assert type(trainer.strategy.model).__name__ == "DeepSpeedEngine"
    assert torch.distributed.get_backend() == "nccl"
    # Same model, data, seed and optimizer: the first steps of the GPU ZeRO-2 run follow the plain CPU run (later
    # ones may part when a ternary code flips on an fp32 rounding difference); and it learns.
    torch.testing.assert_close(gpu_losses[:8], cpu_losses[:8], rtol=1e-3, atol=1e-5)
    assert gpu_losses[-1] < 0.8 * gpu_losses[0]
