"""The run's record (``RUN/record.json``): spec.yaml and lineage.json under the same integrity net
as checkpoints.

The record holds each protected file's sha256 (and its text, so an edit is reported field by
field). A write goes record (old and new digests both accepted) -> file -> record (new only): a
kill anywhere in between leaves a file the record accepts. A file that matches no recorded digest
was edited or damaged outside eosbranch and is refused in one line, never silently used; a
deliberate change goes through a command that records it (``train --resume --steps N``) or a new run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
from pathlib import Path
from typing import Callable, Optional

import yaml

from . import atomic_file
from .atomic_file import sha256, why
from .errors import EosbranchError, StorageError
from .run_files import LINEAGE, PROTECTED, RECORD, RECORD_LOCK, SPEC

_SHA = re.compile(r"[0-9a-f]{64}")
_WRITING: set = set()  # run directories whose record this process is updating


def read_record(run: Path) -> Optional[dict]:
    """The record, None if the run has none; a damaged one is one line."""
    f = run / RECORD
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
def record_lock(run: Path):
    """``.record.lock``: held exclusively by a writer through its three phases and shared by a
    reader of a protected file (:func:`read_protected`), so a reader never sees a record and a
    file from different phases."""
    f = run / RECORD_LOCK
    try:
        fd = os.open(f, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as err:
        raise StorageError(f"{f}: cannot open: {why(err)}") from None
    key = os.path.abspath(run)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _WRITING.add(key)  # a reader in this same process (a callback) must not wait for us
        yield
    finally:
        _WRITING.discard(key)
        os.close(fd)


def read_protected(run: Path, name: str) -> tuple[Optional[dict], Optional[bytes]]:
    """(record, the file's bytes or None), never between a writer's three phases."""
    def read():
        try:
            data = (run / name).read_bytes()
        except FileNotFoundError:
            data = None
        return read_record(run), data

    f = run / RECORD_LOCK
    if os.path.abspath(run) in _WRITING:
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


def write_protected(run: Path, name: str, text: str) -> None:
    with record_lock(run):
        rec = read_record(run) or {}
        digest = sha256(text.encode())
        old = [d for d in (rec.get(name) or {}).get("sha256", []) if d != digest][-1:]
        rec[name] = {"sha256": old + [digest], "text": text, "pending": True}
        atomic_file.atomic_write(run / RECORD, json.dumps(rec, indent=2, sort_keys=True).encode())
        atomic_file.atomic_write(run / name, text.encode())
        rec[name] = {"sha256": [digest], "text": text}
        atomic_file.atomic_write(run / RECORD, json.dumps(rec, indent=2, sort_keys=True).encode())


def verified_bytes(run: Path, name: str, report: Callable[[str], None]) -> bytes:
    """A protected file's bytes, checked against the run's record; any mismatch or absence raises
    one :class:`EosbranchError` line naming the file and what differs (``report``: a run without a
    record, which is read unchecked)."""
    f = run / name
    rec, data = read_protected(run, name)
    if data is None:
        entry = (rec or {}).get(name) or {}
        if entry and not (entry.get("pending") and len(entry["sha256"]) == 1):  # else: not yet written
            raise EosbranchError(f"{f}: missing (deleted?); the run's {RECORD} has the version it was "
                                 "written with: restore the file, or start a new run")
        raise FileNotFoundError(f)
    if rec is None:
        if (run / LINEAGE).exists() and (run / SPEC).exists() and name == SPEC:
            report(f"{run / RECORD}: missing (a run written before eosbranch recorded "
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


def _flat(obj, prefix=""):
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): obj}


def _differs(name: str, recorded: str, data: bytes) -> str:
    """What differs between a protected file's recorded text and its bytes now, in a few words."""
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
