"""Packed low-bit linear on a CUDA GPU, measured side by side in one run: qat's CUDA dp4a GEMV and Triton packed
kernel (activation quantization included) against torch bf16 dense, torch int8 (``torch._int_mm``) and the
tensor cores' FP8 GEMM (``torch._scaled_mm``), for the Llama-7B shapes; prints the GPU, times (CUDA events,
median of ``--reps``), the ternary kernel alone (activations already quantized) and its weight-read bandwidth.

    python bench/gpu_kernels.py [--reps 50]
"""

import argparse
import statistics

import torch
import torch.nn.functional as F

from qat.kernels.cuda_gemv import launch_gemv, packed_gemv_cuda, quantize_activations
from qat.kernels.triton_packed import packed_linear_triton
from qat.pack.kernel_layout import pack_binary_1bit, pack_ternary_2bit

SHAPES = ((4096, 4096), (4096, 11008))
BATCHES = (1, 8, 64, 512)


def median_ms(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    props = torch.cuda.get_device_properties(0)
    print(f"GPU: {props.name}, {props.multi_processor_count} SMs, capability {props.major}.{props.minor}, "
          f"torch {torch.__version__}")
    print("| K x N | batch | bf16 ms | int8 ms | fp8 ms | ternary CUDA ms | ternary Triton ms | binary CUDA ms "
          "| ternary CUDA kernel alone ms | ternary CUDA vs bf16 | vs int8 | vs fp8 | kernel alone GB/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for k, n in SHAPES:
        ternary = torch.randint(-1, 2, (n, k), generator=gen)
        binary = torch.randint(0, 2, (n, k), generator=gen) * 2 - 1
        packed_t, packed_b = pack_ternary_2bit(ternary).cuda(), pack_binary_1bit(binary).cuda()
        scale = (torch.rand(n, 1, generator=gen) + 0.5).cuda()
        w_bf16 = ternary.to(torch.bfloat16).cuda()
        w_int8_t = ternary.to(torch.int8).cuda().t()
        w_fp8_t = ternary.to(torch.float8_e4m3fn).cuda().t()
        one = torch.ones((), device="cuda")
        for batch in BATCHES:
            x = torch.randn(batch, k, device="cuda")
            x_bf16 = x.to(torch.bfloat16)
            x_int8 = torch.randint(-127, 128, (max(batch, 17), k), device="cuda", dtype=torch.int8)  # _int_mm: M>16
            x_fp8 = x.to(torch.float8_e4m3fn)
            pad = (-batch) % 16
            x_fp8 = F.pad(x_fp8.float(), (0, 0, 0, pad)).to(torch.float8_e4m3fn)  # _scaled_mm: M % 16 == 0
            t = {
                "bf16": median_ms(lambda: F.linear(x_bf16, w_bf16), args.reps),
                "int8": median_ms(lambda: torch._int_mm(x_int8, w_int8_t), args.reps),
                "fp8": median_ms(lambda: torch._scaled_mm(x_fp8, w_fp8_t, scale_a=one, scale_b=one,
                                                          out_dtype=torch.bfloat16), args.reps),
                "tc": median_ms(lambda: packed_gemv_cuda(x, packed_t, scale, 2, k), args.reps),
                "tt": median_ms(lambda: packed_linear_triton(x, packed_t, scale, 2, k, k), args.reps),
                "bc": median_ms(lambda: packed_gemv_cuda(x, packed_b, scale, 1, k), args.reps),
            }
            quantized = quantize_activations(x, k, packed_t.shape[1], 2)
            w_scale = scale.reshape(-1).contiguous()
            t["kernel"] = median_ms(lambda: launch_gemv(*quantized, packed_t, w_scale, 2), args.reps)
            gbs = packed_t.numel() / (t["kernel"] * 1e-3) / 1e9
            print(f"| {k}x{n} | {batch} | {t['bf16']:.4f} | {t['int8']:.4f} | {t['fp8']:.4f} | {t['tc']:.4f} | "
                  f"{t['tt']:.4f} | {t['bc']:.4f} | {t['kernel']:.4f} | {t['bf16'] / t['tc']:.2f}x | "
                  f"{t['int8'] / t['tc']:.2f}x | {t['fp8'] / t['tc']:.2f}x | {gbs:.0f} |", flush=True)


if __name__ == "__main__":
    main()
