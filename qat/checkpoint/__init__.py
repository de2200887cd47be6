"""Checkpoints and run folders: one home for reading and writing training checkpoints (Lightning ``.ckpt`` files
and DeepSpeed folders, atomically written with a checksum of their weights, loaded without pickled code), for
choosing the checkpoint a run resumes from, and for the run-folder layout.

``io`` (atomic writes, checksums, loading), ``deepspeed`` (ZeRO folders), ``callback`` (``RunCheckpoint``, the one
writer of a run's checkpoints), ``resume`` (``--resume auto``), ``trained`` (model for export/eval), ``layout``
(``RunLayout``), ``integrity`` (digests, non-finite checks).
"""

from qat.checkpoint.layout import RunLayout, runs_root

__all__ = ["RunLayout", "runs_root"]
