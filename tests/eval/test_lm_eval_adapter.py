"""A qat model scored by the real lm-eval harness (HFLM) on a multiple-choice task read from local JSONL.

The task's answers are set from qat's own scoring of each choice (:func:`qat.eval.probes.score_continuations`):
the likeliest choice for even items, the least likely for odd ones, so lm-eval must report accuracy exactly 0.5 —
which it only does when it runs this very model with this very tokenizer."""

import json

import pytest
import torch

from qat.errors import RecipeError
from qat.eval.lm_eval_adapter import check_task_files, evaluate_lm_eval_tasks
from qat.eval.probes import score_continuations
from tests.conftest import run_qat

pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval==0.4.13)")

QUESTIONS = ["The capital of France is", "In the beginning God created", "The river flows into the",
             "Autism is a developmental", "The album was released in", "He was born in the city of"]
CHOICES = [" Paris", " the", " heaven", " sea", " disorder", " 1990", " London", " water"]


def _write_task(tmp_path, model, tokenizer) -> str:
    rows = []
    for k, question in enumerate(QUESTIONS):
        context = tokenizer(question)["input_ids"]
        seqs = [context + tokenizer(c)["input_ids"] for c in CHOICES]
        scores = [lp for lp, _ in score_continuations(lambda ids: model(input_ids=ids).logits, seqs,
                                                      [len(context)] * len(seqs), tokenizer.eos_token_id)]
        best = max(range(len(CHOICES)), key=scores.__getitem__)
        worst = min(range(len(CHOICES)), key=scores.__getitem__)
        rows.append({"question": question, "choices": CHOICES, "answer": best if k % 2 == 0 else worst})
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = tmp_path / "tiny_mc.yaml"
    task.write_text(f"""task: qat_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return str(task)


@pytest.fixture(scope="module")
def tiny_qat_model():
    """A real BitNet b1.58 model (BitLinear layers, seeded random weights) with the default BPE tokenizer."""
    from qat.data.datamodule import TextDataModule
    from qat.nn.config import ArchConfig, QuantConfig
    from qat.nn.convert import build_model, convert_to_qat

    tokenizer = TextDataModule().tokenizer
    torch.manual_seed(0)
    model = build_model(ArchConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2))
    convert_to_qat(model, QuantConfig())
    return model.eval(), tokenizer


def test_lm_eval_scores_a_qat_model_on_a_local_jsonl_task(tiny_qat_model, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    model, tokenizer = tiny_qat_model
    task = _write_task(tmp_path, model, tokenizer)
    results = evaluate_lm_eval_tasks(model, tokenizer, [task], batch_size=4)
    assert results["qat_tiny_mc"]["acc,none"] == 0.5


def test_task_files_are_checked_before_any_model_is_loaded(tmp_path):
    with pytest.raises(RecipeError, match="no such .yaml"):
        check_task_files([str(tmp_path / "missing.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset_path: json\n")
    with pytest.raises(RecipeError, match="no `task: NAME`"):
        check_task_files([str(bad)])
    tagged = tmp_path / "tagged.yaml"
    tagged.write_text("task: t\nprocess_docs: !function utils.process\n")   # lm-eval's own tag is accepted
    assert check_task_files([str(tagged)]) == [(tmp_path.resolve(), "t")]


def test_lm_eval_refuses_a_model_that_is_not_a_transformers_model(tiny_qat_model, tmp_path):
    task = tmp_path / "t.yaml"
    task.write_text("task: t\n")
    with pytest.raises(RecipeError, match="HFLM needs a transformers model"):
        evaluate_lm_eval_tasks(torch.nn.Linear(2, 2), tiny_qat_model[1], [str(task)])


@pytest.mark.slow
def test_qat_eval_lm_eval_tasks_on_a_trained_checkpoint(tiny_ternary_run, tmp_path):
    from qat.eval.loading import load_model_and_tokenizer

    ckpt = tiny_ternary_run / "checkpoints" / "last.ckpt"
    model, tokenizer = load_model_and_tokenizer(str(ckpt))
    task = _write_task(tmp_path, model, tokenizer)
    result = run_qat("eval", str(ckpt), f"--lm_eval_tasks=[{task}]", "--max_blocks=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["lm_eval"]["qat_tiny_mc"]["acc,none"] == 0.5
    missing = run_qat("eval", str(ckpt), f"--lm_eval_tasks=[{tmp_path / 'nope.yaml'}]")
    assert missing.returncode == 2 and "no such .yaml file" in missing.stderr
