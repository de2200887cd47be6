"""Packed low-bit kernels vs torch's dense and low-bit CPU paths, side by side in one run.

    python bench/kernels.py [--threads 2] [--reps 30] [--shapes 4096x4096] [--e2e-models 700M,24x2048,1.3B,8x2048]
        [--skip-kernels] [--skip-e2e]

For (K, N) in (2048, 2048), (4096, 4096), (4096, 11008) and batch 1, 8, 64, times y = x W^T for: torch fp32 and bf16
``F.linear``, torch w4a16 ``_weight_int4pack_mm_for_cpu`` (group 128), torch int8 dynamic quantization
(``quantized::linear_dynamic``), and qat's packed ternary (2-bit) and binary (1-bit) kernels, each with the weight
resident in cache (one weight reused) and streamed from memory (rotating over weight copies larger than twice the
last-level cache), the packed kernels bound to their weights as the decoder calls them. Prints the best of --reps
calls, ratios vs fp32 / bf16 / the best torch low-bit path, and the packed kernels' achieved GB/s over packed bytes
vs the memory read bandwidth measured here (batch 1 streamed also with each kernel called back to back, in rounds
alternating with the torch-sum roofline, against the roofline read beside it). Then the fp32 lm_head GEMV a packed
model keeps (torch vs qat) and its optional Q8_0 int8 copy, and end-to-end greedy decode tokens/s of BitNet models
with random weights in the llama.cpp recipe's form: packed (``pack_model``, ternary and binary; decoded by HF
``generate`` and by qat's ``PackedDecoder``, with the fp32 head and, ternary, the Q8_0 int8 head) vs the same model
in HF fp32 and vs llama.cpp (llama-cpp-python) running qat's GGUF TQ2_0 / TQ1_0 export of the ternary model (shapes
whose widths are multiples of 256 only), and a breakdown of one qat decode step. Models (``E2E_MODELS``): ``700M``
and ``1.3B`` = the BitNet b1.58 shapes of the paper's FAQ (hidden 1536 / 2048, FFN 4096 / 5460, 24 / 32 heads, 24
layers, LLaMA vocabulary 32000), ``24x2048`` = the 1.3B shape with FFN 5632 (a whole number of GGUF's 256-weight
blocks, so llama.cpp runs it; issue 14's second shape), ``8x2048`` = 8 layers of it (16 heads), whose fp32
``lm_head`` is a much larger share of the packed model's bytes, ``tiny`` = the tiny recipes' shape (a smoke run).
"""

import argparse
import functools
import gc
import re
import resource
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from qat.kernels.packed_linear import bind_packed_linear, dense_linear, selected_path
from qat.nn.packed_linear import Q8_0Linear
from qat.pack.kernel_layout import BINARY_TILE, Q8_0_CHUNK, padded_in_features

SHAPES = [(2048, 2048), (4096, 4096), (4096, 11008)]
HEAD_SHAPES = [(32000, 1536), (32000, 2048)]   # lm_head of the end-to-end models
# name -> (layers, hidden, intermediate, heads, vocab)
E2E_MODELS = {"700M": (24, 1536, 4096, 24, 32000), "24x2048": (24, 2048, 5632, 32, 32000),
              "1.3B": (24, 2048, 5460, 32, 32000), "8x2048": (8, 2048, 5632, 16, 32000),
              "tiny": (4, 256, 768, 4, 4096)}
BATCHES = [1, 8, 64]
INT4_GROUP = 128


def last_level_cache_bytes() -> int:
    """Largest cache size lscpu reports (L3 here), in bytes; 32 MiB if lscpu is unavailable."""
    try:
        text = subprocess.run(["lscpu", "-B"], capture_output=True, text=True, timeout=10).stdout
        sizes = [int(m.group(2)) for m in re.finditer(r"^(L\d\w?) cache:\s+(\d+)", text, re.M)]
        return max(sizes) if sizes else 32 << 20
    except (OSError, ValueError):
        return 32 << 20


