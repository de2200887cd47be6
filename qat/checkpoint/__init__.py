"""Checkpoints and run folders: one home for reading and writing training checkpoints (Lightning ``.ckpt`` files
and DeepSpeed folders, atomically written, loaded without pickled code) and for the run-folder layout."""

from qat.checkpoint.layout import RunLayout, runs_root

__all__ = ["RunLayout", "runs_root"]
