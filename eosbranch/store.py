"""The run store: one module that names every file of a run directory and writes it safely.

Layout (DESIGN §4)::

    RUN/spec.yaml                     fully resolved spec
    RUN/lineage.json                  parent run, fork step, branch spec, code version
    RUN/metrics.parquet               tidy tables (see tables.py), each one plain Parquet file:
    RUN/examples.parquet                pandas.read_parquet("RUN/metrics.parquet") reads it
    RUN/events.parquet
    RUN/checkpoints/manifest.json     index: each checkpoint's file, sha256, row segments; completion
    RUN/checkpoints/step_00000100.pt  full state at step 100 (torch.save, loaded weights_only=True)
    RUN/checkpoints/step_00000100.json              that checkpoint's manifest entry (a spare copy)
    RUN/checkpoints/step_00000100.metrics.parquet   table rows new since the previous checkpoint
    RUN/checkpoints/step_00000100.events.parquet    (and .examples.parquet)
    RUN/checkpoints/end.json, end_00000300.*.parquet  rows from the last checkpoint on, once complete
    RUN/.lock                         held by the process writing the run

**Writes** are atomic (temp file in the same directory, fsync, rename), so a kill at any moment
leaves either the old file or the new one. A failed write (no space left, quota, file too large)
removes its temp file, replaces nothing and raises a one-line :class:`StorageError` naming the file.
A checkpoint is committed by the manifest update, written last, so a checkpoint interrupted at any
point leaves the previous one current and valid.

**Checkpoints** are verified against the manifest's sha256 (and the step they hold) before loading,
and loaded with ``weights_only=True`` (a crafted pickle cannot run code). A damaged one is reported
in one line naming the file and skipped: loading falls back to the newest earlier valid one. Nothing
is ever deleted. A missing or unreadable manifest is reported and rebuilt from the per-checkpoint
``step_*.json`` copies of its entries (each checked the same way).

**Tables**: why the rows live twice. A Parquet file is readable only through its footer, at its
end, so a truncated table loses every row, and a byte flipped inside it can decode to wrong numbers.
Each table therefore carries Parquet page checksums and the sha256 of its rows (key-value metadata
``eosbranch.rows_sha256``), so damage is detected rather than read; and each checkpoint also stores
the rows *new since the previous checkpoint* as small Parquet *segments* next to it, sha256-listed
in the manifest (a complete run adds an ``end`` segment with the rows from its last checkpoint on).
Every segment records where it starts (``from``: the previous checkpoint's step, or ``null`` at the
run's start), so the rows before any checkpoint are the chain of segments back from it; a run that
fell back to an earlier checkpoint and re-saved later ones never counts a row twice. With that:

- ``Run.metrics`` (``read_table``) on a damaged or missing table warns, naming the file, and returns
  the rows the segments hold: all of them for a complete run, else those before the newest
  checkpoint with an intact chain (later rows, which a resume recomputes anyway, are dropped).
- a resume takes the rows before its checkpoint from the segment chain (the main table only if
  the chain is broken, e.g. a run written before segments existed), so its next checkpoint
  rewrites every table complete; ``train --resume`` on a complete run rewrites a damaged table from
  the segments (or, if they cannot give every row, re-runs the last step).

Cost: every table row is written once more, once (segments are never rewritten, unlike the main
tables, which are rewritten whole at each checkpoint), so table storage about doubles; Parquet
compresses ``examples`` rows (N per measurement) to tens of bytes each, small beside the
checkpoints. The chain is read only on resume and on damage. Rejected alternatives: tables as
directories of part files (breaks the one-file contract), Parquet row groups (the footer is still
the single point of failure), per-checkpoint full copies of the tables (quadratic storage).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import re
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from . import faults, tables
from .errors import CheckpointError, EosbranchError, EosbranchWarning, StorageError

SPEC = "spec.yaml"
LINEAGE = "lineage.json"
CHECKPOINTS = "checkpoints"
MANIFEST = "manifest.json"
END = "end.json"
LOCK = ".lock"
RECORD = "record.json"  # sha256 (and text) of spec.yaml and lineage.json, see RunStore._write_protected
PROTECTED = ("spec.yaml", "lineage.json")
RECORD_LOCK = ".record.lock"
_WRITING: set = set()  # run directories whose record this process is updating
TABLES = ("metrics", "events", "examples")
ROWS_KEY = b"eosbranch.rows_sha256"

_CKPT_FILE = re.compile(r"step_\d{8}\.pt")
_SEGMENT_FILE = re.compile(r"(step|end)_\d{8}(-[0-9a-f]{12})?\.(metrics|events|examples)\.parquet")
_SHA = re.compile(r"[0-9a-f]{64}")
_WRITE_CHUNK = 1 << 20
TEMP_SUFFIX = ".tmp"  # atomic_write's temp files: ".<name>.<random>.tmp" beside their target
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: files get the usual 0o666 & ~umask, not mkstemp's private 0o600

Warn = Callable[[str], None]


def _python_warning(msg: str) -> None:
    warnings.warn(msg, EosbranchWarning, stacklevel=4)


# --------------------------------------------------------------------------------- atomic writes

def _why(err: OSError) -> str:
    if err.errno == errno.ENOSPC:
        return "no space left on device"
    if err.errno == errno.EDQUOT:
        return "disk quota exceeded"
    if err.errno == errno.EFBIG:
        return "file too large for this file system or limit"
    return (err.strerror or type(err).__name__).lower()


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` all or nothing; a failure leaves the old file and no temp file."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
        try:
            os.fchmod(fd, 0o666 & ~_UMASK)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view[:_WRITE_CHUNK]):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        tmp = None
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)  # make the rename itself durable
        finally:
            os.close(dfd)
    except OSError as err:
        raise StorageError(f"{path}: cannot write: {_why(err)} (errno {err.errno}); the previous "
                           "version of the file is intact (free space, then resume)") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def check_output_dir(out: Path) -> None:
    """An output folder (e.g. RUN/report) must not be a symlink: a planted link would redirect
    writes outside the run. One line, before anything is written."""
    out = Path(out)
    if out.is_symlink():
        raise EosbranchError(f"{out}: is a symlink (to {os.readlink(out)}); refusing to write through it "
                             "(remove it, or give --out a real directory)")


def write_output(path: Path, data: bytes) -> None:
    """An analysis output (summary.md, a figure): refused if it or its folder is a symlink, then
    written atomically like every file of a run (a kill leaves the old file or the new one)."""
    path = Path(path)
    check_output_dir(path.parent)
    if path.is_symlink():
        raise EosbranchError(f"{path}: is a symlink (to {os.readlink(path)}); refusing to write through it")
    atomic_write(path, data)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def rows_digest(name: str, df: pd.DataFrame) -> str:
    """sha256 of a table's rows (values, not bytes on disk), as stored in its Parquet metadata."""
    h = hashlib.sha256()
    for c in tables.COLUMNS[name]:
        col = df[c]
        values = col.to_numpy() if pd.api.types.is_numeric_dtype(col) else col.to_numpy(dtype=object)
        h.update(c.encode() + b"\0" + pd.util.hash_array(values).tobytes())
    return h.hexdigest()


