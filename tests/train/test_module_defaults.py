"""The LightningModules' default configs are one instance each (Python evaluates defaults once): filling in the
tokenizer's vocabulary size must change neither those defaults nor a config the caller passed in."""

import inspect

import pytest
from tokenizers import ByteLevelBPETokenizer
from transformers import PreTrainedTokenizerFast

from qat.nn.config import ArchConfig
from qat.train.distill_module import DistillationLanguageModel
from qat.train.module import QATLanguageModel

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=2, max_position_embeddings=16)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["some text for a tiny tokenizer"] * 5, vocab_size=280, special_tokens=["<|e|>"])
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|e|>").save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("module_class", [QATLanguageModel, DistillationLanguageModel])
def test_default_and_caller_configs_are_not_mutated(module_class, tokenizer_dir):
    defaults = inspect.signature(module_class.__init__).parameters
    default_arch, default_quant = defaults["arch"].default, defaults["quant"].default
    arch = ArchConfig(**SMALL)
    model = module_class(arch=arch, tokenizer_dir=tokenizer_dir)
    assert model.arch.vocab_size == model.hparams["arch"]["vocab_size"] > 256
    assert arch.vocab_size == 0                       # the caller's config is unchanged
    assert model.arch is not arch
    assert model.quant is not default_quant           # the layers hold the module's own copy
    default_model = module_class(tokenizer_dir=tokenizer_dir)
    assert default_model.arch.vocab_size == model.arch.vocab_size
    assert default_arch.vocab_size == 0 and default_model.arch is not default_arch
    if module_class is DistillationLanguageModel:
        assert default_model.teacher_cfg is not defaults["teacher"].default
        assert default_model.distill_cfg is not defaults["distill"].default
