"""Exception types, one per domain. Messages say what is wrong, where, and how to fix it."""


class QATError(Exception):
    """Base class of every error qat raises on purpose."""


class RecipeError(QATError, ValueError):
    """A recipe (YAML or command-line override) names something invalid."""


class DataError(QATError, ValueError):
    """Training or evaluation data is missing or unusable."""


class CheckpointError(QATError, ValueError):
    """A checkpoint is missing, corrupt, or not what the command needs."""


class ExportError(QATError, ValueError):
    """A model cannot be written in the requested format."""


class ClusterError(QATError, RuntimeError):
    """A cluster job cannot be submitted or inspected (no SLURM, unknown partition, too many nodes, ...)."""


class TeacherError(QATError, ValueError):
    """A distillation teacher (or its cached logits) cannot be used: not found, other tokenizer, stale cache."""


class TrainingError(QATError, RuntimeError):
    """Training cannot usefully continue (e.g. the loss became NaN/Inf)."""
