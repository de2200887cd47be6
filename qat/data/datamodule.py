"""LightningDataModule over local text (JSONL or plain text, see :mod:`qat.data.documents`), tokenized once with HF
``datasets`` and cached as fixed-length token blocks (numpy files keyed on data, tokenizer and block length)."""

import hashlib
from pathlib import Path
from typing import Optional

import lightning as L
import numpy as np
import torch
from filelock import FileLock
from torch.utils.data import DataLoader, Dataset

from qat.data.corpus import default_corpus, file_fingerprint
from qat.data.documents import SUFFIXES, check_documents, documents_fingerprint, iter_documents
from qat.data.sampler import ResumableShuffleSampler
from qat.data.tokenizer import load_tokenizer, tokenizer_dir
from qat.errors import DataError, RecipeError
from qat.paths import cache_dir

SPLITS = ("train", "validation")


class TokenBlocks(Dataset):
    """Rows of a (num_blocks, seq_len) int32 array as ``{"input_ids": LongTensor, "block_index": int}`` (the
    index lines cached per-block data, e.g. teacher logits, up with the batch)."""

    def __init__(self, blocks: np.ndarray):
        self.blocks = blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.from_numpy(np.asarray(self.blocks[i], dtype=np.int64)), "block_index": i}


def _check_files(files: list[str], key: str, text_field: str) -> list[Path]:
    """The paths of ``files``, each checked to exist and to hold readable documents."""
    paths = [Path(f) for f in files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"data.{key}: file(s) not found: {', '.join(missing)}. Fix the path in the recipe "
                        "or drop data.train_files/val_files to use the built-in Wikipedia corpus.")
    bad = [str(p) for p in paths if p.suffix not in SUFFIXES]
    if bad:
        raise DataError(f"data.{key}: unsupported file type {', '.join(bad)}; use .jsonl/.json (one object per line "
                        "with a text field) or .txt (one document per blank-line-separated paragraph)")
    check_documents(paths, text_field)
    return paths