def encode_table(name: str, df: pd.DataFrame) -> bytes:
    t = tables.to_arrow(name, df)
    t = t.replace_schema_metadata({**(t.schema.metadata or {}), ROWS_KEY: rows_digest(name, df).encode()})
    sink = pa.BufferOutputStream()
    pq.write_table(t, sink, write_page_checksum=True)
    return sink.getvalue().to_pybytes()


class _Damaged(Exception):
    """A table or segment that cannot be trusted; ``str`` says why (one line)."""


def decode_table(name: str, source) -> pd.DataFrame:
    """Read a table written by :func:`encode_table`, checking page checksums, columns and rows."""
    try:
        t = pq.read_table(source, page_checksum_verification=True)
        df = t.to_pandas()
    except Exception as err:  # truncated, garbled: pyarrow raises many types; all mean "damaged"
        why = (str(err).splitlines() or [""])[0][:160]
        raise _Damaged(f"unreadable Parquet ({type(err).__name__}: {why})") from None
    if list(df.columns) != tables.COLUMNS[name]:
        raise _Damaged(f"unexpected columns {list(df.columns)}")
    want = (t.schema.metadata or {}).get(ROWS_KEY)
    if want is not None and want.decode(errors="replace") != rows_digest(name, df):
        raise _Damaged("its rows do not match their sha256 (garbled)")
    return df


