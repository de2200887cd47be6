"""Mid-epoch resume: a run restarted at global step k (``TextDataModule.load_state_dict`` + ``train_dataloader``)
sees exactly the batches an uninterrupted run would have seen from step k on, on 1 and on 2 ranks, across epoch
boundaries; the ranks' shards are disjoint and together cover the epoch."""

import json
from types import SimpleNamespace

import pytest
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.pytorch.strategies import DeepSpeedStrategy

from qat.data.datamodule import TextDataModule
from qat.data.sampler import ResumableShuffleSampler

NUM_BLOCKS, BATCH, EPOCHS = 23, 2, 3   # 23 is odd: 2 ranks drop one sample per epoch, each rank one per batch


@pytest.fixture(scope="module")
def datamodule(tmp_path_factory):
    """A real TextDataModule over a small JSONL file (own BPE, 4-token blocks), capped at NUM_BLOCKS blocks."""
    root = tmp_path_factory.mktemp("data")
    words = "the quick brown fox jumps over a lazy dog while seven small birds sing in the old oak tree".split()
    lines = [json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(12))}) for i in range(40)]
    (root / "train.jsonl").write_text("\n".join(lines))
    (root / "val.jsonl").write_text("\n".join(lines[:5]))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("QAT_CACHE_DIR", str(root / "cache"))
        dm = TextDataModule(train_files=[str(root / "train.jsonl")], val_files=[str(root / "val.jsonl")],
                            tokenizer_vocab_size=300, seq_len=4, batch_size=BATCH, max_train_blocks=NUM_BLOCKS)
        dm.setup("fit")
    assert len(dm.datasets["train"]) == NUM_BLOCKS
    return dm


def _epochs(dm: TextDataModule, rank: int, world: int, resume_step: int = 0, accumulate: int = 1,
            steps_per_epoch: int = 0, deepspeed: bool = False) -> tuple[list[list[int]], int]:
    """The block indices of every batch one rank sees until the end of epoch EPOCHS - 1, iterated the way
    Lightning's fit loop does (``set_epoch`` at every epoch start); and the loader's length before the first one."""
    # The datamodule reads only the rank, world size, accumulation and strategy kind from its trainer.
    dm.trainer = SimpleNamespace(global_rank=rank, world_size=world, accumulate_grad_batches=accumulate,
                                 strategy=SimpleNamespace(handles_gradient_accumulation=deepspeed))
    dm.load_state_dict({"global_step": resume_step})
    loader = dm.train_dataloader()
    first_epoch = resume_step // steps_per_epoch if steps_per_epoch else 0
    first_len = len(loader)
    batches = []
    for epoch in range(first_epoch, EPOCHS):
        _set_sampler_epoch(loader, epoch)
        batches += [batch["block_index"].tolist() for batch in loader]
    dm.trainer = None
    return batches, first_len


@pytest.mark.parametrize("world,accumulate,deepspeed,resume_steps", [
    (1, 1, False, (7, 11, 13)), (1, 2, False, (2, 6, 8)), (1, 2, True, (2, 5, 7)), (2, 1, False, (3, 5, 7))])
def test_resumed_run_continues_the_uninterrupted_order(datamodule, world, accumulate, deepspeed, resume_steps):
    batches_per_epoch = (NUM_BLOCKS - NUM_BLOCKS % world) // world // BATCH   # per rank (drop_last)
    # Lightning steps the optimizer every `accumulate` batches of an epoch and on its last batch, except under
    # a strategy that accumulates itself (DeepSpeed), where the tail batch only accumulates.
    assert DeepSpeedStrategy.handles_gradient_accumulation.fget(None) is True
    if deepspeed:
        steps_per_epoch = batches_per_epoch // accumulate
    else:
        steps_per_epoch = -(-batches_per_epoch // accumulate)
    full = {rank: _epochs(datamodule, rank, world)[0] for rank in range(world)}
    assert all(len(b) == EPOCHS * batches_per_epoch for b in full.values())
    for step in resume_steps:
        epoch, step_in_epoch = divmod(step, steps_per_epoch)
        next_batch = epoch * batches_per_epoch + step_in_epoch * accumulate
        for rank in range(world):
            resumed, first_len = _epochs(datamodule, rank, world, step, accumulate, steps_per_epoch, deepspeed)
            assert resumed == full[rank][next_batch:], (step, rank)
            # Lightning ends the resumed epoch after len(loader) batches: the rest of the interrupted epoch.
            assert first_len == batches_per_epoch - step_in_epoch * accumulate, (step, rank)


def test_two_ranks_are_disjoint_and_cover_each_epoch(datamodule):
    full = {rank: _epochs(datamodule, rank, 2)[0] for rank in range(2)}
    per_epoch = (NUM_BLOCKS - 1) // 2 // BATCH   # 5 batches per rank per epoch
    epochs = []
    for epoch in range(EPOCHS):
        shards = [sum(full[rank][epoch * per_epoch:(epoch + 1) * per_epoch], []) for rank in range(2)]
        assert not set(shards[0]) & set(shards[1]), epoch
        assert len(set(shards[0] + shards[1])) == 2 * per_epoch * BATCH
        epochs.append(shards[0] + shards[1])
    # Shuffled, and differently each epoch.
    assert epochs[0] != epochs[1] and sorted(epochs[0]) != epochs[0]

    # At sampler level (before the loader's drop_last), the two shards are exactly the epoch's usable samples.
    for epoch in range(EPOCHS):
        shards = []
        for rank in range(2):
            sampler = ResumableShuffleSampler(NUM_BLOCKS, seed=7, rank=rank, world_size=2)
            sampler.set_epoch(epoch)
            shards.append(list(sampler))
        assert len(shards[0]) == len(shards[1]) == (NUM_BLOCKS - 1) // 2
        assert not set(shards[0]) & set(shards[1])
        assert len(set(shards[0]) | set(shards[1])) == NUM_BLOCKS - 1
        assert set(shards[0]) | set(shards[1]) <= set(range(NUM_BLOCKS))


def test_sampler_resume_at_matches_the_uninterrupted_global_order():
    """Two ranks resumed ``start`` samples into an epoch yield, interleaved, the uninterrupted global order from
    ``start`` on, and the next epoch in full."""
    n, world, seed = 17, 2, 3

    def interleaved(samplers):
        shards = [list(s) for s in samplers]
        return [i for pair in zip(*shards, strict=True) for i in pair]

    uninterrupted = []
    for epoch in (1, 2):
        samplers = [ResumableShuffleSampler(n, seed, rank=r, world_size=world) for r in range(world)]
        for s in samplers:
            s.set_epoch(epoch)
        uninterrupted.append(interleaved(samplers))
    assert sorted(uninterrupted[0]) != uninterrupted[0] and uninterrupted[0] != uninterrupted[1]
    for start in (0, 6, 10, 16):
        samplers = [ResumableShuffleSampler(n, seed, rank=r, world_size=world) for r in range(world)]
        for s in samplers:
            s.resume_at(1, start)
        assert [len(s) for s in samplers] == [(16 - start) // 2] * 2
        assert interleaved(samplers) == uninterrupted[0][start:], start
        for s in samplers:
            s.set_epoch(2)
        assert interleaved(samplers) == uninterrupted[1], start   # the skip applies to one epoch only
