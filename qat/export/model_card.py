"""The model card (README.md) of an exported folder: what the model is, how it was trained, how to load it."""

import json
from typing import Any, Optional

RUNTIMES = {
    "hf-bitnet": ("HF transformers >= 4.57 (`AutoModelForCausalLM.from_pretrained`, needs `accelerate`); "
                  "convertible to GGUF TQ1_0/TQ2_0 for llama.cpp with `qat export --format gguf-tq2_0`"),
    "hf-fp": "HF transformers (`AutoModelForCausalLM.from_pretrained`)",
}


def render_model_card(name: str, fmt: str, trained: Any, bits_per_weight: Optional[float],
                      evaluation: Optional[dict] = None, source: str = "") -> str:
    arch, quant = trained.arch, trained.quant
    data = trained.data_hparams or {}
    lines = [
        f"# {name}", "",
        f"Trained with [qat](https://github.com/) ({'ternary BitNet b1.58 QAT' if quant else 'full precision'}), "
        f"exported as `{fmt}`.", "",
        "## Model", "",
        f"- architecture: `{arch.family}` — hidden {arch.hidden_size}, {arch.num_hidden_layers} layers, "
        f"{arch.num_attention_heads} heads, FFN {arch.intermediate_size}, vocab {arch.vocab_size}",
        f"- quantization: `{json.dumps(quant.__dict__) if quant else 'none'}`",
        f"- linear-layer storage: {bits_per_weight:.4f} bits/weight" if bits_per_weight else "- linear-layer storage: 16/32-bit",
        f"- training steps: {trained.global_step}; source checkpoint: `{source}`",
        f"- optimizer/schedule: `{json.dumps(trained.hparams.get('optim', {}))}`", "",
        "## Data", "",
        f"- train/validation files: {data.get('train_files') or 'built-in Wikipedia corpus (gensim test data, 105 articles, every 10th held out)'}",
        f"- tokenizer: `{data.get('tokenizer', '?')}`, block length {data.get('seq_len', '?')}", "",
        "## Loading", "",
        f"- runtimes: {RUNTIMES.get(fmt, fmt)}",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "model = AutoModelForCausalLM.from_pretrained(path, device_map='cpu')",
        "tok = AutoTokenizer.from_pretrained(path)",
        "```", "",
    ]
    if evaluation:
        lines += ["## Evaluation (held-out split)", "", "| model | perplexity | bits/byte | tokens |", "|---|---|---|---|"]
        for key, m in evaluation.items():
            if isinstance(m, dict) and "perplexity" in m:
                lines.append(f"| {key} | {m['perplexity']:.3f} | {m.get('bits_per_byte', float('nan')):.4f} | {m['tokens']} |")
        if "agreement" in evaluation:
            a = evaluation["agreement"]
            lines += ["", f"Exported vs training model: max |Δlogit| {a['max_abs_logit_diff']:.2e}, "
                      f"top-1 agreement {a['top1_agreement']:.4f}."]
        lines.append("")
    return "\n".join(lines)
