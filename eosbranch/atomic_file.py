"""Atomic file writes, the checks on an analysis output's path, and the sha256 that files are
verified by.

A write goes to a temp file in the same directory, is fsynced, then renamed over its target, so a
kill at any moment leaves either the old file or the new one. A failed write (no space left, quota,
file too large) removes its temp file, replaces nothing and raises a one-line :class:`StorageError`
naming the file.

Every writer of a run calls :func:`atomic_write` through this module (``atomic_file.atomic_write``),
never a copy of the name, so one replacement reaches every write (the tests' fault injection).
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from pathlib import Path

from .errors import EosbranchError, StorageError

TEMP_SUFFIX = ".tmp"  # atomic_write's temp files: ".<name>.<random>.tmp" beside their target
_WRITE_CHUNK = 1 << 20
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: files get the usual 0o666 & ~umask, not mkstemp's private 0o600


def why(err: OSError) -> str:
    """An OSError in a few words for a one-line message."""
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
        raise StorageError(f"{path}: cannot write: {why(err)} (errno {err.errno}); the previous "
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