class TextDataModule(L.LightningDataModule):
    """Language-modelling data: documents joined with EOS and cut into blocks of ``seq_len`` tokens.

    Args:
        train_files: files for training; empty means the built-in Wikipedia corpus. ``.jsonl``/``.json``: one
            JSON object per line with the text in ``text_field``; ``.txt``: UTF-8 text, one document per
            blank-line-separated paragraph.
        val_files: held-out files; required when ``train_files`` is given.
        text_field: the JSON field holding the text.
        tokenizer: ``bpe`` (trained on the training files), ``smollm2`` (the teacher's 49k BPE), or a local
            HF tokenizer folder.
        tokenizer_vocab_size: vocabulary size of the ``bpe`` tokenizer.
        seq_len: tokens per training/validation block.
        batch_size: blocks per step on each device.
        max_val_blocks: cap on validation blocks (0 = all).
        max_train_blocks: train on the first N blocks only (0 = all), e.g. those with cached teacher logits.
    """

    def __init__(self, train_files: Optional[list[str]] = None, val_files: Optional[list[str]] = None,
                 text_field: str = "text", tokenizer: str = "bpe", tokenizer_vocab_size: int = 4096,
                 seq_len: int = 256, batch_size: int = 16, max_val_blocks: int = 0, num_workers: int = 0,
                 seed: int = 1234, max_train_blocks: int = 0):
        super().__init__()
        self.save_hyperparameters()
        if seq_len < 2:
            raise RecipeError(f"data.seq_len={seq_len} must be at least 2")
        if batch_size < 1:
            raise RecipeError(f"data.batch_size={batch_size} must be at least 1")
        if train_files:
            if not val_files:
                raise DataError("data.val_files is empty: held-out data is needed for evaluation; add a file")
            self.files = {"train": _check_files(train_files, "train_files", text_field),
                          "validation": _check_files(val_files, "val_files", text_field)}
        else:
            corpus = default_corpus()
            self.files = {split: [corpus[split]] for split in SPLITS}
        self.text_field = text_field
        all_files = self.files["train"] + self.files["validation"]
        self.data_fingerprint = documents_fingerprint(file_fingerprint(all_files), all_files, text_field)
        self.tokenizer_path = tokenizer_dir(tokenizer, self.files["train"], text_field, tokenizer_vocab_size,
                                            documents_fingerprint(file_fingerprint(self.files["train"]),
                                                                  self.files["train"], text_field))
        self.tokenizer = load_tokenizer(self.tokenizer_path)
        self.datasets: dict[str, TokenBlocks] = {}
        self.resume_global_step = 0

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def _blocks_path(self, split: str) -> Path:
        tok_hash = hashlib.sha256(Path(self.tokenizer_path, "tokenizer.json").read_bytes()).hexdigest()[:12]
        return cache_dir("tokens") / f"{self.data_fingerprint}-{tok_hash}-{self.hparams.seq_len}-{split}.npy"

    def _tokenize(self, split: str) -> np.ndarray:
        from datasets import Dataset

        # One reader for every format (the one the BPE tokenizer trained on); datasets batches the tokenization.
        ds = Dataset.from_dict({"text": list(iter_documents(self.files[split], self.text_field))})
        eos = self.tokenizer.eos_token_id
        ds = ds.map(lambda b: {"ids": [ids + [eos] for ids in self.tokenizer(b["text"])["input_ids"]]},
                    batched=True, remove_columns=ds.column_names, desc=f"tokenizing {split}")
        stream = np.fromiter((t for ids in ds["ids"] for t in ids), dtype=np.int32)
        n = len(stream) // self.hparams.seq_len
        if n == 0:
            raise DataError(f"the {split} split has {len(stream)} tokens, fewer than one block of "
                            f"data.seq_len={self.hparams.seq_len}; add text or shorten seq_len")
        return stream[: n * self.hparams.seq_len].reshape(n, self.hparams.seq_len)

    def prepare_data(self) -> None:
        for split in SPLITS:
            path = self._blocks_path(split)
            with FileLock(str(path) + ".lock"):
                if not path.is_file():
                    blocks = self._tokenize(split)
                    tmp = path.with_name(path.stem + ".tmp.npy")
                    np.save(tmp, blocks)
                    tmp.replace(path)

    def setup(self, stage: Optional[str] = None) -> None:
        self.prepare_data()  # no-op when cached; makes setup safe on ranks that skipped prepare_data
        for split in SPLITS:
            blocks = np.load(self._blocks_path(split), mmap_mode="r")
            if split == "validation" and self.hparams.max_val_blocks:
                blocks = blocks[: self.hparams.max_val_blocks]
            if split == "train" and self.hparams.max_train_blocks:
                blocks = blocks[: self.hparams.max_train_blocks]
            self.datasets[split] = TokenBlocks(blocks)

    def validation_bytes_per_token(self) -> float:
        """UTF-8 bytes per token of the held-out text, to turn nats/token into bits/byte."""
        blocks = self.datasets["validation"].blocks
        text = self.tokenizer.decode(np.asarray(blocks).reshape(-1).tolist())
        return len(text.encode("utf-8")) / blocks.size

    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def train_dataloader(self) -> DataLoader:
        # Our sampler shards across ranks itself (qat fit sets use_distributed_sampler=False) and can start
        # mid-epoch, which Lightning's default sampler replacement cannot.
        rank, world = self._rank_and_world()
        sampler = ResumableShuffleSampler(len(self.datasets["train"]), self.hparams.seed, True, rank, world)
        accumulate = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
        samples_per_step = self.hparams.batch_size * world * accumulate
        usable = len(self.datasets["train"]) - len(self.datasets["train"]) % world
        batches_per_epoch = usable // world // self.hparams.batch_size   # per rank, drop_last
        # Lightning also steps the optimizer on an epoch's last batch when fewer than `accumulate` are left, unless
        # the strategy accumulates itself (DeepSpeed).
        if getattr(getattr(self.trainer, "strategy", None), "handles_gradient_accumulation", False):
            steps_per_epoch = batches_per_epoch // accumulate
        else:
            steps_per_epoch = -(-batches_per_epoch // accumulate)
        if self.resume_global_step and steps_per_epoch:
            epoch, step_in_epoch = divmod(self.resume_global_step, steps_per_epoch)
            sampler.resume_at(epoch, step_in_epoch * samples_per_step)
        return DataLoader(self.datasets["train"], batch_size=self.hparams.batch_size, sampler=sampler,
                          drop_last=True, num_workers=self.hparams.num_workers)

    def val_dataloader(self) -> DataLoader:
        rank, world = self._rank_and_world()
        sampler = ResumableShuffleSampler(len(self.datasets["validation"]), self.hparams.seed, False, rank, world)
        return DataLoader(self.datasets["validation"], batch_size=self.hparams.batch_size, sampler=sampler,
                          num_workers=self.hparams.num_workers)

    def state_dict(self) -> dict:
        # Training position: with one optimizer step per batch, the global step fixes the next sample.
        return {"global_step": self.trainer.global_step if self.trainer is not None else 0}

    def load_state_dict(self, state_dict: dict) -> None:
        self.resume_global_step = int(state_dict.get("global_step", 0))
