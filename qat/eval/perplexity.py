"""Held-out perplexity: exp of the mean next-token NLL over every token of the validation blocks."""

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm


@torch.no_grad()
def heldout_metrics(logits_fn: Callable[[torch.Tensor], torch.Tensor], blocks: np.ndarray, batch_size: int = 8,
                    bytes_per_token: float | None = None, desc: str = "eval") -> dict[str, float]:
    """NLL/token, perplexity and (with ``bytes_per_token``) bits/byte of ``logits_fn`` on ``blocks`` (N, T)."""
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, len(blocks), batch_size), desc=desc, leave=False):
        # copy: blocks may be a read-only memmap
        ids = torch.tensor(np.asarray(blocks[start:start + batch_size]), dtype=torch.long)
        logits = logits_fn(ids).float()
        nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="sum")
        total_nll += float(nll)
        total_tokens += ids[:, 1:].numel()
    nll_per_token = total_nll / total_tokens
    metrics = {"nll_per_token": nll_per_token, "perplexity": math.exp(nll_per_token), "tokens": total_tokens}
    if bytes_per_token:
        metrics["bits_per_byte"] = nll_per_token / math.log(2) / bytes_per_token
    return metrics


@torch.no_grad()
def logits_agreement(logits_a: torch.Tensor, logits_b: torch.Tensor) -> dict[str, float]:
    """Max/mean absolute logit difference and top-1 agreement of two models on the same tokens."""
    diff = (logits_a.float() - logits_b.float()).abs()
    return {"max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
            "top1_agreement": float((logits_a.argmax(-1) == logits_b.argmax(-1)).float().mean())}


def unigram_perplexity(train_blocks: np.ndarray, val_blocks: np.ndarray, vocab_size: int) -> float:
    """Perplexity of the add-one unigram model fitted on the training tokens: the floor a model must beat."""
    counts = np.bincount(np.asarray(train_blocks).reshape(-1), minlength=vocab_size).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(np.exp(-logp[np.asarray(val_blocks)[:, 1:].reshape(-1)].mean()))
