"""Perplexity, bits per byte, logit agreement and the unigram floor on cases computed by hand or in float64 numpy."""

import math

import numpy as np
import pytest
import torch

from qat.eval.perplexity import heldout_metrics, logits_agreement, unigram_perplexity

# A bigram "model": the logits for the next token depend only on the current one. Rows are log-probabilities
# plus a per-row constant (softmax must remove it), so every softmax value is known exactly.
PROBS = np.array([[0.5, 0.25, 0.25],
                  [0.25, 0.5, 0.25],
                  [0.125, 0.125, 0.75]])
LOGITS = torch.tensor(np.log(PROBS) + np.array([[3.0], [-1.0], [0.5]]), dtype=torch.float32)


def _bigram(table: torch.Tensor):
    return lambda ids: table[ids]


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_heldout_metrics_on_a_hand_computed_bigram(batch_size):
    blocks = np.array([[0, 1, 2, 2], [2, 0, 0, 1]], dtype=np.int32)
    # Next-token probabilities: 0->1 1/4, 1->2 1/4, 2->2 3/4, 2->0 1/8, 0->0 1/2, 0->1 1/4, so the summed NLL
    # is ln(4 * 4 * 4/3 * 8 * 2 * 4) = ln(4096 / 3) over 6 predicted tokens (the first of each block is not).
    m = heldout_metrics(_bigram(LOGITS), blocks, batch_size=batch_size, bytes_per_token=2.5)
    assert m["tokens"] == 6
    assert m["nll_per_token"] == pytest.approx(math.log(4096 / 3) / 6, rel=1e-6)
    assert m["perplexity"] == pytest.approx((4096 / 3) ** (1 / 6), rel=1e-6)
    # bits/byte = nats/token / ln 2 / (bytes/token) = log2(4096/3) / 6 / 2.5 = (12 - log2 3) / 15.
    assert m["bits_per_byte"] == pytest.approx((12 - math.log2(3)) / 15, rel=1e-6)
    assert "bits_per_byte" not in heldout_metrics(_bigram(LOGITS), blocks, batch_size=batch_size)


def test_heldout_metrics_match_a_float64_numpy_log_softmax():
    rng = np.random.default_rng(11)
    vocab, n, t = 13, 5, 9
    table = rng.normal(scale=3.0, size=(vocab, vocab))
    blocks = rng.integers(0, vocab, size=(n, t)).astype(np.int32)
    log_z = np.log(np.exp(table - table.max(1, keepdims=True)).sum(1)) + table.max(1)
    nll = [log_z[a] - table[a, b] for row in blocks for a, b in zip(row[:-1], row[1:])]
    m = heldout_metrics(_bigram(torch.tensor(table, dtype=torch.float32)), blocks, batch_size=2)
    assert m["tokens"] == n * (t - 1)
    assert m["nll_per_token"] == pytest.approx(np.mean(nll), rel=1e-5)
    assert m["perplexity"] == pytest.approx(np.exp(np.mean(nll)), rel=1e-5)


def test_logits_agreement_by_hand():
    a = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 5.0, 1.0]]])
    b = torch.tensor([[[1.0, 2.5, 3.0], [4.0, 0.0, 1.0]]])
    m = logits_agreement(a, b)
    assert m["max_abs_logit_diff"] == pytest.approx(5.0)
    assert m["mean_abs_logit_diff"] == pytest.approx(9.5 / 6)
    assert m["top1_agreement"] == pytest.approx(0.5)   # argmax 2 == 2, 1 != 0


def test_unigram_perplexity_is_add_one_smoothed_and_skips_the_first_token():
    train = np.array([[0, 0, 1], [2, 0, 1]])
    # Counts + 1 over a vocabulary of 4: [3, 2, 1, 0] + 1 = [4, 3, 2, 1] -> p = [0.4, 0.3, 0.2, 0.1].
    val = np.array([[3, 0, 1], [1, 2, 3]])   # predicted tokens: 0, 1, 2, 3 (the first of each block is context)
    assert unigram_perplexity(train, val, vocab_size=4) == pytest.approx((0.4 * 0.3 * 0.2 * 0.1) ** -0.25, rel=1e-12)
