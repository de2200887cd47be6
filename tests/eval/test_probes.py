"""The zero-shot probes: deterministic construction, chance levels, and scores of models with hand-set logits."""

import math

import numpy as np
import pytest
import torch

from qat.eval.probes import (
    LastWordItem,
    SwapItem,
    build_last_word_items,
    build_swap_items,
    last_word_probe,
    score_continuations,
    swap_probe,
)


class WordTokenizer:
    """A tokenizer with one token per known word (the minimum the probes need from an HF tokenizer)."""

    def __init__(self, words: list[str]):
        self.vocab = ["<eos>"] + words
        self.eos_token_id = 0

    def __len__(self):
        return len(self.vocab)

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.vocab.index(w) for w in text.split()]}


TEXT = ("The river rose over the old stone bridge in the spring. People crossed it on foot and on horseback "
        "for many years after that. The council voted to repair the bridge before winter came. Workers arrived "
        "with carts of stone and timber and tools. They finished the work in a single summer.\n\n"
        "A second paragraph is far too short to give a passage.\n\n")


def test_probe_construction_is_deterministic_and_taken_from_the_text():
    docs = [TEXT * 3, TEXT.replace("river", "canal") * 2]
    items = build_last_word_items(docs, n_items=50, min_context_words=20)
    assert items == build_last_word_items(docs, n_items=50, min_context_words=20)
    # One item per long-enough paragraph (its last sentence); the short paragraph gives none.
    assert [i.word for i in items] == ["summer"] * 5
    assert items[0].context.endswith("They finished the work in a single")
    assert items[0].context + " summer." in " ".join(TEXT.split())
    swaps = build_swap_items(docs, n_items=6, seed=0)
    assert swaps == build_swap_items(docs, n_items=6, seed=0)
    assert swaps != build_swap_items(docs, n_items=6, seed=1)
    for item in swaps:
        a, b = item.original.split(), item.swapped.split()
        diff = [k for k in range(len(a)) if a[k] != b[k]]
        # Exactly two adjacent words exchanged.
        assert len(diff) == 2 and diff[1] == diff[0] + 1 and (a[diff[0]], a[diff[1]]) == (b[diff[1]], b[diff[0]])
        assert item.original in " ".join(TEXT.replace("river", "canal").split()) + " ".join(TEXT.split())


def test_items_are_spread_over_the_whole_text():
    docs = [f"Paragraph {k} has many words in it so that it makes a long enough passage for the probe about "
            f"thing{k} here and there and everywhere we look. It ends with the word apple.\n\n" for k in range(100)]
    items = build_last_word_items(docs, n_items=10, min_context_words=10)
    assert [int(i.context.split()[1]) for i in items] == list(range(0, 100, 10))


def _bigram_logits(table: torch.Tensor):
    return lambda ids: table[ids]


def test_score_continuations_on_a_hand_set_bigram():
    # Next-token log-probabilities: from 1 -> 2 is ln 0.5 (argmax), from 2 -> 3 is ln 0.25 (not argmax: 2 -> 1 is).
    probs = torch.full((4, 4), 0.1)
    probs[1] = torch.tensor([0.1, 0.1, 0.5, 0.3])
    probs[2] = torch.tensor([0.05, 0.6, 0.1, 0.25])
    probs[3] = torch.tensor([0.25, 0.25, 0.25, 0.25])
    fn = _bigram_logits(probs.log() + 7.0)   # a per-row constant does not change a softmax
    (lp_a, greedy_a), (lp_b, greedy_b) = score_continuations(fn, [[0, 1, 2], [1, 2, 3, 0]], [2, 1], pad_id=0,
                                                             batch_size=2)
    assert lp_a == pytest.approx(math.log(0.5), rel=1e-5) and greedy_a
    assert lp_b == pytest.approx(math.log(0.5 * 0.25 * 0.25), rel=1e-5) and not greedy_b


def test_last_word_probe_scores_greedy_exact_match_and_states_chance():
    tok = WordTokenizer(["the", "cat", "sat", "mat", "dog"])
    # A bigram model whose argmax after "sat" is "mat" and after "the" is "cat".
    logits = torch.zeros(6, 6)
    logits[3, 4] = 5.0   # sat -> mat
    logits[1, 2] = 5.0   # the -> cat
    items = [LastWordItem("the cat sat", "mat"), LastWordItem("the cat sat", "dog"), LastWordItem("sat the", "cat")]
    unigram = np.log(np.array([0.1, 0.3, 0.2, 0.1, 0.2, 0.1]))
    result = last_word_probe(_bigram_logits(logits), tok, items, max_len=16, unigram_logprobs=unigram)
    assert result["accuracy"] == pytest.approx(2 / 3)
    assert result["items"] == 3
    assert result["chance_uniform"] == pytest.approx(1 / 6)
    # A unigram sampler is right with p(target): (p(mat) + p(dog) + p(cat)) / 3.
    assert result["chance_unigram"] == pytest.approx((0.2 + 0.1 + 0.2) / 3)
    assert result["chance"] == result["chance_unigram"]


def test_swap_probe_prefers_the_sentence_the_model_finds_likelier():
    tok = WordTokenizer(["a", "b", "c"])
    logits = torch.zeros(4, 4)
    logits[1, 2] = 3.0   # a -> b likely, so "a b c" beats "b a c"
    logits[2, 3] = 3.0   # b -> c
    items = [SwapItem("a b c", "b a c"), SwapItem("c b a", "c a b"), SwapItem("c c", "c c")]
    result = swap_probe(_bigram_logits(logits), tok, items, max_len=16)
    # item 1: original wins; item 2: "c a b" has a->b, so the swap wins; item 3: a tie counts half.
    assert result["accuracy"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert result["chance"] == 0.5


def test_swap_probe_of_a_uniform_model_is_at_chance():
    tok = WordTokenizer(["a", "b", "c"])
    items = [SwapItem("a b c", "b a c"), SwapItem("c a", "a c")]
    assert swap_probe(_bigram_logits(torch.zeros(4, 4)), tok, items, max_len=16)["accuracy"] == 0.5