# -------------------------------------------------------------------------------- the run store

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
        outside the directory holding it: a planted link must not redirect writes elsewhere."""
        for p, home in ((self.path, self.path.parent), (self.path / CHECKPOINTS, self.path)):
            if p.is_symlink():
                target = p.resolve()
                if target.parent != home.resolve():
                    raise EosbranchError(f"{p}: is a symlink to {target}, outside {home}; refusing to write "
                                         "through it (use the real directory)")

    # -- locking ---------------------------------------------------------------------------
    def lock(self) -> None:
        """Take the run's write lock; a second writer fails fast instead of interleaving. Taken
        before anything of the run is created, written or cleaned: a process that fails to get it
        has changed nothing (at most it created the empty directory and its ``.lock`` file, both
        of which the winner uses)."""
        if self._lock_fd is not None:
            self._lock_depth += 1
            return
        self.check_writable()
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as err:  # e.g. .lock planted as a symlink (ELOOP), a read-only directory
            raise StorageError(f"{self.path / LOCK}: cannot open the run's lock file: {_why(err)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise EosbranchError(f"{self.path}: another process is writing this run (lock held)") from None
        self._lock_fd = fd
        self._lock_depth = 1
        self._remove_orphaned_temp_files()

    @property
    def locked(self) -> bool:
        """Whether this store holds the run's write lock."""
        return self._lock_fd is not None

    def new_locked(self) -> tuple["RunStore", bool]:
        """Make the run directory if it is absent and take its lock: ``(self, created)``.
        ``created`` comes from ``mkdir`` itself (atomic: of two racing processes exactly one
        creates), not from a look beforehand; a process that then fails to get the lock raises
        having written nothing, so it never removes or cleans what the lock holder is writing."""
        self.check_writable()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(self.path)
            created = True
        except FileExistsError:
            created = False
        except OSError as err:
            raise StorageError(f"{self.path}: cannot create the run directory: {_why(err)}") from None
        faults.reached("lock", 0)  # tests: pause here, between the mkdir and the lock
        self.lock()
        return self, created

    def _remove_orphaned_temp_files(self) -> None:
        """Temp files of atomic writes that a kill interrupted (each can be checkpoint-sized).
        Only the lock holder writes these files, so once we hold the lock none is in use."""
        owned = [SPEC, LINEAGE, RECORD, *(f"{name}.parquet" for name in TABLES)]
        found = [f for name in owned for f in self.path.glob(f".{name}.*{TEMP_SUFFIX}")]
        found += list(self.checkpoint_dir.glob(f".*{TEMP_SUFFIX}"))
        for f in found:
            f.unlink(missing_ok=True)
        if found:
            self._report(f"{self.path}: removed {len(found)} temp file(s) left by an interrupted write "
                         f"({', '.join(sorted(f.name for f in found)[:3])}{', ...' if len(found) > 3 else ''})")

    def unlock(self) -> None:
        if self._lock_depth > 1:
            self._lock_depth -= 1
            return
        self._lock_depth = 0
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- small files -----------------------------------------------------------------------
    def write_text(self, name: str, text: str) -> None:
        self.check_writable()
        if name in PROTECTED:
            self._write_protected(name, text)
            return
        atomic_write(self.path / name, text.encode())

    # spec.yaml and lineage.json are under the same integrity net as checkpoints: RUN/record.json
    # holds each one's sha256 (and its text, so an edit is reported field by field). A write goes
    # record (old and new digests both accepted) -> file -> record (new only): a kill anywhere in
    # between leaves a file the record accepts. A file that matches no recorded digest was edited
    # or damaged outside eosbranch and is refused in one line, never silently used; a deliberate
    # change goes through a command that records it (`train --resume --steps N`) or a new run.
    def _record(self) -> Optional[dict]:
        f = self.path / RECORD
        try:
            rec = json.loads(f.read_bytes())
            for name in PROTECTED:
                if name in rec:
                    e = rec[name]
                    if not (isinstance(e["sha256"], list) and all(isinstance(d, str) and _SHA.fullmatch(d)
                                                                  for d in e["sha256"]) and isinstance(e["text"], str)):
                        raise ValueError(f"bad entry for {name}")
            return rec
        except FileNotFoundError:
            return None
        except (ValueError, TypeError, KeyError, UnicodeDecodeError) as err:
            raise EosbranchError(f"{f}: damaged or edited ({str(err).splitlines()[0][:100]}); it guards "
                                 f"{SPEC} and {LINEAGE}: restore it from a backup") from None

    @contextlib.contextmanager
    def _record_lock(self):
        """``.record.lock``: held exclusively by a writer through its three phases and shared by a
        reader of a protected file (:meth:`_read_protected`), so a reader never sees a record
        and a file from different phases."""
        f = self.path / RECORD_LOCK
        try:
            fd = os.open(f, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as err:
            raise StorageError(f"{f}: cannot open: {_why(err)}") from None
        key = os.path.abspath(self.path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            _WRITING.add(key)  # a reader in this same process (a callback) must not wait for us
            yield
        finally:
            _WRITING.discard(key)
            os.close(fd)

    def _read_protected(self, name: str) -> tuple[Optional[dict], Optional[bytes]]:
        def read():
            try:
                data = (self.path / name).read_bytes()
            except FileNotFoundError:
                data = None
            return self._record(), data

        f = self.path / RECORD_LOCK
        if os.path.abspath(self.path) in _WRITING:
            return read()
        try:
            fd = os.open(f, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:  # never written by this version (or a read-only copy): no writer to wait for
            got = read()
            if not f.exists():
                return got
            fd = os.open(f, os.O_RDONLY | os.O_NOFOLLOW)  # a writer started meanwhile: read again
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            return read()
        finally:
            os.close(fd)

    def _write_protected(self, name: str, text: str) -> None:
        with self._record_lock():
            rec = self._record() or {}
            digest = sha256(text.encode())
            old = [d for d in (rec.get(name) or {}).get("sha256", []) if d != digest][-1:]
            rec[name] = {"sha256": old + [digest], "text": text, "pending": True}
            atomic_write(self.path / RECORD, json.dumps(rec, indent=2, sort_keys=True).encode())
            atomic_write(self.path / name, text.encode())
            rec[name] = {"sha256": [digest], "text": text}
            atomic_write(self.path / RECORD, json.dumps(rec, indent=2, sort_keys=True).encode())

    def verified_bytes(self, name: str) -> bytes:
        """A protected file's bytes, checked against the run's record; any mismatch or absence
        raises one :class:`EosbranchError` line naming the file and what differs."""
        f = self.path / name
        rec, data = self._read_protected(name)  # never between a writer's three phases
        try:
            if data is None:
                raise FileNotFoundError(f)
        except FileNotFoundError:
            entry = (rec or {}).get(name) or {}
            if entry and not (entry.get("pending") and len(entry["sha256"]) == 1):  # else: not yet written
                raise EosbranchError(f"{f}: missing (deleted?); the run's {RECORD} has the version it was "
                                     "written with: restore the file, or start a new run") from None
            raise
        if rec is None:
            if (self.path / LINEAGE).exists() and (self.path / SPEC).exists() and name == SPEC:
                self._report(f"{self.path / RECORD}: missing (a run written before eosbranch recorded "
                             f"{SPEC} and {LINEAGE}, or the file was deleted): their integrity is not checked")
            return data
        entry = rec.get(name)
        if entry is None:
            raise EosbranchError(f"{f}: not in the run's {RECORD} (planted?); refusing to use it")
        if sha256(data) not in entry["sha256"]:
            raise EosbranchError(f"{f}: edited or damaged since eosbranch wrote it ({_differs(name, entry['text'], data)}); "
                                 f"refusing to use it. A run's record says what produced its checkpoints: restore "
                                 f"the file (its recorded text is in {RECORD}), or start a new run for a new spec")
        return data

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

    # -- the manifest ------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.path / CHECKPOINTS

    def manifest(self, warn: Optional[Warn] = None) -> dict:
        """The checkpoint index; a missing or damaged one is reported and rebuilt from the
        ``step_*.json`` copies of its entries (a run without any checkpoint has an empty one)."""
        f = self.checkpoint_dir / MANIFEST
        try:
            m = json.loads(f.read_bytes())
            _check_manifest(m)
            return m
        except FileNotFoundError:
            if not any(self.checkpoint_dir.glob("step_*.json")):
                if any(self.checkpoint_dir.glob("step_*.pt")):  # never restart over checkpoints silently
                    raise CheckpointError(f"{f}: missing, and the checkpoints in {self.checkpoint_dir} have no "
                                          "step_*.json entries to verify them by; restore the manifest") from None
                return {"checkpoints": [], "complete": None}
            why = "missing"
        except (ValueError, TypeError, KeyError) as err:
            why = f"not a valid manifest, edited or damaged ({str(err).splitlines()[0][:120]})"
        rebuilt = self._rebuild_manifest()
        if not rebuilt["checkpoints"]:
            raise CheckpointError(f"{f}: {why}, and no intact step_*.json entry to rebuild it from")
        self._report(f"{f}: {why}; rebuilt it from {len(rebuilt['checkpoints'])} per-checkpoint entries "
                     "(step_*.json)", warn)
        return rebuilt

    def _rebuild_manifest(self) -> dict:
        entries = []
        for f in sorted(self.checkpoint_dir.glob("step_*.json")):
            try:
                e = json.loads(f.read_bytes())
                _check_entry(e)
                if e["file"] != f.name.replace(".json", ".pt"):
                    raise ValueError("names another file")
            except (ValueError, TypeError, KeyError) as err:
                self._report(f"{f}: damaged checkpoint entry ({str(err).splitlines()[0][:80]}); skipped")
                continue
            entries.append(e)
        m = {"checkpoints": sorted(entries, key=lambda e: e["step"]), "complete": None}
        try:
            end = json.loads((self.checkpoint_dir / END).read_bytes())
            steps = [e["step"] for e in entries]
            if steps and end["complete"] == max(steps):  # stale once a later checkpoint exists
                _check_rows(end["tail"])
                m["complete"], m["tail"] = end["complete"], end["tail"]
        except (OSError, ValueError, TypeError, KeyError):
            pass
        return m

    def _write_manifest(self, m: dict) -> None:
        atomic_write(self.checkpoint_dir / MANIFEST, json.dumps(m, indent=2).encode())

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
                entry["rows"] = {"from": rows_from, "tables": self._write_segments(stem, rows)}
        if not (self.checkpoint_dir / MANIFEST).exists():  # a run's first checkpoint: an index exists
            self._write_manifest(manifest)  # before any entry, so a reader never sees one "missing"
        # The entry before the data: a reader (e.g. `eosbranch runs` while this run trains) never
        # sees a checkpoint file that nothing indexes; an entry whose file is not there yet is
        # only an unverifiable checkpoint, which loading skips.
        atomic_write(self.checkpoint_dir / f"{stem}.json", json.dumps(entry, indent=2).encode())
        atomic_write(self.checkpoint_dir / entry["file"], data)
        manifest["checkpoints"] = sorted([e for e in manifest["checkpoints"] if e["step"] != step] + [entry],
                                         key=lambda e: e["step"])
        if manifest.get("complete") is not None and manifest["complete"] < step:
            manifest["complete"] = None
            manifest.pop("tail", None)
        self._write_manifest(manifest)  # the commit point

    def _write_segments(self, stem: str, rows: dict) -> dict:
        out = {}
        for name in TABLES:
            if len(rows[name]) == 0:  # nothing new: no file
                out[name] = {"file": None, "sha256": None, "rows": 0}
                continue
            data = encode_table(name, rows[name])
            file = f"{stem}.{name}.parquet"
            atomic_write(self.checkpoint_dir / file, data)
            out[name] = {"file": file, "sha256": sha256(data), "rows": int(len(rows[name]))}
        return out

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

    def mark_complete(self, steps: int, rows: Optional[dict] = None, rows_from: Optional[int] = None) -> None:
        """The run reached ``steps``; ``rows``: the rows of steps ``>= rows_from`` (the end segment)."""
        manifest = self.manifest()
        manifest["complete"] = steps
        manifest.pop("tail", None)
        if rows is not None:
            manifest["tail"] = {"from": rows_from, "tables": self._write_segments(f"end_{steps:08d}", rows)}
            atomic_write(self.checkpoint_dir / END,
                         json.dumps({"complete": steps, "tail": manifest["tail"]}, indent=2).encode())
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
            atomic_write(path, data)
            tables_[name] = entry
        else:
            if tables_.get(name, {}).get("file") is None:
                return
            tables_[name] = {"file": None, "sha256": None, "rows": 0}
        m["tail"] = {"from": tail["from"], "tables": tables_}
        atomic_write(self.checkpoint_dir / END, json.dumps({"complete": m["complete"], "tail": m["tail"]},
                                                           indent=2).encode())
        self._write_manifest(m)

    def completed_steps(self) -> Optional[int]:
        return self.manifest().get("complete")

    # -- row segments --------------------------------------------------------------------------
    def _chain(self, manifest: dict, step: int) -> Optional[list[dict]]:
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

    def _read_segments(self, segments: list[dict]) -> dict:
        out = {}
        for name in TABLES:
            parts = []
            for seg in segments:
                info = seg["tables"][name]
                if info["file"] is None:
                    continue
                f = self.checkpoint_dir / info["file"]
                try:
                    data = f.read_bytes()
                except FileNotFoundError:
                    raise _Damaged(f"{f}: row segment missing") from None
                if sha256(data) != info["sha256"]:
                    raise _Damaged(f"{f}: row segment fails its sha256")
                try:
                    parts.append(decode_table(name, pa.BufferReader(data)))
                except _Damaged as err:
                    raise _Damaged(f"{f}: {err}") from None
            if not parts:  # as pandas reads an empty table back (string columns keep their dtype)
                parts = [decode_table(name, pa.BufferReader(encode_table(name, tables.empty(name))))]
            out[name] = pd.concat(parts, ignore_index=True)
        return out

    def rows_before(self, step: int, warn: Optional[Warn] = None) -> tuple[Optional[dict], bool]:
        """Every table's rows of steps before checkpoint ``step``: from the segment chain, else
        from the intact main tables; ``(None, False)`` if neither can give them."""
        chain = self._chain(self.manifest(warn), step)
        if chain is not None:
            try:
                return self._read_segments(chain), True
            except _Damaged as err:
                self._report(f"{err}; using the tables instead", warn)
        out = {}
        for name in TABLES:
            try:
                df = decode_table(name, self.path / f"{name}.parquet")
            except _Damaged:
                if step != min(self.checkpoint_steps(), default=step):
                    return None, False
                df = tables.empty(name)  # no row can precede a run's first checkpoint
            out[name] = df[df.step < step].reset_index(drop=True)
        return out, False

    def _recover(self, name: str) -> tuple[pd.DataFrame, Optional[int]]:
        """The most rows of a table the segments can give: ``(rows, None)`` if every row of a
        complete run, else ``(rows before checkpoint s, s)``."""
        m = self.manifest()
        tail = m.get("tail")
        if m.get("complete") is not None and tail is not None:
            chain = [] if tail["from"] is None else self._chain(m, tail["from"])
            if chain is not None:
                try:
                    return self._read_segments(chain + [tail])[name], None
                except _Damaged:
                    pass
        for e in reversed(m["checkpoints"]):
            chain = self._chain(m, e["step"])
            if chain is not None:
                try:
                    return self._read_segments(chain)[name], e["step"]
                except _Damaged:
                    continue
        return tables.empty(name), 0

    # -- tables ----------------------------------------------------------------------------
    def write_table(self, name: str, df: pd.DataFrame) -> None:
        self.check_writable()
        atomic_write(self.path / f"{name}.parquet", encode_table(name, df))

    def write_frame(self, name: str, df: pd.DataFrame) -> None:
        """An analysis table (e.g. opposing pairs) whose columns are its producer's contract."""
        self.check_writable()
        sink = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pandas(df, preserve_index=False), sink)
        atomic_write(self.path / f"{name}.parquet", sink.getvalue().to_pybytes())

    def table_damage(self, name: str) -> Optional[str]:
        """None if the table is intact (or not yet written), else why it cannot be trusted."""
        f = self.path / f"{name}.parquet"
        if not f.exists():
            return "missing" if self.manifest()["checkpoints"] else None
        try:
            decode_table(name, f)
        except _Damaged as err:
            return str(err)
        return None

    def read_table(self, name: str, warn: Optional[Warn] = None) -> pd.DataFrame:
        """A tidy table; a damaged or missing one is reported and rebuilt from the segments."""
        f = self.path / f"{name}.parquet"
        if f.exists():
            try:
                return decode_table(name, f)
            except _Damaged as err:
                why = str(err)
        elif not self.manifest()["checkpoints"]:
            return tables.empty(name)
        else:
            why = "missing"
        df, upto = self._recover(name)
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
            df, upto = self._recover(name)
            if upto is not None:
                return False
            fixed[name] = (df, why)
        for name, (df, why) in fixed.items():
            self.write_table(name, df)
            self._report(f"{self.path / (name + '.parquet')}: {why}; rewrote it complete ({len(df)} rows) "
                         f"from the row segments in {CHECKPOINTS}/", warn)
        return True


# ------------------------------------------------------------------------------- record diffs

def _flat(obj, prefix=""):
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): obj}