def best_seconds(fn, reps: int) -> float:
    """Fastest of ``reps`` calls: on a shared machine a call whose thread lost its core waits a whole scheduler
    quantum (4-8 ms), which would swamp medians; the fastest call is the kernel's own time."""
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def interleaved_best_seconds(calls: dict, reps: int) -> dict:
    """Fastest of ``reps`` calls of each, taken in turns (A, B, C, A, B, C, ...): on a shared machine a burst of
    load then slows one call of every method instead of every call of one, so the ratios stay comparable."""
    for fn in calls.values():
        fn()
    best = {name: float("inf") for name in calls}
    for _ in range(reps):
        for name, fn in calls.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def sum_buffer(llc: int) -> torch.Tensor:
    """int64s filling 4x the last-level cache (at least 1 GiB), for the torch-sum read roofline."""
    return torch.ones(max(4 * llc, 1 << 30) // 8, dtype=torch.int64)


def sum_read_gbps(buf: torch.Tensor, reps: int) -> float:
    return buf.numel() * 8 / best_seconds(buf.sum, reps) / 1e9


def memory_read_gbps(llc: int, reps: int) -> dict:
    """Read bandwidth from memory, all threads, two ways: a torch sum over int64s of a buffer 4x the last-level cache,
    and torch's fp32 GEMV (one token, weights rotating over copies filling 2x the cache), which on some CPUs reads
    faster than the sum (30 vs 23 GB/s on a Sapphire Rapids class VM); the roofline is the faster of the two."""
    summed = sum_read_gbps(sum_buffer(llc), max(5, reps // 3))
    k = n = 4096
    weights = Rotation(lambda _: torch.randn(n, k), 4 * n * k, 2 * llc, resident=False)
    x = torch.randn(1, k)
    gemv = 4 * n * k / best_seconds(lambda: F.linear(x, weights.next()), max(10, reps)) / 1e9
    return {"sum": summed, "fp32 GEMV": gemv, "roofline": max(summed, gemv)}


class Rotation:
    """Cycle through weight copies so each call reads its weight from memory, not cache."""

    def __init__(self, make_one, bytes_each: int, min_total: int, resident: bool):
        count = 1 if resident else max(2, -(-min_total // bytes_each))
        self.items = [make_one(i) for i in range(count)]
        self.i = 0

    def next(self):
        self.i = (self.i + 1) % len(self.items)
        return self.items[self.i]


def make_methods(k: int, n: int, min_total: int, resident: bool):
    """name -> factory of (callable(x_fp32, x_bf16), weight bytes per call)."""
    gen = torch.Generator().manual_seed(0)

    def dense(dtype):
        def make(_):
            return (torch.randn(n, k, generator=gen) * 0.02).to(dtype)
        rot = Rotation(make, n * k * torch.finfo(dtype).bits // 8, min_total, resident)
        use_bf16 = dtype == torch.bfloat16
        return (lambda x, xb: F.linear(xb if use_bf16 else x, rot.next())), n * k * torch.finfo(dtype).bits // 8

    def int4():
        scale_zero = torch.stack([torch.full((k // INT4_GROUP, n), 0.01), torch.zeros(k // INT4_GROUP, n)], -1)
        def make(_):
            return torch._convert_weight_to_int4pack_for_cpu(
                torch.randint(0, 16, (n, k), dtype=torch.int32, generator=gen), 1)
        rot = Rotation(make, n * k // 2, min_total, resident)
        return (lambda x, xb: torch._weight_int4pack_mm_for_cpu(xb, rot.next(), INT4_GROUP, scale_zero.bfloat16())), \
            n * k // 2

    def int8_dynamic():
        def make(_):
            q = torch._make_per_tensor_quantized_tensor(
                torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen), 0.01, 0)
            return torch.ops.quantized.linear_prepack(q, None)
        rot = Rotation(make, n * k, min_total, resident)
        return (lambda x, xb: torch.ops.quantized.linear_dynamic(x, rot.next())), n * k

    def packed(bits):
        row_bytes = padded_in_features(k, bits) * bits // 8
        scale = torch.full((n, 1), 0.01)
        shape = (n, row_bytes) if bits == 2 else (-(-n // BINARY_TILE), row_bytes, BINARY_TILE)   # kernel layouts
        # Bound to the kernel once per weight, as the decoder calls its matmuls (``bind_packed_linear``), into an
        # output buffer per batch size; the public ``packed_linear`` adds ~5 µs of Python and torch.ops dispatch.
        def make(_):
            return bind_packed_linear(torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen), scale, bits, k, k)
        rot = Rotation(make, n * row_bytes, min_total, resident)
        outs = {}

        def call(x, xb):
            out = outs.get(x.shape[0])
            if out is None:
                out = outs[x.shape[0]] = torch.empty(x.shape[0], n)
            return rot.next()(x, out)
        return call, n * row_bytes

    return {"fp32": lambda: dense(torch.float32), "bf16": lambda: dense(torch.bfloat16),
            "int4 w4a16": int4, "int8 dyn": int8_dynamic,
            "ternary 2b": lambda: packed(2), "binary 1b": lambda: packed(1)}


# Rounds of the "alone" measurement. 8, not 3: a round costs ~0.1 s, and on the Zen 3 VMs a slow phase of the
# memory (the sum itself read 25.7 of 31.7 GB/s) once held all 3 rounds of a shape, when every kernel read less.
ALONE_ROUNDS = 8


def alone_beside_roofline(calls: dict, reps: int, llc: int, rounds: int = ALONE_ROUNDS) -> tuple[dict, float]:
    """Each call run back to back (as the roofline's sum is, and as a decode loop calls a kernel), in rounds that
    alternate with the torch-sum read roofline; the best of each over the rounds. On the shared VMs here the read
    bandwidth drifts by 20-30% within minutes, so a roofline measured at the start of the run is no denominator for
    a kernel timed ten minutes later (a Zen 3 run measured a kernel at 126% of it)."""
    buf = sum_buffer(llc)
    best = {name: float("inf") for name in calls}
    summed = 0.0
    for _ in range(rounds):
        summed = max(summed, sum_read_gbps(buf, 3))
        for name, fn in calls.items():
            best[name] = min(best[name], best_seconds(fn, reps))
    return best, summed


def kernel_table(reps: int, llc: int, read_gbps: float, shapes=SHAPES) -> None:
    min_total = 2 * llc
    print("\n| K x N | batch | mode | " + " | ".join(
        ["fp32 ms", "bf16 ms", "int4 ms", "int8 ms", "tern ms", "bin ms",
         "tern/fp32", "tern/bf16", "tern/best-lowbit", "bin/fp32", "bin/bf16", "bin/best-lowbit",
         "tern GB/s (% of read BW; streamed batch 1 also called alone, % of the sum read beside it)",
         "bin GB/s (same)"]) + " |")
    print("|" + "---|" * 17)
    for k, n in shapes:
        for resident in (True, False):
            factories = make_methods(k, n, min_total, resident)
            methods = {name: factory() for name, factory in factories.items()}
            results = {}
            back_to_back = {}
            for batch in BATCHES:
                x = torch.randn(batch, k)
                calls = {name: functools.partial(call, x, x.bfloat16()) for name, (call, _) in methods.items()}
                best = interleaved_best_seconds(calls, reps)
                results[batch] = {name: (best[name], nbytes) for name, (_, nbytes) in methods.items()}
                if batch == 1 and not resident:
                    # Also each packed kernel called alone, as the roofline's GEMV is and as a decode loop calls it:
                    # after another method's call, an idle second vCPU takes 10-18 us to wake (kernels/README.md).
                    back_to_back, alone_sum = alone_beside_roofline(
                        {kernel: calls[kernel] for kernel in ("ternary 2b", "binary 1b")}, reps, llc)
            del methods, calls
            # The denominator of the % columns: the read roofline measured at the start, or this shape's own streamed
            # fp32 GEMV (the same method, timed in turn with the packed kernels) where that read faster: on a shared
            # VM the bandwidth drifts between the two measurements.
            fp32_s, fp32_bytes = results[1]["fp32"]
            roofline = read_gbps if resident else max(read_gbps, fp32_bytes / fp32_s / 1e9)
            for batch in BATCHES:
                r = {name: t for name, (t, _) in results[batch].items()}
                best_low = min(r["int4 w4a16"], r["int8 dyn"])
                cells = [f"{r[m] * 1e3:.3f}" for m in factories]
                for kernel in ("ternary 2b", "binary 1b"):
                    cells += [f"{r['fp32'] / r[kernel]:.1f}x", f"{r['bf16'] / r[kernel]:.1f}x",
                              f"{best_low / r[kernel]:.1f}x"]
                for kernel in ("ternary 2b", "binary 1b"):
                    nbytes = results[batch][kernel][1]
                    gbps = nbytes / r[kernel] / 1e9
                    cell = f"{gbps:.1f}" + ("" if resident else f" ({100 * gbps / roofline:.0f}%)")
                    if batch == 1 and not resident:
                        alone = nbytes / back_to_back[kernel] / 1e9
                        beside = max(alone_sum, fp32_bytes / fp32_s / 1e9)
                        cell += f"; alone {alone:.1f} ({100 * alone / beside:.0f}% of {beside:.1f})"
                    cells.append(cell)
                mode = "cache" if resident else "stream"
                print(f"| {k}x{n} | {batch} | {mode} | " + " | ".join(cells) + " |", flush=True)


def head_table(reps: int, llc: int, read_gbps: float) -> None:
    """The fp32 head a packed model keeps (vocab x hidden), one token: torch's GEMV vs qat's (``dense_linear``), and
    the int8 head's Q8_0 copy (``Q8_0Linear``); each rotates over copies filling twice the last-level cache."""
    print("\nFull-precision lm_head, one token, weights streamed from memory: fp32 (torch's GEMV, qat's), and the int8 "
          "head's GGML Q8_0 copy (int8 + an fp16 scale per 32 weights, qat's q8_0_linear):")
    print("| vocab x hidden | torch F.linear ms | qat dense_gemv ms | speed-up | torch GB/s | qat GB/s (% of BW) | "
          "qat Q8_0 ms | Q8_0 vs torch fp32 | Q8_0 GB/s (% of BW) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n, k in HEAD_SHAPES:
        nbytes = n * k * 4
        weights = Rotation(lambda _: torch.randn(n, k), nbytes, 2 * llc, resident=False)
        q8_padded = -(-k // Q8_0_CHUNK) * Q8_0_CHUNK
        q8_bytes = n * q8_padded + 2 * n * q8_padded // 32              # int8 codes, an fp16 scale per 32
        heads = Rotation(lambda _: Q8_0Linear.from_linear(torch.nn.Linear(k, n, bias=False)), q8_bytes, 2 * llc,
                         resident=False)
        x = torch.randn(1, 1, k)
        torch_s = best_seconds(lambda: F.linear(x, weights.next()), reps)
        qat_s = best_seconds(lambda: dense_linear(x, weights.next()), reps)
        q8_s = best_seconds(lambda: heads.next()(x), reps)
        qat_gbps, q8_gbps = nbytes / qat_s / 1e9, q8_bytes / q8_s / 1e9
        print(f"| {n}x{k} | {torch_s * 1e3:.2f} | {qat_s * 1e3:.2f} | {torch_s / qat_s:.2f}x | "
              f"{nbytes / torch_s / 1e9:.1f} | {qat_gbps:.1f} ({100 * qat_gbps / read_gbps:.0f}%) | "
              f"{q8_s * 1e3:.2f} | {torch_s / q8_s:.1f}x | {q8_gbps:.1f} ({100 * q8_gbps / read_gbps:.0f}%) |",
              flush=True)


E2E_ROUNDS = 5


def decode_tokens_per_second(runners: dict, prompt: torch.Tensor, new_tokens: int, rounds: int = E2E_ROUNDS) -> dict:
    """Greedy-decode tokens/s of each runner (``runner(prompt, new_tokens) -> ids``), best of ``rounds`` runs taken in
    turns (A, B, C, A, B, C, ...), so that a burst of load on this shared machine hits one run of every runner rather
    than all runs of one. 5 rounds, not 3: on the Zen 3 VMs a slow minute once caught all 3 of one runner's runs
    (24x2048: 1.58 s for 32 tokens where its step time, 33 ms, gives ~1.2 s)."""
    best = {name: float("inf") for name in runners}
    with torch.no_grad():
        for run in runners.values():   # warm up
            run(prompt, 2)
        for _ in range(rounds):
            for name, run in runners.items():
                start = time.perf_counter()
                out = run(prompt, new_tokens)
                best[name] = min(best[name], time.perf_counter() - start)
                assert out.shape[1] == prompt.shape[1] + new_tokens
    return {name: new_tokens / seconds for name, seconds in best.items()}


def hf_runner(model):
    kwargs = dict(do_sample=False, pad_token_id=0)
    return lambda prompt, n: model.generate(prompt, max_new_tokens=n, min_new_tokens=n, **kwargs)


def decode_step_breakdown(decoder, reps: int = 20) -> dict:
    """Milliseconds of one decode step of ``decoder`` (a ``PackedDecoder`` after a 16-token prompt), and of its parts
    run on their own on same-shaped inputs, the step and the parts in turns (timed minutes apart on a shared VM, the
    parts once summed to more than the step): the packed matmuls (fused q/k/v, o, fused up/gate, down of every layer,
    each with the RMSNorm of its input and its epilogue: residual add, FFN activation), the full-precision head (final
    norm + lm_head); the rest (attention with RoPE and the cache write, embedding, Python) is the difference."""
    from qat.nn.decoder import rms_norm  # here: transformers imports a module named ``kernels`` (this file's name)

    hidden = decoder.config.hidden_size
    token = torch.zeros(1, 1, dtype=torch.long)
    buf = decoder.step_buffers
    floor = buf.residual[:, -1:]     # rms_floor: the layers' inputs carry it as a last column
    residual = torch.cat((torch.randn(1, hidden), floor), dim=-1)
    x = residual[:, :-1]
    inner = torch.cat((torch.randn(1, decoder.config.intermediate_size), floor), dim=-1)

    def step():
        decoder.length = 16   # the cache's contents do not change the time
        decoder.forward(token)

    scratch = torch.zeros(1, hidden)   # what o and down add their outputs into (the decoder: the residual stream)

    def packed():   # as the decoder calls them: bound to their kernel (``bind_packed_linear``)
        for layer in decoder.layers:
            layer.qkv(residual, buf.qkv), layer.o_proj(residual, scratch)
            layer.up_gate(residual, buf.up_gate), layer.down_proj(inner, scratch)

    with torch.no_grad():
        decoder.reset(17)
        best = interleaved_best_seconds(
            {"step": step, "packed": packed,
             "head": lambda: decoder.lm_head(rms_norm(x, residual, decoder.final_norm))}, reps)
    return {"step": best["step"] * 1e3, "packed matmuls": best["packed"] * 1e3, "head": best["head"] * 1e3,
            "rest": (best["step"] - best["packed"] - best["head"]) * 1e3}


LLAMACPP_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "bitnet-b158-tiny-llamacpp.yaml"


def random_bitnet(name: str, weight: str | None = None) -> torch.nn.Module:
    """The ``E2E_MODELS`` shape ``name`` with every other setting of the llama.cpp recipe (tied embeddings, SiLU-gated
    FFN, SubLN: the function llama.cpp's ``bitnet`` graph computes), random weights from seed 0; with ``weight``
    (a weight quantizer name) QAT-converted and packed. Every call builds the same weights, so the dense model and
    each packed one are built one at a time instead of deep-copied from one another (peak memory: one fp32 model)."""
    import yaml

    from qat.nn.config import ArchConfig, QuantConfig
    from qat.nn.convert import build_model, convert_to_qat
    from qat.nn.packed_linear import pack_model

    recipe = yaml.safe_load(LLAMACPP_RECIPE.read_text())["model"]
    layers, hidden, intermediate, heads, vocab = E2E_MODELS[name]
    arch = ArchConfig(**{**recipe["arch"], "vocab_size": vocab, "hidden_size": hidden,
                         "intermediate_size": intermediate, "num_hidden_layers": layers,
                         "num_attention_heads": heads, "num_key_value_heads": heads})
    torch.manual_seed(0)
    model = build_model(arch).eval()
    if weight is None:
        return model
    model = convert_to_qat(model, QuantConfig(**{**recipe["quant"], "weight": weight}))
    return pack_model(model, inplace=True)


def byte_level_tokenizer():
    """A small byte-level BPE tokenizer: the GGUF export needs a vocabulary to write (rows past it are written as
    unused tokens); the bench feeds token ids, so what it holds does not matter."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=280,
                            special_tokens=["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>")


def llamacpp_runner(gguf_file: Path, threads: int, n_ctx: int):
    """(runner, Llama) over ``gguf_file``: greedy decode by the argmax of the last logits after each ``eval``, as the
    qat decoder does, so exactly ``n`` tokens come out (no sampler chain, no stop at EOS)."""
    import llama_cpp
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(gguf_file), n_threads=threads, n_threads_batch=threads, n_ctx=n_ctx,
                          logits_all=False, verbose=False)
    vocab = llm.n_vocab()

    def run(prompt: torch.Tensor, n: int) -> torch.Tensor:
        llm.reset()
        llm.eval(prompt[0].tolist())
        new = []
        for i in range(n):
            # With logits_all=False llama-cpp-python keeps no scores; the context holds the last token's logits.
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(vocab,))
            new.append(int(logits.argmax()))
            if i + 1 < n:
                llm.eval(new[-1:])
        return torch.cat([prompt, torch.tensor([new], dtype=prompt.dtype)], dim=1)

    return run, llm


def teacher_forced_logits(decoder, llm, seq: torch.Tensor, prompt_len: int) -> dict:
    """Both runtimes' next-token logits at every generated position of ``seq`` (1, T), each fed the same ids (teacher
    forcing, so one flipped argmax does not derail the rest as in free-running greedy decode): argmax agreement,
    max |difference| relative to the largest |logit|, and the median top-1 - top-2 margin of qat's logits next to
    the median |difference| of the top-1 logit (near-ties are the positions where the margin is below it)."""
    import llama_cpp
    import numpy as np

    vocab = llm.n_vocab()
    decoder.reset(seq.shape[1])
    ours = decoder.forward(seq)[0, prompt_len - 1:-1].float()              # (new, vocab)
    llm.reset()
    llm.eval(seq[0, :prompt_len].tolist())
    theirs = []
    for i in range(prompt_len, seq.shape[1]):
        theirs.append(torch.from_numpy(np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx),
                                                             shape=(vocab,)).copy()))
        if i + 1 < seq.shape[1]:
            llm.eval([int(seq[0, i])])
    theirs = torch.stack(theirs)[:, :ours.shape[1]]
    top2 = ours.topk(2, dim=-1).values
    top1_diff = (ours.max(-1).values - theirs.gather(1, ours.argmax(-1, keepdim=True))[:, 0]).abs()
    return {"agree": int((ours.argmax(-1) == theirs.argmax(-1)).sum()), "positions": ours.shape[0],
            "max_rel": float((ours - theirs).abs().max() / ours.abs().max()),
            "median_margin": float((top2[:, 0] - top2[:, 1]).median()), "median_top1_diff": float(top1_diff.median())}


def cpu_description() -> str:
    """The CPU model name and the SIMD flags the kernel paths choose between, from /proc/cpuinfo."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "CPU unknown (no /proc/cpuinfo)"
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    wanted = ("avx2", "fma", "f16c", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_vbmi", "avx512_bf16",
              "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16")
    present = set(flags.group(1).split()) if flags else set()
    return (f"CPU {model.group(1).strip() if model else 'unknown'}, "
            f"flags {' '.join(f for f in wanted if f in present) or 'none of ' + ' '.join(wanted)}")


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def end_to_end(name: str, new_tokens: int, threads: int) -> None:
    from qat.errors import ExportError
    from qat.export.gguf import export_gguf
    from qat.nn.decoder import PackedDecoder

    layers, hidden, intermediate, heads, vocab = E2E_MODELS[name]
    prompt = torch.randint(0, vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    runners, decoders, llamas = {}, {}, []
    with tempfile.TemporaryDirectory(prefix="qat-e2e-") as gguf_dir:
        for kind, weight in (("ternary", "absmean_ternary"), ("binary", "absmean_binary")):
            packed = random_bitnet(name, weight)
            gc.collect()                              # the fp32 weights the packed layers replaced
            decoders[kind] = PackedDecoder(packed)
            runners[f"packed {kind}, HF generate"] = hf_runner(packed)
            runners[f"packed {kind}, qat decoder"] = functools.partial(decoders[kind].generate, eos_token_id=[])
            if kind == "ternary":
                decoders["ternary, int8 head"] = PackedDecoder(packed, int8_head=True)
                runners["packed ternary, qat decoder, int8 head"] = functools.partial(
                    decoders["ternary, int8 head"].generate, eos_token_id=[])
                # qat's own GGUF exporter; llama.cpp reads the file (memory-mapped) from here on.
                tokenizer = byte_level_tokenizer()
                for qtype in ("tq2_0", "tq1_0"):
                    try:
                        gguf_file = export_gguf(packed, tokenizer, Path(gguf_dir) / f"model-{qtype}.gguf", qtype)
                    except ExportError as err:        # e.g. the 1.3B shape: FFN 5460 is not whole 256-weight blocks
                        print(f"\n[{name}] no llama.cpp {qtype.upper()} runner: {err}")
                        continue
                    run, llm = llamacpp_runner(gguf_file, threads, n_ctx=prompt.shape[1] + new_tokens)
                    runners[f"llama.cpp {qtype.upper()}"] = run
                    llamas.append(llm)
        dense = random_bitnet(name)
        params = sum(p.numel() for p in dense.parameters())
        runners = {"HF fp32": hf_runner(dense), **runners}
        tokens_per_s = decode_tokens_per_second(runners, prompt, new_tokens)
        same = forced = None
        if "llama.cpp TQ2_0" in runners:
            with torch.no_grad():
                ours = runners["packed ternary, qat decoder"](prompt, new_tokens)
                same = (ours == runners["llama.cpp TQ2_0"](prompt, new_tokens))[0, prompt.shape[1]:]
                forced = teacher_forced_logits(decoders["ternary"], llamas[0], ours, prompt.shape[1])
        for llm in llamas:
            llm.close()
    print(f"\nEnd-to-end greedy decode, BitNet {name} in the llama.cpp recipe's form (tied embeddings, SiLU-gated "
          f"FFN): {layers} layers, hidden {hidden}, intermediate {intermediate}, {heads} heads, vocab {vocab} "
          f"({params / 1e6:.0f}M params), random weights, {new_tokens} new tokens after a 16-token prompt, best of "
          f"{E2E_ROUNDS} runs taken in turns, {threads} threads (llama.cpp: qat's GGUF export of the ternary model):")
    print("| model | tokens/s | vs HF fp32 |\n|---|---|---|")
    for runner_name, tps in tokens_per_s.items():
        print(f"| {runner_name} | {tps:.2f} | {tps / tokens_per_s['HF fp32']:.1f}x |")
    if same is not None:
        llama_tps = tokens_per_s["llama.cpp TQ2_0"]
        for runner_name in [r for r in tokens_per_s if "qat decoder" in r]:
            print(f"{runner_name} / llama.cpp TQ2_0: {tokens_per_s[runner_name] / llama_tps:.2f}x")
        first_differ = int(same.logical_not().nonzero()[0]) if not same.all() else len(same)
        print(f"Greedy tokens, qat ternary decoder vs llama.cpp TQ2_0: {int(same.sum())} of {len(same)} equal, the "
              f"first {first_differ} in a row (llama.cpp rounds scales to fp16 and activations to Q8_K blocks, so "
              "near-tied logits of a random model can flip)")
        print(f"Same ids fed to both (teacher forcing, qat's greedy sequence): next-token argmax equal at "
              f"{forced['agree']} of {forced['positions']} positions; max |logit difference| "
              f"{forced['max_rel']:.2e} of the largest |logit|; median top-1 - top-2 margin "
              f"{forced['median_margin']:.4f} "
              f"vs median top-1 logit difference {forced['median_top1_diff']:.4f}")
    print("One decode step of the qat decoder, ms (the step and its parts timed in turns, best of 20 each):")
    print("| model | step | packed matmuls | head (norm + lm_head: fp32, or Q8_0 for int8 head) | rest |\n"
          "|---|---|---|---|---|")
    for kind, decoder in decoders.items():
        parts = decode_step_breakdown(decoder)
        print(f"| {kind} | " + " | ".join(f"{parts[k]:.2f}" for k in ("step", "packed matmuls", "head", "rest"))
              + " |", flush=True)
    print(f"Peak resident memory of this process so far: {peak_rss_gib():.1f} GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--shapes", default=",".join(f"{k}x{n}" for k, n in SHAPES),
                        help="comma-separated KxN of the kernel table")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--e2e-models", default="700M,24x2048,1.3B,8x2048",
                        help=f"comma-separated, from: {', '.join(E2E_MODELS)}")
    parser.add_argument("--e2e-tokens", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    llc = last_level_cache_bytes()
    print(cpu_description())
    print(f"torch {torch.__version__}, {args.threads} threads, kernel path {selected_path()}, last-level cache "
          f"{llc / 2**20:.0f} MiB, streamed sets rotate over >= {2 * llc / 2**20:.0f} MiB")
    if not args.skip_kernels:
        read = memory_read_gbps(llc, args.reps)
        read_gbps = read["roofline"]
        print(f"Memory read bandwidth {read_gbps:.1f} GB/s: the faster of torch sum {read['sum']:.1f} and torch fp32 "
              f"GEMV {read['fp32 GEMV']:.1f} (the % columns divide by it, or by the shape's streamed fp32 GEMV's "
              "GB/s where that is higher)")
        try:
            shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
        except ValueError:
            parser.error(f"--shapes: expected KxN[,KxN...], e.g. 4096x4096, got {args.shapes!r}")
        kernel_table(args.reps, llc, read_gbps, shapes)
        head_table(args.reps, llc, read_gbps)
    models = [m for m in args.e2e_models.split(",") if m]
    unknown = [m for m in models if m not in E2E_MODELS]
    if unknown:
        parser.error(f"--e2e-models: unknown {unknown}; choose from {', '.join(E2E_MODELS)}")
    if not args.skip_e2e:
        for name in models:
            end_to_end(name, args.e2e_tokens, args.threads)


if __name__ == "__main__":
    main()
