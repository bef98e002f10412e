"""The run store: one module that names every file of a run directory and writes it safely.

Layout (DESIGN §4)::

    RUN/spec.yaml            fully resolved spec
    RUN/lineage.json         parent run, fork step, branch spec, code version
    RUN/checkpoints/         step_00000100.pt ... + manifest.json (sha256 of each)
    RUN/metrics.parquet      tidy tables (see tables.py)
    RUN/examples.parquet
    RUN/events.parquet
    RUN/.lock                held by the process writing the run

Every write is atomic (temp file in the same directory, fsync, rename), so a kill at any moment
leaves either the old file or the new one. Checkpoints are verified by sha256 before loading and
loaded with ``weights_only=True``.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from . import tables
from .errors import CheckpointError, EosbranchError

SPEC = "spec.yaml"
LINEAGE = "lineage.json"
CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
LOCK = ".lock"


def atomic_write(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)  # make the rename itself durable
    finally:
        os.close(dfd)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class RunStore:
    """Reads and writes one run directory."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self._lock_fd: Optional[int] = None

    # -- locking ---------------------------------------------------------------------------
    def lock(self) -> None:
        """Take the run's write lock; a second writer fails fast instead of interleaving."""
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise EosbranchError(f"{self.path}: another process is writing this run (lock held)") from None
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- small files -----------------------------------------------------------------------
    def write_text(self, name: str, text: str) -> None:
        atomic_write(self.path / name, text.encode())

    def write_json(self, name: str, obj) -> None:
        self.write_text(name, json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def read_json(self, name: str):
        return json.loads((self.path / name).read_text())

    # -- checkpoints -----------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.path / CHECKPOINTS

    def manifest(self) -> dict:
        f = self.checkpoint_dir / MANIFEST
        if not f.exists():
            return {"checkpoints": [], "complete": None}
        try:
            return json.loads(f.read_text())
        except json.JSONDecodeError:
            raise CheckpointError(f"{f}: manifest is not valid JSON (edited or damaged)") from None

    def save_checkpoint(self, step: int, state: dict) -> None:
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        name = f"step_{step:08d}.pt"
        atomic_write(self.checkpoint_dir / name, data)
        manifest = self.manifest()
        entries = [e for e in manifest["checkpoints"] if e["step"] != step]
        entries.append({"step": step, "file": name, "sha256": sha256(data), "bytes": len(data)})
        manifest["checkpoints"] = sorted(entries, key=lambda e: e["step"])
        if manifest.get("complete") is not None and manifest["complete"] < step:
            manifest["complete"] = None
        atomic_write(self.checkpoint_dir / MANIFEST, json.dumps(manifest, indent=2).encode())

    def checkpoint_steps(self) -> list[int]:
        return [e["step"] for e in self.manifest()["checkpoints"]]

    def load_checkpoint(
        self, at_or_before: Optional[int] = None, warn: Callable[[str], None] = lambda m: None
    ) -> dict:
        """Newest valid checkpoint at or before a step; damaged ones are reported and skipped."""
        entries = [e for e in self.manifest()["checkpoints"] if at_or_before is None or e["step"] <= at_or_before]
        for e in reversed(entries):
            f = self.checkpoint_dir / e["file"]
            try:
                data = f.read_bytes()
            except FileNotFoundError:
                warn(f"{f}: checkpoint missing; falling back to an earlier one")
                continue
            if sha256(data) != e["sha256"]:
                warn(f"{f}: sha256 mismatch (corrupt checkpoint); falling back to an earlier one")
                continue
            try:
                return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
            except Exception as err:  # a checkpoint that hashes right but will not unpickle safely
                warn(f"{f}: cannot be loaded safely ({type(err).__name__}); falling back")
        where = "" if at_or_before is None else f" at or before step {at_or_before}"
        raise CheckpointError(f"{self.checkpoint_dir}: no valid checkpoint{where}")

    def mark_complete(self, steps: int) -> None:
        manifest = self.manifest()
        manifest["complete"] = steps
        atomic_write(self.checkpoint_dir / MANIFEST, json.dumps(manifest, indent=2).encode())

    def completed_steps(self) -> Optional[int]:
        return self.manifest().get("complete")

    # -- tables ----------------------------------------------------------------------------
    def write_table(self, name: str, df: pd.DataFrame) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(tables.to_arrow(name, df), sink)
        atomic_write(self.path / f"{name}.parquet", sink.getvalue().to_pybytes())

    def write_frame(self, name: str, df: pd.DataFrame) -> None:
        """An analysis table (e.g. opposing pairs) whose columns are its producer's contract."""
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), sink)
        atomic_write(self.path / f"{name}.parquet", sink.getvalue().to_pybytes())

    def read_table(self, name: str) -> pd.DataFrame:
        f = self.path / f"{name}.parquet"
        if not f.exists():
            return tables.empty(name)
        return pq.read_table(f).to_pandas()
