"""The model card (README.md) of every export: what the model is (by its quantization scheme), how it was
trained, how to load it, and its evaluation once ``qat eval`` ran. No local paths: provenance is the run name and
checkpoint step."""

import json
from typing import Any, Mapping, Optional


def render_model_card(name: str, manifest: Mapping[str, Any], evaluation: Optional[Mapping[str, Any]] = None) -> str:
    """Markdown for an export whose manifest (``qat_export.json`` contents) is ``manifest``."""
    from qat.export.formats import get_format

    fmt = get_format(manifest["format"])
    model = manifest.get("model") or {}
    scheme = manifest.get("scheme")
    prov = manifest.get("provenance") or {}
    data = prov.get("data") or {}
    bits = manifest.get("bits_per_weight")
    what = (f"quantized with `{scheme['name']}`: {scheme['description']}" if scheme
            else "full precision (no quantized layers)")
    lines = [f"# {name}", "", f"Causal LM trained with qat, {what}. Exported as `{fmt.name}`: {fmt.description}.", "",
             "## Model", "",
             f"- architecture: `{model.get('model_type', '?')}` — hidden {model.get('hidden_size', '?')}, "
             f"{model.get('num_hidden_layers', '?')} layers, {model.get('num_attention_heads', '?')} heads, "
             f"FFN {model.get('intermediate_size', '?')}, vocab {model.get('vocab_size', '?')}"]
    if scheme:
        lines.append(f"- quantization: `{json.dumps(manifest.get('quant'))}` ({scheme['levels_count']} levels, "
                     f"{scheme['bits']} bits of information per weight)")
        lines.append(f"- linear-layer storage (measured from the file): {bits:.4f} bits/weight" if bits is not None
                     else "- linear-layer storage: see the weights file")
    else:
        lines.append(f"- storage: `{manifest.get('dtype', '?')}` tensors")
    lines += ["", "## Training", ""]
    if prov.get("run_name") or prov.get("global_step") is not None:
        lines.append(f"- run `{prov.get('run_name', '?')}`, checkpoint at step {prov.get('global_step', '?')}")
    teacher = prov.get("teacher")
    if teacher:
        lines.append(f"- autoregressive distillation from `{teacher.get('source', '?')}` "
                     f"({json.dumps(prov.get('distill'))})")
    if prov.get("optim"):
        lines.append(f"- optimizer/schedule: `{json.dumps(prov['optim'])}`")
    if data:
        files = data.get("train_files")
        lines.append(f"- data: {'user files' if files else 'built-in Wikipedia corpus (gensim test data)'}, "
                     f"tokenizer `{data.get('tokenizer', '?')}`, block length {data.get('seq_len', '?')}")
    lines += ["", "## Loading", "", f"Runtimes: {fmt.runtime}.", "", "```python", fmt.loading_code, "```", ""]
    if evaluation:
        lines += ["## Evaluation (held-out split)", "", "| model | perplexity | bits/byte | tokens |", "|---|---|---|---|"]
        for key, m in evaluation.items():
            if isinstance(m, dict) and "perplexity" in m:
                lines.append(f"| {key} | {m['perplexity']:.3f} | {m.get('bits_per_byte', float('nan')):.4f} | "
                             f"{m['tokens']} |")
        if "agreement" in evaluation:
            a = evaluation["agreement"]
            lines += ["", f"Exported vs training model: max |Δlogit| {a['max_abs_logit_diff']:.2e}, "
                      f"top-1 agreement {a['top1_agreement']:.4f}."]
        if evaluation.get("suite_table"):   # `qat eval --suite`: corpora, probes with chance, reference agreement
            lines += ["", "### Evaluation suite", "", evaluation["suite_table"]]
        lines.append("")
    return "\n".join(lines)