def _differs(name: str, recorded: str, data: bytes) -> str:
    """What differs between a protected file's recorded text and its bytes now, in a few words."""
    import yaml

    try:
        text = data.decode()
        now = json.loads(text) if name.endswith(".json") else yaml.safe_load(text)
        was = json.loads(recorded) if name.endswith(".json") else yaml.safe_load(recorded)
    except Exception:
        return f"sha256 mismatch; not readable as {'JSON' if name.endswith('.json') else 'YAML'}, {len(data)} bytes"
    a, b = _flat(was), _flat(now) if isinstance(now, dict) else {"": now}
    changed = [k for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]
    if not changed:
        return "sha256 mismatch; same values, different bytes"
    shown = [f"{k or '(whole file)'}: recorded {a.get(k, '<absent>')!r}, now {b.get(k, '<absent>')!r}"[:120]
             for k in changed[:3]]
    return "; ".join(shown) + (f"; and {len(changed) - 3} more" if len(changed) > 3 else "")


# ------------------------------------------------------------------------------- manifest shape

def _check_rows(rows) -> None:
    if rows["from"] is not None and not isinstance(rows["from"], int):
        raise ValueError("segment 'from' must be a step or null")
    for name in TABLES:
        info = rows["tables"][name]
        if info["file"] is None and info["sha256"] is None and info["rows"] == 0:
            continue
        if not (_SEGMENT_FILE.fullmatch(info["file"]) and _SHA.fullmatch(info["sha256"])):
            raise ValueError(f"bad segment record {info!r}")


def _check_entry(e) -> None:
    """An edited manifest must not point outside checkpoints/ or break the loader with a KeyError."""
    if not (isinstance(e["step"], int) and e["step"] >= 0 and isinstance(e["file"], str)
            and _CKPT_FILE.fullmatch(e["file"]) and isinstance(e["sha256"], str) and _SHA.fullmatch(e["sha256"])):
        raise ValueError(f"bad checkpoint entry {json.dumps(e)[:80]}")
    if "rows" in e:
        _check_rows(e["rows"])


def _check_manifest(m) -> None:
    if not isinstance(m, dict) or not isinstance(m["checkpoints"], list):
        raise ValueError("expected {'checkpoints': [...], 'complete': ...}")
    for e in m["checkpoints"]:
        _check_entry(e)
    if m.get("complete") is not None and not isinstance(m["complete"], int):
        raise ValueError("'complete' must be a step or null")
    if m.get("tail") is not None:
        _check_rows(m["tail"])
