"""Which checkpoint ``qat fit --resume auto`` continues from: the one with the highest global step that loads.

The step is read from each checkpoint (not the file time: a copied or touched file would win), every candidate is
verified (``weights_only`` load, checksum) and the choice is printed with the reason each other one was passed over.
When checkpoints exist but none loads, resuming refuses instead of silently restarting from step 0.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from qat.checkpoint.deepspeed import deepspeed_checkpoint_step
from qat.checkpoint.io import load_checkpoint_file
from qat.checkpoint.layout import LAST_CHECKPOINT, RunLayout
from qat.errors import CheckpointError


@dataclass
class ResumeChoice:
    """The checkpoint to resume from (None: none exists) and why the others were not taken."""

    path: Optional[Path]
    global_step: int = 0
    skipped: list[tuple[Path, str]] = field(default_factory=list)

    def describe(self) -> str:
        lines = [f"resuming from {self.path} (global step {self.global_step}, the highest that loads)"
                 if self.path else "no checkpoint to resume from; starting at step 0"]
        lines += [f"  skipped {path.name}: {reason}" for path, reason in self.skipped]
        return "\n".join(lines)


def checkpoint_global_step(path: Path) -> int:
    """The global step of a ``.ckpt`` file or DeepSpeed folder that loads (``CheckpointError`` if it does not)."""
    if path.is_dir():
        return deepspeed_checkpoint_step(path)
    step = load_checkpoint_file(path).get("global_step")
    if not isinstance(step, int):
        raise CheckpointError(f"{path} records no global_step; it was not written by `qat fit`")
    return step


def find_resume_checkpoint(checkpoints_dir: Path) -> ResumeChoice:
    """The checkpoint in ``checkpoints_dir`` with the highest global step that loads (ties: ``last.ckpt``).

    Raises:
        CheckpointError: checkpoints exist but none of them loads.
    """
    candidates = sorted(checkpoints_dir.glob("*.ckpt")) if checkpoints_dir.is_dir() else []
    good: list[tuple[int, bool, Path]] = []
    failed: list[tuple[Path, str]] = []
    for path in candidates:
        try:
            good.append((checkpoint_global_step(path), path.name == LAST_CHECKPOINT, path))
        except CheckpointError as exc:
            failed.append((path, str(exc)))
    if not good:
        if failed:
            reasons = "; ".join(f"{p.name}: {r}" for p, r in failed)
            raise CheckpointError(f"--resume auto: none of the {len(failed)} checkpoints in {checkpoints_dir} loads "
                                  f"({reasons}). Refusing to restart from step 0: move them away or pass "
                                  "--resume none to start over")
        return ResumeChoice(None)
    good.sort(reverse=True)
    step, _, best = good[0]
    passed_over = [(p, f"global step {s} < {step}" if s < step else f"same step {s}, last.ckpt preferred")
                   for s, _, p in good[1:]]
    return ResumeChoice(best, step, failed + passed_over)


def resolve_resume(resume: str, layout: RunLayout) -> Optional[str]:
    """The ``ckpt_path`` for ``--resume auto|none|<path>``; prints what ``auto`` chose and why.

    Raises:
        CheckpointError: the given path does not exist, or ``auto`` finds checkpoints but none loads.
    """
    if resume == "none":
        return None
    if resume == "auto":
        choice = find_resume_checkpoint(layout.checkpoints_dir)
        print(choice.describe(), flush=True)
        return str(choice.path) if choice.path else None
    if not Path(resume).exists():
        raise CheckpointError(f"--resume {resume}: no such checkpoint; use auto, none, or a path to a .ckpt")
    print(f"resuming from {resume}", flush=True)
    return resume
