"""The model card (README.md) of every export, as the Hugging Face Hub reads it: YAML front matter (license,
``library_name``, tags, ``base_model`` for fine-tunes, datasets, a ``model-index`` with the evaluation once
``qat eval`` ran), written with ``huggingface_hub.ModelCardData``, then what the model is (by its quantization
scheme), how it was trained, how to load it, and its evaluation.

No local paths: provenance is the run name and checkpoint step; a local teacher, tokenizer or pretrained folder
is named by its last path component only.
"""

import json
import re
from pathlib import Path
from typing import Any, Mapping, Optional

# qat's own license (pyproject.toml): a model qat trained from scratch is published under it.
LICENSE = "apache-2.0"
BUILTIN_CORPUS = {"dataset": "wikimedia/wikipedia", "language": "en",
                  "text": "105 English Wikipedia articles shipped in [gensim](https://github.com/piskvorky/gensim)'s "
                          "test data (every 10th article held out)"}
# Where each weight scheme comes from (the card links the paper).
SCHEME_PAPERS = {
    "absmean_ternary": ("BitNet b1.58", "https://arxiv.org/abs/2402.17764"),
    "absmedian_ternary": ("BitNet b1.58 Reloaded", "https://arxiv.org/abs/2407.09527"),
    "absmean_binary": ("BitNet", "https://arxiv.org/abs/2310.11453"),
    "fbi_binary": ("FBI-LLM", "https://arxiv.org/abs/2407.07093"),
    "onebit": ("OneBit", "https://arxiv.org/abs/2402.11295"),
}
SMOLLM2 = ("SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
# Metrics of eval.json that become model-index entries: key -> (Hub metric type, display name).
CARD_METRICS = {"perplexity": ("perplexity", "Perplexity"), "bits_per_byte": ("bits_per_byte", "Bits per byte"),
                "accuracy": ("accuracy", "Accuracy")}


def hub_model_id(name_or_path: Optional[str]) -> Optional[str]:
    """The Hub id (``ORG/NAME``) of a pretrained model given as a Hub id or a local folder: the folder's
    ``models--ORG--NAME`` cache name or its config's ``_name_or_path``; None when it cannot be told."""
    if not name_or_path:
        return None
    path = Path(name_or_path)
    if HUB_ID.fullmatch(name_or_path) and not path.exists():
        return name_or_path
    for part in reversed(path.parts):
        if part.startswith("models--") and part.count("--") >= 2:
            return "/".join(part[len("models--"):].split("--", 1))
    config = path / "config.json"
    if config.is_file():
        try:
            name = json.loads(config.read_text()).get("_name_or_path")
        except (OSError, ValueError):
            return None
        if isinstance(name, str) and HUB_ID.fullmatch(name) and not Path(name).exists():
            return name
    return None


def base_model_provenance(model: Any) -> dict[str, Any]:
    """``{"base_model": ORG/NAME}`` (or ``{"pretrained_name": folder name}``) for a model initialised from a
    pretrained one (``model.arch.pretrained``); empty for a model trained from scratch."""
    source = getattr(getattr(model, "config", None), "name_or_path", "") or ""
    if not source:
        return {}
    hub_id = hub_model_id(source)
    return {"base_model": hub_id} if hub_id else {"pretrained_name": Path(source).name}


def library_name(format_name: str) -> str:
    """The library that loads a format, as the Hub's ``library_name`` (it picks the loading snippet)."""
    if format_name in ("hf", "hf-fp"):
        return "transformers"
    if format_name.startswith("gguf"):
        return "gguf"
    return "qat"


def card_tags(manifest: Mapping[str, Any]) -> list[str]:
    """Hub tags: qat, the architecture, the weight precision (ternary / binary), the scheme, the format."""
    scheme = manifest.get("scheme") or {}
    model = manifest.get("model") or {}
    tags = ["qat", "quantization-aware-training"]
    if model.get("model_type"):
        tags.append(model["model_type"])
    if scheme:
        tags.append({3: "ternary", 2: "binary"}.get(scheme.get("levels_count"), "low-bit"))
        tags.append({3: "1.58-bit", 2: "1-bit"}.get(scheme.get("levels_count"), f"{scheme.get('bits')}-bit"))
        tags.append(scheme["name"].replace("_", "-"))
    fmt = manifest["format"]
    tags += ["gguf", fmt.split("-", 1)[1]] if fmt.startswith("gguf-") else [fmt if fmt != "hf" else "safetensors"]
    return list(dict.fromkeys(tags))


def _local_name(value: Any) -> str:
    """A name for a source that may be a local path: its last component only."""
    text = str(value)
    return Path(text).name if ("/" in text or "\\" in text) else text


def _dataset(manifest: Mapping[str, Any]) -> dict[str, Any]:
    data = (manifest.get("provenance") or {}).get("data") or {}
    if not data:
        return {}
    if data.get("train_files"):
        return {"text": "user-supplied text files (`data.train_files`); held-out files or split of them",
                "name": "user held-out text", "type": "text"}
    return {**BUILTIN_CORPUS, "name": "Wikipedia (gensim test articles), held-out split",
            "type": BUILTIN_CORPUS["dataset"]}


def exported_metrics(evaluation: Optional[Mapping[str, Any]]) -> dict[str, float]:
    """The metrics of the exported model in ``eval.json`` (what the model-index reports and `qat publish` checks)."""
    exported = (evaluation or {}).get("exported")
    if not isinstance(exported, Mapping):
        return {}
    return {key: float(exported[key]) for key in ("perplexity", "bits_per_byte")
            if isinstance(exported.get(key), (int, float))}


def card_eval_results(evaluation: Optional[Mapping[str, Any]], dataset: Mapping[str, Any]) -> list:
    """``huggingface_hub.EvalResult`` entries of the model-index: the exported model on the held-out split of its
    training data, then (``qat eval --suite``) each suite corpus and probe."""
    from huggingface_hub import EvalResult

    # The Hub groups results by task and dataset type/config (not name): a probe has its own dataset config.
    def result(dataset_type: str, dataset_name: str, key: str, value: float, task: str = "Language modelling",
               config: Optional[str] = None):
        return EvalResult(task_type="text-generation", task_name=task, dataset_type=dataset_type,
                          dataset_name=dataset_name, dataset_config=config, dataset_split="validation",
                          metric_type=CARD_METRICS[key][0],
                          metric_name=CARD_METRICS[key][1], metric_value=round(float(value), 6))

    results = [result(dataset.get("type", "text"), dataset.get("name", "held-out text"), key, value)
               for key, value in exported_metrics(evaluation).items()]
    suite = (evaluation or {}).get("suite") or {}
    for corpus, metrics in (suite.get("corpora") or {}).items():
        results += [result(corpus, f"{corpus} (held-out, qat eval suite)", key, metrics[key])
                    for key in CARD_METRICS if isinstance(metrics.get(key), (int, float))]
    for probe, metrics in (suite.get("probes") or {}).items():
        if isinstance(metrics.get("accuracy"), (int, float)):
            results.append(result("wikimedia/wikipedia", f"{probe} probe (held-out Wikipedia)", "accuracy",
                                  metrics["accuracy"], task=f"Zero-shot {probe.replace('_', '-')} probe",
                                  config=f"{probe}-probe"))
    return results


def card_disagreement(card_text: str, manifest: Mapping[str, Any], evaluation: Mapping[str, Any]) -> Optional[str]:
    """What a model card's model-index reports differently from ``evaluation`` (eval.json); None if it agrees."""
    from huggingface_hub import ModelCard

    def keyed(results) -> dict[tuple[str, str], float]:
        return {(r.dataset_name, r.metric_type): float(r.metric_value) for r in results or []}

    expected = keyed(card_eval_results(evaluation, _dataset(manifest)))
    found = keyed(ModelCard(card_text).data.eval_results)
    for key, value in expected.items():
        if key not in found or abs(found[key] - value) > 1e-6 * max(1.0, abs(value)):
            return f"{key[1]} on {key[0]}: the card reports {found.get(key)}, eval.json {value}"
    extra = sorted(set(found) - set(expected))
    return f"the card reports {extra[0][1]} on {extra[0][0]}, which eval.json lacks" if extra else None


def card_metadata(name: str, manifest: Mapping[str, Any], evaluation: Optional[Mapping[str, Any]] = None):
    """The card's front matter as ``huggingface_hub.ModelCardData``."""
    from huggingface_hub import ModelCardData

    prov = manifest.get("provenance") or {}
    dataset = _dataset(manifest)
    results = card_eval_results(evaluation, dataset)
    return ModelCardData(license=LICENSE, library_name=library_name(manifest["format"]), pipeline_tag="text-generation",
                         tags=card_tags(manifest), base_model=prov.get("base_model"),
                         datasets=[dataset["dataset"]] if dataset.get("dataset") else None,
                         language=dataset.get("language"), model_name=name, eval_results=results or None)


def render_model_card(name: str, manifest: Mapping[str, Any], evaluation: Optional[Mapping[str, Any]] = None) -> str:
    """README.md (YAML front matter + markdown) for an export whose manifest (``qat_export.json``) is ``manifest``
    and whose ``eval.json`` (when ``qat eval`` ran) is ``evaluation``."""
    from qat.export.formats import get_format

    fmt = get_format(manifest["format"])
    model = manifest.get("model") or {}
    scheme = manifest.get("scheme")
    prov = manifest.get("provenance") or {}
    data = prov.get("data") or {}
    bits = manifest.get("bits_per_weight")
    paper = SCHEME_PAPERS.get(scheme["name"]) if scheme else None
    what = (f"quantized with `{scheme['name']}`" + (f" ([{paper[0]}]({paper[1]}))" if paper else "") +
            f": {scheme['description']}" if scheme else "full precision (no quantized layers)")
    lines = [f"# {name}", "", f"Causal LM trained with qat (quantization-aware training), {what}. Exported as "
             f"`{fmt.name}`: {fmt.description}.", "",
             "## Model", "",
             f"- architecture: `{model.get('model_type', '?')}` — hidden {model.get('hidden_size', '?')}, "
             f"{model.get('num_hidden_layers', '?')} layers, {model.get('num_attention_heads', '?')} heads, "
             f"FFN {model.get('intermediate_size', '?')}, vocab {model.get('vocab_size', '?')}, "
             f"{'tied' if model.get('tie_word_embeddings') else 'untied'} embeddings"]
    if scheme:
        groups = (manifest.get("quant") or {}).get("layer_groups")
        lines.append(f"- quantization: `{json.dumps(manifest.get('quant'))}` ({scheme['levels_count']} levels, "
                     f"{scheme['bits']} bits of information per weight"
                     + ("; the layers that a layer group matches use that group's settings instead" if groups else "")
                     + ")")
        lines.append(f"- linear-layer storage (measured from the file): {bits:.4f} bits/weight" if bits is not None
                     else "- linear-layer storage: see the weights file")
    else:
        lines.append(f"- storage: `{manifest.get('dtype', '?')}` tensors")
    lines += ["", "## Training", ""]
    if prov.get("run_name") or prov.get("global_step") is not None:
        lines.append(f"- run `{prov.get('run_name', '?')}`, checkpoint at step {prov.get('global_step', '?')}")
    if prov.get("base_model"):
        lines.append(f"- fine-tuned from [{prov['base_model']}](https://huggingface.co/{prov['base_model']})")
    elif prov.get("pretrained_name"):
        lines.append(f"- fine-tuned from a local pretrained model `{_local_name(prov['pretrained_name'])}`")
    teacher = prov.get("teacher")
    if teacher:
        source = teacher.get("source", "?")
        named = (f"[{SMOLLM2[0]}](https://huggingface.co/{SMOLLM2[1]})" if source == "smollm2"
                 else f"`{_local_name(source)}`")
        lines.append(f"- autoregressive distillation ([FBI-LLM](https://arxiv.org/abs/2407.07093)) from {named} "
                     f"(`{json.dumps(prov.get('distill'))}`)")
    if prov.get("optim"):
        lines.append(f"- optimizer/schedule: `{json.dumps(prov['optim'])}`")
    if data:
        lines.append(f"- data: {_dataset(manifest)['text']}; tokenizer `{_local_name(data.get('tokenizer', '?'))}`, "
                     f"block length {data.get('seq_len', '?')}")
    lines += ["", "## Loading", "", f"Runtimes: {fmt.runtime}.", "", "```python", fmt.loading_code, "```", ""]
    if evaluation:
        lines += ["## Evaluation (held-out split)", "", "| model | perplexity | bits/byte | tokens |",
                  "|---|---|---|---|"]
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
    front_matter = card_metadata(name, manifest, evaluation).to_yaml()
    return f"---\n{front_matter}\n---\n\n" + "\n".join(lines)
