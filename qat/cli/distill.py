"""``qat distill`` (= ``qat fit`` with :class:`DistillationLanguageModel`: recipe keys ``model.teacher`` and
``model.distill``) and ``qat cache-teacher`` (precompute the recipe's top-k teacher logits once; same arguments)."""

import numpy as np

from qat.cli.fit import fit_cli
from qat.errors import RecipeError
from qat.teachers.load import check_same_tokenizer, load_teacher
from qat.teachers.logit_cache import build_logit_cache
from qat.train.distill_module import DistillationLanguageModel, logit_cache_key


def distill(args: list[str]):
    """``qat distill --config recipes/fbi-binary-tiny-ad.yaml [--key=value ...]``: train by distillation."""
    return fit_cli(["fit", *args], model_class=DistillationLanguageModel)


def cache_teacher(args: list[str]) -> str:
    """``qat cache-teacher --config RECIPE [--key=value ...]``: top-k teacher logits of the recipe's training blocks.

    Uses ``model.teacher``, ``model.distill.top_k``/``cache_batch_size`` and the ``data`` section (including
    ``data.max_train_blocks``); reruns reuse a complete cache and resume an interrupted one. Returns the folder.
    """
    cli = fit_cli(args, model_class=DistillationLanguageModel, run=False)
    model, datamodule = cli.model, cli.datamodule
    if model.teacher_cfg is None:
        raise RecipeError("the recipe has model.teacher: null; there is no teacher to cache")
    datamodule.setup("fit")
    blocks = np.asarray(datamodule.datasets["train"].blocks)
    teacher = load_teacher(model.teacher_cfg)
    vocab = int(teacher.model.config.vocab_size)
    check_same_tokenizer(datamodule.tokenizer_path, teacher.tokenizer_dir, teacher.name, vocab)
    key = logit_cache_key(model.teacher_cfg, model.distill_cfg, blocks, datamodule.tokenizer_path)
    print(f"caching top-{key.top_k} logits of teacher {teacher.name!r} for {key.num_blocks} blocks x {key.seq_len} "
          f"tokens")
    cache = build_logit_cache(key, blocks, lambda ids: teacher.model(input_ids=ids).logits, vocab,
                              batch_size=model.distill_cfg.cache_batch_size)
    print(f"teacher-logit cache: {cache.folder}")
    return str(cache.folder)
