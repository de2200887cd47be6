"""W&B logger that is offline unless the user has given a key, and keeps one run id per run directory (so a
resumed or requeued run appends to the same W&B run)."""

import os
import uuid
from pathlib import Path
from typing import Literal, Optional

from lightning.pytorch.loggers import WandbLogger

RUN_ID_FILE = "wandb_run_id"
# The W&B group of a run when the logger is not given one: `qat sweep` sets it so every point of a sweep (local
# subprocess or SLURM array task) lands in one group.
GROUP_ENV = "QAT_WANDB_GROUP"


def wandb_mode(mode: str) -> str:
    if mode != "auto":
        return mode
    return "online" if os.environ.get("WANDB_API_KEY") else "offline"


def persistent_run_id(save_dir: Path, resume: bool) -> str:
    """The run id stored in ``save_dir`` when resuming, else a fresh one (``store_run_id`` keeps it for later)."""
    path = save_dir / RUN_ID_FILE
    if resume and path.is_file():
        return path.read_text().strip()
    return uuid.uuid4().hex[:12]


def store_run_id(save_dir: Path, run_id: str) -> None:
    """Keep ``run_id`` in ``save_dir`` so a resumed or requeued run appends to the same W&B run."""
    # Every rank builds the logger but only global rank 0 logs: only its id may be stored, or a requeued run
    # resumes under another rank's id (rank from srun/torchrun; Lightning has not set it up yet).
    if int(os.environ.get("SLURM_PROCID", os.environ.get("RANK", "0"))) == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        (save_dir / RUN_ID_FILE).write_text(run_id)


class QATWandbLogger(WandbLogger):
    """``WandbLogger`` with ``mode: auto`` (online iff ``WANDB_API_KEY`` is set, else offline).

    Nothing is written (run folder, W&B run, stored id) until the first use of ``experiment``, i.e. once training
    starts: a recipe rejected while the trainer is built leaves no trace. The key is read by wandb from the
    environment only; qat never writes it anywhere. ``group`` (default: ``$QAT_WANDB_GROUP``) puts the run in a
    W&B group, e.g. the points of one ``qat sweep``.
    """

    def __init__(self, project: str = "qat", name: Optional[str] = None, save_dir: str = "runs",
                 mode: Literal["auto", "offline", "online"] = "auto", resume_run: bool = False,
                 group: Optional[str] = None, **kwargs):
        save = Path(save_dir)
        resuming = resume_run or bool(os.environ.get("SLURM_RESTART_COUNT"))
        run_id = kwargs.pop("id", None) or persistent_run_id(save, resuming)
        if resuming:
            # A wandb-core service inherited from a parent process (WANDB_SERVICE, e.g. the shell or test runner
            # that launched us) may still hold a stream for this id from the killed/previous process, and refuses
            # it as "in use": a resumed run gets a service of its own.
            os.environ.pop("WANDB_SERVICE", None)
        os.environ.setdefault("WANDB_DIR", str(save))
        group = group or os.environ.get(GROUP_ENV) or None
        if group:
            kwargs["group"] = group
        self._qat_run_dir, self._qat_run_id, self._qat_run_id_stored = save, run_id, False
        super().__init__(project=project, name=name, save_dir=str(save), offline=wandb_mode(mode) == "offline",
                         id=run_id, resume="allow", log_model=False, **kwargs)

    @property
    def experiment(self):
        if not self._qat_run_id_stored:
            store_run_id(self._qat_run_dir, self._qat_run_id)
            self._qat_run_id_stored = True
        return WandbLogger.experiment.fget(self)


# --- reading offline runs back (plots, tests) ---------------------------------------------------------------------
# A `.wandb` file is a 7-byte header (":W&B", magic, version) then LevelDB-log records (32 KiB blocks; each chunk:
# crc32 u32, length u16, type u8 FULL/FIRST/MIDDLE/LAST) holding `wandb_internal_pb2.Record` protobufs. wandb
# >= 0.30 no longer ships a Python reader, hence these few lines.
_HEADER, _BLOCK, _CHUNK_HEADER = 7, 32768, 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _wandb_records(path: Path):
    import struct

    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    pos, pending = _HEADER, b""
    while pos + _CHUNK_HEADER <= len(data):
        block_left = _BLOCK - pos % _BLOCK
        if block_left < _CHUNK_HEADER:  # block trailer padding
            pos += block_left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + _CHUNK_HEADER])
        chunk = data[pos + _CHUNK_HEADER:pos + _CHUNK_HEADER + length]
        pos += _CHUNK_HEADER + length
        if kind == _FULL:
            yield chunk
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            yield pending + chunk
            pending = b""
        elif kind == 0 and length == 0:
            pos += _BLOCK - pos % _BLOCK if pos % _BLOCK else 0


def read_wandb_history(run_file: str | Path) -> list[dict]:
    """The logged history rows of an offline ``run-<id>.wandb`` file, as dicts."""
    import json

    from wandb.proto import wandb_internal_pb2 as pb

    rows = []
    for raw in _wandb_records(Path(run_file)):
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows


def offline_run_files(save_dir: str | Path) -> list[Path]:
    return sorted(Path(save_dir).glob("wandb/offline-run-*/run-*.wandb"))


def read_wandb_run(run_file: str | Path) -> dict:
    """``{"run_id", "project", "entity"}`` of an offline ``run-<id>.wandb`` file (its first run record)."""
    from wandb.proto import wandb_internal_pb2 as pb

    for raw in _wandb_records(Path(run_file)):
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "run":
            return {"run_id": record.run.run_id, "project": record.run.project, "entity": record.run.entity}
    return {}


def read_wandb_artifacts(run_file: str | Path) -> list[dict]:
    """The artifacts logged in an offline ``run-<id>.wandb`` file: name, type, aliases, metadata and
    ``files`` ``{path: digest}`` (from the record's manifest, or the manifest file it points to)."""
    import json

    from wandb.proto import wandb_internal_pb2 as pb

    artifacts = []
    for raw in _wandb_records(Path(run_file)):
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") != "artifact":
            continue
        a = record.artifact
        files = {e.path: e.digest for e in a.manifest.contents}
        if not files and a.manifest.manifest_file_path and Path(a.manifest.manifest_file_path).is_file():
            entries = json.loads(Path(a.manifest.manifest_file_path).read_text()).get("contents", {})
            files = {path: entry.get("digest") for path, entry in entries.items()}
        artifacts.append({"name": a.name, "type": a.type, "run_id": a.run_id, "project": a.project,
                          "aliases": list(a.aliases), "metadata": json.loads(a.metadata) if a.metadata else {},
                          "files": files})
    return artifacts
