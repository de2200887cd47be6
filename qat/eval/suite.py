"""The evaluation suite (``qat eval --suite``): held-out perplexity and bits/byte on every installed corpus of
:mod:`qat.data.corpora` (a fixed token budget each, the model's own tokenizer), agreement with a reference model
(KL and top-1), and the two zero-shot probes of :mod:`qat.eval.probes`, as one JSON dict and one markdown table."""

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from qat.data.corpora import CORPORA, corpus_unavailable_reason, heldout_documents, token_budget_blocks
from qat.errors import CheckpointError, RecipeError
from qat.eval.perplexity import heldout_metrics
from qat.eval.probes import build_last_word_items, build_swap_items, last_word_probe, swap_probe

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
PROBE_CORPUS = "wikipedia"   # the probes' text: held-out articles of the default corpus


@dataclass
class SuiteConfig:
    """What the suite measures.

    Args:
        corpora: corpus names (see :data:`qat.data.corpora.CORPORA`).
        budget_tokens: held-out tokens per corpus (rounded down to whole blocks).
        seq_len: tokens per block.
        probe_items: items per probe.
        reference_blocks: held-out blocks (of the first corpus) compared with the reference model.
        batch_size: sequences per forward pass.
    """

    corpora: tuple[str, ...] = tuple(CORPORA)
    budget_tokens: int = 16384
    seq_len: int = 256
    probe_items: int = 200
    reference_blocks: int = 16
    batch_size: int = 8

    def __post_init__(self):
        unknown = [c for c in self.corpora if c not in CORPORA]
        if unknown:
            raise RecipeError(f"unknown corpus {', '.join(unknown)}; choose from {', '.join(CORPORA)}")
        for key in ("budget_tokens", "seq_len", "probe_items", "reference_blocks", "batch_size"):
            if getattr(self, key) < 1:
                raise RecipeError(f"suite {key}={getattr(self, key)} must be at least 1")
        if self.budget_tokens < self.seq_len:
            raise RecipeError(f"suite budget_tokens={self.budget_tokens} is less than one block of "
                              f"seq_len={self.seq_len}; raise it")


@torch.no_grad()
def reference_agreement(logits_fn: LogitsFn, reference_fn: LogitsFn, blocks: np.ndarray,
                        batch_size: int = 8) -> dict[str, float]:
    """Mean KL(reference || model) in nats per token and top-1 agreement, over every position of ``blocks``."""
    total_kl, total_top1, n = 0.0, 0.0, 0
    for start in range(0, len(blocks), batch_size):
        ids = torch.tensor(np.asarray(blocks[start:start + batch_size]), dtype=torch.long)
        logq = F.log_softmax(logits_fn(ids).float(), dim=-1)
        logp = F.log_softmax(reference_fn(ids).float(), dim=-1)
        if logp.shape != logq.shape:
            raise RecipeError(f"the reference model's vocabulary ({logp.shape[-1]}) differs from the model's "
                              f"({logq.shape[-1]}); pass a reference trained with the same tokenizer")
        total_kl += float((logp.exp() * (logp - logq)).sum())
        total_top1 += float((logp.argmax(-1) == logq.argmax(-1)).sum())
        n += ids.numel()
    return {"kl_nats_per_token": total_kl / n, "top1_agreement": total_top1 / n, "tokens": n}


def check_reference_tokenizer(model_tokenizer, reference_tokenizer, reference: str) -> None:
    """KL and top-1 agreement compare distributions over the same token ids: the tokenizers must be identical.

    Raises:
        CheckpointError: naming the reference.
    """
    if reference_tokenizer.get_vocab() != model_tokenizer.get_vocab():
        raise CheckpointError(f"the reference {reference} uses another tokenizer than the evaluated model; KL and "
                              "top-1 agreement need the same one (e.g. the FP baseline trained on the same data)")


def run_suite(logits_fn: LogitsFn, tokenizer, config: SuiteConfig = SuiteConfig(),
              reference_fn: Optional[LogitsFn] = None, unigram_counts: Optional[np.ndarray] = None) -> dict:
    """Every measure of the suite for the model ``logits_fn`` (ids (B, T) -> logits (B, T, V)).

    A corpus that is not installed is listed under ``skipped`` with the reason. ``unigram_counts`` (token counts of
    the training data) gives the last-word probe its unigram chance level.
    """
    results: dict = {"config": {"budget_tokens": config.budget_tokens, "seq_len": config.seq_len,
                                "probe_items": config.probe_items},
                     "corpora": {}, "skipped": {}}
    first_blocks = None
    for name in config.corpora:
        reason = corpus_unavailable_reason(name)
        if reason:
            results["skipped"][name] = reason
            continue
        blocks, bytes_per_token = token_budget_blocks(heldout_documents(name), tokenizer, config.budget_tokens,
                                                      config.seq_len)
        first_blocks = blocks if first_blocks is None else first_blocks
        results["corpora"][name] = heldout_metrics(logits_fn, blocks, config.batch_size, bytes_per_token,
                                                   desc=f"suite {name}")
    if reference_fn is not None and first_blocks is not None:
        results["reference"] = reference_agreement(logits_fn, reference_fn, first_blocks[:config.reference_blocks],
                                                    config.batch_size)
    probe_reason = corpus_unavailable_reason(PROBE_CORPUS)
    if probe_reason:
        results["skipped"]["probes"] = probe_reason
    else:
        docs = heldout_documents(PROBE_CORPUS)
        unigram_logprobs = None
        if unigram_counts is not None:
            counts = np.asarray(unigram_counts, dtype=np.float64) + 1.0   # add-one, as qat's unigram floor
            unigram_logprobs = np.log(counts / counts.sum())
        results["probes"] = {
            "last_word": last_word_probe(logits_fn, tokenizer, build_last_word_items(docs, config.probe_items),
                                         config.seq_len, unigram_logprobs, config.batch_size),
            "swap": swap_probe(logits_fn, tokenizer, build_swap_items(docs, config.probe_items), config.seq_len,
                               config.batch_size)}
    return results


def _fmt(value: Optional[float], digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:.2g}" if abs(value) < 1e-2 and value != 0 else f"{value:.{digits}f}"


PROBE_LABELS = {"last_word": "last-word (greedy exact match)", "swap": "original > adjacent-word swap"}


def suite_table_markdown(results: dict) -> str:
    """One markdown table: perplexity and bits/byte per corpus, reference agreement, probes beside chance."""
    lines = ["| eval | perplexity | bits/byte | accuracy | chance | n |", "|---|---|---|---|---|---|"]
    for name, m in results.get("corpora", {}).items():
        lines.append(f"| {name} | {_fmt(m['perplexity'], 2)} | {_fmt(m.get('bits_per_byte'), 4)} | — | — | "
                     f"{m['tokens']} tokens |")
    for key, label in PROBE_LABELS.items():
        p = results.get("probes", {}).get(key)
        if p:
            lines.append(f"| {label} | — | — | {_fmt(p['accuracy'])} | {_fmt(p['chance'])} | {p['items']} items |")
    ref = results.get("reference")
    if ref:
        lines.append(f"| top-1 agreement with reference (KL {_fmt(ref['kl_nats_per_token'])} nats/token) | — | — | "
                     f"{_fmt(ref['top1_agreement'])} | — | {ref['tokens']} tokens |")
    for name, reason in results.get("skipped", {}).items():
        lines.append(f"| {name} | skipped: {reason} | | | | |")
    return "\n".join(lines)
