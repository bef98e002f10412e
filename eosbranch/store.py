"""The run store: :class:`RunStore`, the one object through which the rest of eosbranch reads and
writes a run directory.

The store's concepts each have a module: the file names (run_files.py), atomic writes
(atomic_file.py), the write lock (run_lock.py), the record that guards spec.yaml and lineage.json
(run_record.py), the checkpoint index (checkpoint_manifest.py), the tables' encoding
(table_codec.py) and the row segments that back the tables up (row_segments.py). This module
holds what ties them together: saving, verifying and loading checkpoints, and reading, rewriting
and repairing tables.

**Writes** are atomic, so a kill at any moment leaves either the old file or the new one. A
checkpoint is committed by the manifest update, written last, so a checkpoint interrupted at any
point leaves the previous one current and valid.

**Checkpoints** are verified against the manifest's sha256 (and the step they hold) before loading,
and loaded with ``weights_only=True`` (a crafted pickle cannot run code). A damaged one is reported
in one line naming the file and skipped: loading falls back to the newest earlier valid one. Nothing
is ever deleted.

**Tables** carry page checksums and the sha256 of their rows, and each checkpoint keeps the rows
new since the previous one as segments. With that:

- ``Run.metrics`` (``read_table``) on a damaged or missing table warns, naming the file, and returns
  the rows the segments hold: all of them for a complete run, else those before the newest
  checkpoint with an intact chain (later rows, which a resume recomputes anyway, are dropped).
- a resume takes the rows before its checkpoint from the segment chain (the main table only if
  the chain is broken, e.g. a run written before segments existed), so its next checkpoint
  rewrites every table complete; ``train --resume`` on a complete run rewrites a damaged table from
  the segments (or, if they cannot give every row, re-runs the last step).
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Optional

import pandas as pd
import torch

from . import atomic_file, run_lock, run_record, tables
from .atomic_file import atomic_write, check_output_dir, sha256, write_output  # noqa: F401  (importable from here too)
from .checkpoint_manifest import Warn, read_manifest, write_end, write_manifest
from .errors import CheckpointError, EosbranchError, EosbranchWarning
from .row_segments import recover, rows_before, write_segments
from .run_files import (  # noqa: F401  (the names of a run's files, importable from here)
    CHECKPOINTS, END, LINEAGE, LOCK, MANIFEST, PROTECTED, RECORD, RECORD_LOCK, SPEC, TABLES,
)
from .table_codec import Damaged, decode_table, encode_table, frame_bytes


def _python_warning(msg: str) -> None:
    warnings.warn(msg, EosbranchWarning, stacklevel=4)


class RunStore:
    """Reads and writes one run directory. ``warn`` receives one-line reports of damage found
    (default: a Python warning of category :class:`EosbranchWarning`)."""

    def __init__(self, path: Path | str, warn: Optional[Warn] = None):
        self.path = Path(path)
        self.warn = warn
        self._lock_fd: Optional[int] = None
        self._lock_depth = 0  # lock() is re-entrant: a caller may hold it around a callee that takes it
        self._warned: set = set()

    def _report(self, msg: str, warn: Optional[Warn] = None) -> None:
        if msg in self._warned:  # one report per problem, however often it is looked at
            return
        self._warned.add(msg)
        (warn or self.warn or _python_warning)(msg)

    def check_writable(self) -> None:
        """Refuse to write through a run directory (or its checkpoints/) that is a symlink leading
        outside the directory holding it."""
        run_lock.check_writable(self.path)

    # -- locking (run_lock.py) ---------------------------------------------------------------
    def lock(self) -> None:
        """Take the run's write lock; a second writer fails fast instead of interleaving. Taken
        before anything of the run is created, written or cleaned; then the temp files of writes
        a kill interrupted are removed."""
        if self._lock_fd is not None:
            self._lock_depth += 1
            return
        self._lock_fd = run_lock.take_lock(self.path)
        self._lock_depth = 1
        found = run_lock.remove_orphaned_temp_files(self.path)
        if found:
            self._report(f"{self.path}: removed {len(found)} temp file(s) left by an interrupted write "
                         f"({', '.join(sorted(f.name for f in found)[:3])}{', ...' if len(found) > 3 else ''})")

    @property
    def locked(self) -> bool:
        """Whether this store holds the run's write lock."""
        return self._lock_fd is not None

    def new_locked(self) -> tuple["RunStore", bool]:
        """Make the run directory if it is absent and take its lock: ``(self, created)``.
        ``created`` comes from ``mkdir`` itself; a process that then fails to get the lock raises
        having written nothing, so it never removes or cleans what the lock holder is writing."""
        self.check_writable()
        created = run_lock.make_run_dir(self.path)
        self.lock()
        return self, created

    def unlock(self) -> None:
        if self._lock_depth > 1:
            self._lock_depth -= 1
            return
        self._lock_depth = 0
        if self._lock_fd is not None:
            run_lock.release_lock(self._lock_fd)
            self._lock_fd = None

    # -- small files (spec.yaml and lineage.json under run_record.py) ---------------------------
    def write_text(self, name: str, text: str) -> None:
        self.check_writable()
        if name in PROTECTED:
            run_record.write_protected(self.path, name, text)
            return
        atomic_file.atomic_write(self.path / name, text.encode())

    def verified_bytes(self, name: str) -> bytes:
        """A protected file's bytes, checked against the run's record; any mismatch or absence
        raises one :class:`EosbranchError` line naming the file and what differs."""
        return run_record.verified_bytes(self.path, name, self._report)

    def create(self, spec_yaml: str, lineage: dict) -> None:
        """Write a new run's lineage, then its spec: spec.yaml marks a run directory (`eosbranch
        runs` lists it), so everything a listing reads exists before it."""
        self.write_json(LINEAGE, lineage)
        self.write_text(SPEC, spec_yaml)

    def write_json(self, name: str, obj) -> None:
        self.write_text(name, json.dumps(obj, indent=2, sort_keys=True) + "\n")

    def read_json(self, name: str):
        data = self.verified_bytes(name) if name in PROTECTED else (self.path / name).read_bytes()
        try:
            return json.loads(data)
        except (ValueError, UnicodeDecodeError) as err:
            raise EosbranchError(f"{self.path / name}: not valid JSON ({str(err).splitlines()[0][:100]})") from None

    # -- the manifest (checkpoint_manifest.py) ---------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.path / CHECKPOINTS

    def manifest(self, warn: Optional[Warn] = None) -> dict:
        """The checkpoint index; a missing or damaged one is reported and rebuilt."""
        return read_manifest(self.checkpoint_dir, self._report, warn)

    def _write_manifest(self, m: dict) -> None:
        write_manifest(self.checkpoint_dir, m)

    # -- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(self, step: int, state: dict, rows: Optional[dict] = None,
                        rows_from: Optional[int] = None) -> None:
        """Save the full state at ``step``; ``rows``: the table rows of steps ``[rows_from, step)``
        (``rows_from=None``: from the run's start) as DataFrames, kept as this checkpoint's segments."""
        self.check_writable()
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
        stem = f"step_{step:08d}"
        entry = {"step": step, "file": f"{stem}.pt", "sha256": sha256(data), "bytes": len(data)}
        manifest = self.manifest()
        old = next((e for e in manifest["checkpoints"] if e["step"] == step), None)
        if rows is not None:
            if rows_from == step and old is not None and "rows" in old:
                entry["rows"] = old["rows"]  # the checkpoint a resume started from, saved again
            elif rows_from is None or rows_from < step:
                entry["rows"] = {"from": rows_from, "tables": write_segments(self.checkpoint_dir, stem, rows)}
        if not (self.checkpoint_dir / MANIFEST).exists():  # a run's first checkpoint: an index exists
            self._write_manifest(manifest)  # before any entry, so a reader never sees one "missing"
        # The entry before the data: a reader (e.g. `eosbranch runs` while this run trains) never
        # sees a checkpoint file that nothing indexes; an entry whose file is not there yet is
        # only an unverifiable checkpoint, which loading skips.
        atomic_file.atomic_write(self.checkpoint_dir / f"{stem}.json", json.dumps(entry, indent=2).encode())
        atomic_file.atomic_write(self.checkpoint_dir / entry["file"], data)
        manifest["checkpoints"] = sorted([e for e in manifest["checkpoints"] if e["step"] != step] + [entry],
                                         key=lambda e: e["step"])
        if manifest.get("complete") is not None and manifest["complete"] < step:
            manifest["complete"] = None
            manifest.pop("tail", None)
        self._write_manifest(manifest)  # the commit point

    def checkpoint_steps(self) -> list[int]:
        return [e["step"] for e in self.manifest()["checkpoints"]]

    def _valid_checkpoints(self, at_or_before: Optional[int], warn: Optional[Warn]):
        """(entry, state) of each verified checkpoint, newest first; damaged ones reported."""
        entries = [e for e in self.manifest(warn)["checkpoints"] if at_or_before is None or e["step"] <= at_or_before]
        for e in reversed(entries):
            f = self.checkpoint_dir / e["file"]
            try:
                data = f.read_bytes()
            except FileNotFoundError:
                self._report(f"{f}: checkpoint missing; falling back to an earlier one", warn)
                continue
            if sha256(data) != e["sha256"]:
                self._report(f"{f}: sha256 mismatch (corrupt checkpoint or edited manifest); "
                             "falling back to an earlier one", warn)
                continue
            try:
                state = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
            except Exception as err:  # a checkpoint that hashes right but will not unpickle safely
                self._report(f"{f}: cannot be loaded safely ({type(err).__name__}: it holds objects other "
                             "than tensors and plain containers); falling back", warn)
                continue
            if not isinstance(state, dict) or state.get("step") != e["step"]:
                got = state.get("step") if isinstance(state, dict) else type(state).__name__
                self._report(f"{f}: holds step {got}, the manifest says {e['step']}; falling back", warn)
                continue
            yield e, state

    def load_checkpoint(self, at_or_before: Optional[int] = None, warn: Optional[Warn] = None) -> dict:
        """Newest valid checkpoint at or before a step; damaged ones are reported and skipped."""
        for _, state in self._valid_checkpoints(at_or_before, warn):
            return state
        where = "" if at_or_before is None else f" at or before step {at_or_before}"
        raise CheckpointError(f"{self.checkpoint_dir}: no valid checkpoint{where}")

    def resume_point(self, warn: Optional[Warn] = None) -> tuple[dict, dict, bool]:
        """The newest valid checkpoint whose earlier table rows are intact: ``(state, rows,
        chained)``, ``rows`` the DataFrames of steps before it, ``chained`` whether they came from
        the segment chain (else from the main tables)."""
        newest = max(self.checkpoint_steps(), default=None)
        for e, state in self._valid_checkpoints(None, warn):
            rows, chained = self.rows_before(e["step"], warn)
            if rows is not None:
                if e["step"] != newest:
                    self._report(f"{self.checkpoint_dir}: resuming from step {e['step']}, the newest valid "
                                 f"checkpoint (the manifest's newest is step {newest})", warn)
                return state, rows, chained
            self._report(f"{self.checkpoint_dir / e['file']}: the table rows before step {e['step']} are "
                         "damaged (segments and tables); falling back to an earlier checkpoint", warn)
        raise CheckpointError(f"{self.checkpoint_dir}: no valid checkpoint with intact table rows")

    def rows_before(self, step: int, warn: Optional[Warn] = None) -> tuple[Optional[dict], bool]:
        """Every table's rows of steps before checkpoint ``step``: from the segment chain, else
        from the intact main tables; ``(None, False)`` if neither can give them."""
        return rows_before(self.path, self.checkpoint_dir, self.manifest(warn), step, self._report, warn)

    def mark_complete(self, steps: int, rows: Optional[dict] = None, rows_from: Optional[int] = None) -> None:
        """The run reached ``steps``; ``rows``: the rows of steps ``>= rows_from`` (the end segment)."""
        manifest = self.manifest()
        manifest["complete"] = steps
        manifest.pop("tail", None)
        if rows is not None:
            manifest["tail"] = {"from": rows_from,
                                "tables": write_segments(self.checkpoint_dir, f"end_{steps:08d}", rows)}
            write_end(self.checkpoint_dir, manifest)
        self._write_manifest(manifest)

    def rewrite_tail(self, name: str, df: pd.DataFrame) -> None:
        """A finished run's table ``name`` is now ``df``, with rows added after its end (certificates):
        its end segment is rewritten with them, so a table rebuilt from the segments (a deleted or
        damaged ``events.parquet``, a repair by ``train --resume``) keeps them. The new segment gets
        a file of its own (named by its sha256) before the manifest points to it: a kill between the
        two leaves the old, consistent tail."""
        m = self.manifest()
        tail = m.get("tail")
        if m.get("complete") is None or tail is None:
            return
        rows = df if tail["from"] is None else df[df.step >= tail["from"]]
        rows = rows.reset_index(drop=True)
        tables_ = dict(tail["tables"])
        if len(rows):
            data = encode_table(name, rows)
            digest = sha256(data)
            file = f"end_{m['complete']:08d}-{digest[:12]}.{name}.parquet"
            entry = {"file": file, "sha256": digest, "rows": int(len(rows))}
            path = self.checkpoint_dir / file
            if tables_.get(name) == entry and path.is_file() and sha256(path.read_bytes()) == digest:
                return  # the same rows again (a reused branch re-certified): nothing to rewrite
            atomic_file.atomic_write(path, data)
            tables_[name] = entry
        else:
            if tables_.get(name, {}).get("file") is None:
                return
            tables_[name] = {"file": None, "sha256": None, "rows": 0}
        m["tail"] = {"from": tail["from"], "tables": tables_}
        write_end(self.checkpoint_dir, m)
        self._write_manifest(m)

    def completed_steps(self) -> Optional[int]:
        return self.manifest().get("complete")

    # -- tables (table_codec.py; recovered from row_segments.py) --------------------------------
    def write_table(self, name: str, df: pd.DataFrame) -> None:
        self.check_writable()
        atomic_file.atomic_write(self.path / f"{name}.parquet", encode_table(name, df))

    def write_frame(self, name: str, df: pd.DataFrame) -> None:
        """An analysis table (e.g. opposing pairs) whose columns are its producer's contract."""
        self.check_writable()
        atomic_file.atomic_write(self.path / f"{name}.parquet", frame_bytes(df))

    def table_damage(self, name: str) -> Optional[str]:
        """None if the table is intact (or not yet written), else why it cannot be trusted."""
        f = self.path / f"{name}.parquet"
        if not f.exists():
            return "missing" if self.manifest()["checkpoints"] else None
        try:
            decode_table(name, f)
        except Damaged as err:
            return str(err)
        return None

    def read_table(self, name: str, warn: Optional[Warn] = None) -> pd.DataFrame:
        """A tidy table; a damaged or missing one is reported and rebuilt from the segments."""
        f = self.path / f"{name}.parquet"
        if f.exists():
            try:
                return decode_table(name, f)
            except Damaged as err:
                why = str(err)
        elif not self.manifest()["checkpoints"]:
            return tables.empty(name)
        else:
            why = "missing"
        df, upto = recover(self.checkpoint_dir, self.manifest(), name)
        fix = f"`eosbranch train --resume {self.path}` rewrites it"
        if upto is None:
            self._report(f"{f}: {why}; recovered all {len(df)} rows from the row segments in {CHECKPOINTS}/; {fix}", warn)
        else:
            self._report(f"{f}: {why}; loaded the {len(df)} rows of steps before {upto} from the row segments in "
                         f"{CHECKPOINTS}/ (later rows dropped); {fix}", warn)
        return df

    def repair_tables(self, warn: Optional[Warn] = None) -> bool:
        """Rewrite damaged tables of a complete run from its segments; False if they cannot give
        every row (then the caller re-runs from the last checkpoint)."""
        fixed = {}
        for name in TABLES:
            why = self.table_damage(name)
            if why is None:
                continue
            df, upto = recover(self.checkpoint_dir, self.manifest(), name)
            if upto is not None:
                return False
            fixed[name] = (df, why)
        for name, (df, why) in fixed.items():
            self.write_table(name, df)
            self._report(f"{self.path / (name + '.parquet')}: {why}; rewrote it complete ({len(df)} rows) "
                         f"from the row segments in {CHECKPOINTS}/", warn)
        return True
