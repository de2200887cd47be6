"""``qat generate``: greedy decoding with the packed kernels, from an exported HF BitNet folder."""

import sys
import time

from qat.errors import CheckpointError


def generate(model: str, prompt: str, max_new_tokens: int = 32, packed: bool = True, threads: int = 0,
             int8_head: bool = False) -> str:
    """Greedy-decode ``prompt`` with a local HF model folder (``qat export --format hf`` output).

    Args:
        model: folder with config.json, the weights and the tokenizer.
        prompt: text to continue.
        max_new_tokens: tokens to generate.
        packed: run the quantized layers on qat's packed kernels (False: the layers as loaded).
        threads: torch CPU threads (0: torch's default).
        int8_head: compute the logits with a GGML Q8_0 (int8, one scale per 32 weights) copy of the full-precision
            lm_head: a quarter of its bytes per token, held-out perplexity +0.003% on the tiny llama.cpp recipe
            (bench/int8_head_perplexity.py); qat's packed decoder only.
    """
    from pathlib import Path

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qat.export.folder import is_export, verify_export
    from qat.nn.decoder import DecoderError, PackedDecoder
    from qat.nn.packed_linear import pack_model

    if not Path(model, "config.json").is_file():
        raise CheckpointError(f"{model!r} is not an HF model folder (no config.json); export one with "
                              "`qat export --format hf` first")
    if int8_head and not packed:
        raise DecoderError("--int8_head runs in qat's packed decoder; drop --packed false or --int8_head")
    if is_export(model):
        verify_export(model)          # a qat export: its files must be the ones it was written with
    if threads:
        torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(model)
    lm = AutoModelForCausalLM.from_pretrained(model, device_map="cpu", dtype=torch.float32).eval()
    decoder = None
    if packed:
        lm = pack_model(lm, inplace=True)
        try:   # qat's decode loop (static KV cache, fused q/k/v and gate/up); other layouts decode through HF
            decoder = PackedDecoder(lm, int8_head=int8_head)
        except DecoderError as err:
            if int8_head:
                raise DecoderError(f"--int8_head runs in qat's packed decoder, which cannot decode this model: "
                                   f"{err}; drop --int8_head") from None
            print(f"[qat] decoding with HF generate: {err}", file=sys.stderr)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    start = time.perf_counter()
    with torch.no_grad():
        if decoder is not None:
            out = decoder.generate(ids, max_new_tokens)
        else:
            out = lm.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id or 0)
    seconds = time.perf_counter() - start
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    print(text)
    how = "packed, HF generate" if packed else "unpacked"
    if decoder is not None:
        how = "packed, qat decoder, int8 head" if int8_head else "packed, qat decoder"
    print(f"[qat] {out.shape[1] - ids.shape[1]} tokens in {seconds:.2f} s ({how})", file=sys.stderr)
    return text
