"""Row segments: each checkpoint keeps the table rows new since the previous one, so the rows
before any checkpoint survive a damaged or missing table.

Each checkpoint stores the rows *new since the previous checkpoint* as small Parquet segments next
to it, sha256-listed in the manifest (a complete run adds an ``end`` segment with the rows from its
last checkpoint on). Every segment records where it starts (``from``: the previous checkpoint's
step, or ``null`` at the run's start), so the rows before any checkpoint are the chain of segments
back from it; a run that fell back to an earlier checkpoint and re-saved later ones never counts a
row twice.

Cost: every table row is written once more, once (segments are never rewritten, unlike the main
tables, which are rewritten whole at each checkpoint), so table storage about doubles; Parquet
compresses ``examples`` rows (N per measurement) to tens of bytes each, small beside the
checkpoints. The chain is read only on resume and on damage. Rejected alternatives: tables as
directories of part files (breaks the one-file contract), Parquet row groups (the footer is still
the single point of failure), per-checkpoint full copies of the tables (quadratic storage).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import pandas as pd
import pyarrow as pa

from . import atomic_file, tables
from .atomic_file import sha256
from .checkpoint_manifest import Report, Warn
from .run_files import TABLES
from .table_codec import Damaged, decode_table, empty_table, encode_table


def write_segments(checkpoint_dir: Path, stem: str, rows: dict) -> dict:
    """Write each table's ``rows`` as ``<stem>.<table>.parquet``: the segment record of the tables."""
    out = {}
    for name in TABLES:
        if len(rows[name]) == 0:  # nothing new: no file
            out[name] = {"file": None, "sha256": None, "rows": 0}
            continue
        data = encode_table(name, rows[name])
        file = f"{stem}.{name}.parquet"
        atomic_file.atomic_write(checkpoint_dir / file, data)
        out[name] = {"file": file, "sha256": sha256(data), "rows": int(len(rows[name]))}
    return out


def chain(manifest: dict, step: int) -> Optional[list[dict]]:
    """The segments holding every row before checkpoint ``step``, oldest first (None: broken)."""
    by_step = {e["step"]: e for e in manifest["checkpoints"]}
    out, s = [], step
    while s is not None:
        e = by_step.get(s)
        if e is None or "rows" not in e or len(out) > len(by_step):
            return None
        out.append(e["rows"])
        if e["rows"]["from"] is not None and e["rows"]["from"] >= s:
            return None
        s = e["rows"]["from"]
    return out[::-1]


def read_segments(checkpoint_dir: Path, segments: list[dict]) -> dict:
    """Every table's rows of ``segments``, concatenated; :class:`Damaged` names a bad one."""
    out = {}
    for name in TABLES:
        parts = []
        for seg in segments:
            info = seg["tables"][name]
            if info["file"] is None:
                continue
            f = checkpoint_dir / info["file"]
            try:
                data = f.read_bytes()
            except FileNotFoundError:
                raise Damaged(f"{f}: row segment missing") from None
            if sha256(data) != info["sha256"]:
                raise Damaged(f"{f}: row segment fails its sha256")
            try:
                parts.append(decode_table(name, pa.BufferReader(data)))
            except Damaged as err:
                raise Damaged(f"{f}: {err}") from None
        out[name] = pd.concat(parts or [empty_table(name)], ignore_index=True)
    return out


def rows_before(run: Path, checkpoint_dir: Path, manifest: dict, step: int, report: Report,
                warn: Optional[Warn] = None) -> tuple[Optional[dict], bool]:
    """Every table's rows of steps before checkpoint ``step``: from the segment chain, else from
    the intact main tables; ``(None, False)`` if neither can give them."""
    segments = chain(manifest, step)
    if segments is not None:
        try:
            return read_segments(checkpoint_dir, segments), True
        except Damaged as err:
            report(f"{err}; using the tables instead", warn)
    first = min((e["step"] for e in manifest["checkpoints"]), default=step)
    out = {}
    for name in TABLES:
        try:
            df = decode_table(name, run / f"{name}.parquet")
        except Damaged:
            if step != first:
                return None, False
            df = tables.empty(name)  # no row can precede a run's first checkpoint
        out[name] = df[df.step < step].reset_index(drop=True)
    return out, False


def recover(checkpoint_dir: Path, manifest: dict, name: str) -> tuple[pd.DataFrame, Optional[int]]:
    """The most rows of a table the segments can give: ``(rows, None)`` if every row of a
    complete run, else ``(rows before checkpoint s, s)``."""
    tail = manifest.get("tail")
    if manifest.get("complete") is not None and tail is not None:
        segments = [] if tail["from"] is None else chain(manifest, tail["from"])
        if segments is not None:
            try:
                return read_segments(checkpoint_dir, segments + [tail])[name], None
            except Damaged:
                pass
    for e in reversed(manifest["checkpoints"]):
        segments = chain(manifest, e["step"])
        if segments is not None:
            try:
                return read_segments(checkpoint_dir, segments)[name], e["step"]
            except Damaged:
                continue
    return tables.empty(name), 0
