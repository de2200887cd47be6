"""Two zero-shot probes built from held-out text, each with its chance level.

- **last word** (LAMBADA-style, Paperno et al. 2016): a passage ends with a sentence whose last word is removed;
  the model is right when its greedy continuation is exactly that word's tokens. Chance: a model that samples from
  the unigram distribution gets an item right with probability prod p(token); uniform guessing with (1/V)^len.
- **swap**: a sentence and the same sentence with two adjacent words swapped (BLiMP-style minimal pair); the model
  is right when it gives the original a higher log-likelihood. Chance: 50% (a tie counts half).

Construction is deterministic: items come from the documents in order, spread evenly over them; the swap position
comes from a seeded ``random.Random``.
"""

import math
import random
import re
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
LAST_WORD = re.compile(r"^(?P<context>.*\S)\s+(?P<word>[A-Za-z]{3,})\.$", re.S)


@dataclass(frozen=True)
class LastWordItem:
    context: str
    word: str


@dataclass(frozen=True)
class SwapItem:
    original: str
    swapped: str


def _paragraphs(documents: list[str]) -> list[str]:
    return [" ".join(p.split()) for doc in documents for p in re.split(r"\n\s*\n", doc) if p.strip()]


def _spread(candidates: list, n_items: int) -> list:
    """``n_items`` of ``candidates`` at evenly spaced positions (all of them when there are fewer)."""
    if len(candidates) <= n_items:
        return candidates
    return [candidates[i * len(candidates) // n_items] for i in range(n_items)]


def build_last_word_items(documents: list[str], n_items: int, min_context_words: int = 30) -> list[LastWordItem]:
    """Passages ending in a sentence whose last word (3+ letters, then a full stop) is the target; the passage is
    the paragraph up to that word, at least ``min_context_words`` long. At most one item per paragraph (its last
    eligible sentence), so items are spread over the text."""
    candidates = []
    for para in _paragraphs(documents):
        sentences = SENTENCE_END.split(para)
        for end in range(len(sentences), 0, -1):
            m = LAST_WORD.match(sentences[end - 1])
            if not m:
                continue
            context = " ".join(sentences[:end - 1] + [m["context"]])
            if len(context.split()) >= min_context_words:
                candidates.append(LastWordItem(context, m["word"]))
                break
    return _spread(candidates, n_items)


def build_swap_items(documents: list[str], n_items: int, seed: int = 0, min_words: int = 8,
                     max_words: int = 40) -> list[SwapItem]:
    """Sentences of ``min_words``..``max_words`` words, each paired with a copy where the words at a seeded random
    position i and i+1 are swapped (pairs of equal words are skipped: swapping them changes nothing)."""
    sentences = [s for para in _paragraphs(documents) for s in SENTENCE_END.split(para)
                 if min_words <= len(s.split()) <= max_words]
    rng = random.Random(seed)
    items = []
    for sentence in _spread(sentences, n_items):
        words = sentence.split()
        i = rng.randrange(len(words) - 1)
        if words[i] == words[i + 1]:
            continue
        swapped = words[:i] + [words[i + 1], words[i]] + words[i + 2:]
        items.append(SwapItem(sentence, " ".join(swapped)))
    return items


@torch.no_grad()
def score_continuations(logits_fn: Callable[[torch.Tensor], torch.Tensor], sequences: list[list[int]],
                        starts: list[int], pad_id: int, batch_size: int = 8) -> list[tuple[float, bool]]:
    """For each token sequence, the summed log-probability of its tokens from position ``start`` on given
    everything before them, and whether each of those tokens is the model's argmax (i.e. greedy decoding from the
    prefix reproduces them exactly). Sequences are right-padded, which a causal model cannot see."""
    out = []
    for b in range(0, len(sequences), batch_size):
        seqs, firsts = sequences[b:b + batch_size], starts[b:b + batch_size]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, :len(s)] = torch.tensor(s, dtype=torch.long)
        logp = F.log_softmax(logits_fn(ids).float(), dim=-1)
        for row, (s, start) in enumerate(zip(seqs, firsts)):
            positions = torch.arange(start - 1, len(s) - 1)   # the logits at p predict token p + 1
            targets = ids[row, start:len(s)]
            row_logp = logp[row, positions]
            out.append((float(row_logp.gather(-1, targets[:, None]).sum()),
                        bool((row_logp.argmax(-1) == targets).all())))
    return out


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def last_word_probe(logits_fn, tokenizer, items: list[LastWordItem], max_len: int,
                    unigram_logprobs: Optional[np.ndarray] = None, batch_size: int = 8) -> dict:
    """Exact-match accuracy of greedy continuations (see module doc) and the chance levels beside it."""
    sequences, starts, targets = [], [], []
    for item in items:
        target = _encode(tokenizer, " " + item.word)   # continuation encoded on its own, as lm-eval does
        context = _encode(tokenizer, item.context)[-(max_len - len(target)):]
        sequences.append(context + target)
        starts.append(len(context))
        targets.append(target)
    scores = score_continuations(logits_fn, sequences, starts, tokenizer.eos_token_id, batch_size)
    vocab = len(tokenizer)
    result = {"accuracy": float(np.mean([hit for _, hit in scores])) if scores else float("nan"),
              "items": len(items),
              "chance_uniform": float(np.mean([vocab ** -len(t) for t in targets])) if targets else float("nan"),
              "mean_target_tokens": float(np.mean([len(t) for t in targets])) if targets else float("nan")}
    if unigram_logprobs is not None and targets:
        result["chance_unigram"] = float(np.mean([math.exp(unigram_logprobs[t].sum()) for t in targets]))
    result["chance"] = result.get("chance_unigram", result["chance_uniform"])
    return result


def swap_probe(logits_fn, tokenizer, items: list[SwapItem], max_len: int, batch_size: int = 8) -> dict:
    """How often the original sentence gets a higher log-likelihood than its swapped copy (ties count half).
    Each sentence is scored after an EOS, the document separator the model was trained with."""
    eos = tokenizer.eos_token_id
    sequences = []
    for item in items:
        sequences += [[eos] + _encode(tokenizer, item.original)[:max_len - 1],
                      [eos] + _encode(tokenizer, item.swapped)[:max_len - 1]]
    scores = [lp for lp, _ in score_continuations(logits_fn, sequences, [1] * len(sequences), eos, batch_size)]
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(scores[0::2], scores[1::2])]
    return {"accuracy": float(np.mean(wins)) if wins else float("nan"), "items": len(items), "chance": 0.5}
