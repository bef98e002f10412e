"""The run's write lock (``RUN/.lock``) and the checks made before anything of a run is written.

One process writes a run: a second writer fails fast instead of interleaving. The lock is taken
before anything of the run is created, written or cleaned, so a process that fails to get it has
changed nothing (at most it created the empty directory and its ``.lock`` file, both of which the
winner uses). :class:`~eosbranch.store.RunStore` holds the lock re-entrantly.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from . import faults
from .atomic_file import TEMP_SUFFIX, why
from .errors import EosbranchError, StorageError
from .run_files import CHECKPOINTS, LINEAGE, LOCK, RECORD, SPEC, TABLES


def check_writable(run: Path) -> None:
    """Refuse to write through a run directory (or its checkpoints/) that is a symlink leading
    outside the directory holding it: a planted link must not redirect writes elsewhere."""
    for p, home in ((run, run.parent), (run / CHECKPOINTS, run)):
        if p.is_symlink():
            target = p.resolve()
            if target.parent != home.resolve():
                raise EosbranchError(f"{p}: is a symlink to {target}, outside {home}; refusing to write "
                                     "through it (use the real directory)")


def make_run_dir(run: Path) -> bool:
    """Make the run directory if it is absent: whether this call created it. The answer comes from
    ``mkdir`` itself (atomic: of two racing processes exactly one creates), not a look beforehand."""
    try:
        run.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(run)
        created = True
    except FileExistsError:
        created = False
    except OSError as err:
        raise StorageError(f"{run}: cannot create the run directory: {why(err)}") from None
    faults.reached("lock", 0)  # tests: pause here, between the mkdir and the lock
    return created


def take_lock(run: Path) -> int:
    """Take the run's write lock without waiting: its file descriptor, or a one-line error."""
    check_writable(run)
    try:
        run.mkdir(parents=True, exist_ok=True)
        fd = os.open(run / LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    except OSError as err:  # e.g. .lock planted as a symlink (ELOOP), a read-only directory
        raise StorageError(f"{run / LOCK}: cannot open the run's lock file: {why(err)}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise EosbranchError(f"{run}: another process is writing this run (lock held)") from None
    return fd


def release_lock(fd: int) -> None:
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def remove_orphaned_temp_files(run: Path) -> list[Path]:
    """Remove the temp files of atomic writes that a kill interrupted (each can be checkpoint-sized);
    the ones removed. Only the lock holder writes these files, so once it holds the lock none is in use."""
    owned = [SPEC, LINEAGE, RECORD, *(f"{name}.parquet" for name in TABLES)]
    found = [f for name in owned for f in run.glob(f".{name}.*{TEMP_SUFFIX}")]
    found += list((run / CHECKPOINTS).glob(f".*{TEMP_SUFFIX}"))
    for f in found:
        f.unlink(missing_ok=True)
    return found
