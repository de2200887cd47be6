import torch

from qat.checkpoint.io import AtomicCheckpointIO


def test_remove_checkpoint_removes_files_and_deepspeed_directories(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint({"w": torch.ones(2)}, tmp_path / "step-000001.ckpt")
    zero = tmp_path / "step-000002.ckpt" / "checkpoint"  # a DeepSpeed checkpoint is a directory of shards
    zero.mkdir(parents=True)
    (zero / "mp_rank_00_model_states.pt").write_bytes(b"shard")
    io.remove_checkpoint(tmp_path / "step-000001.ckpt")
    io.remove_checkpoint(tmp_path / "step-000002.ckpt")
    io.remove_checkpoint(tmp_path / "missing.ckpt")  # nothing there: no error
    assert list(tmp_path.iterdir()) == []
