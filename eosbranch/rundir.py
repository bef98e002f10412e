"""Run directories: where a spec's run lives (named by its digest, so re-running finds it), and
making or re-opening one (the spec it holds must be the same)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional, Union

import torch

from .version import __version__
from .errors import EosbranchError
from .spec import Spec, load_spec
from .store import LINEAGE, SPEC, RunStore
from .threads import check_threads, positive_threads


def run_dir_for(spec: Spec, out: Union[str, Path]) -> Path:
    return Path(out) / f"{spec.name}-s{spec.seed}-{spec.digest()}"


def open_run(spec: Spec, path: Path, lineage: Optional[dict] = None, threads: Optional[int] = None,
             store: Optional[RunStore] = None) -> RunStore:
    """Create a run directory, or check that an existing one holds the same spec (and, if
    ``threads`` is given, the same torch thread count)."""
    store = store or RunStore(path)
    store.check_writable()  # a planted symlink must not redirect the run outside --out
    if (path / SPEC).exists():
        old = load_spec(path / SPEC)
        if old.digest() != spec.digest():
            raise EosbranchError(f"{path}: exists with a different spec; choose another --out or name")
        check_threads(path, read_lineage(store).get("threads"), threads)
    else:
        store.path.mkdir(parents=True, exist_ok=True)
        store.create(spec.to_yaml(), lineage or {
            "parent": None, "fork_step": None, "branch": "trunk", "branch_spec": None,
            "branch_hash": None, "code_version": __version__,
            "threads": positive_threads(threads) if threads is not None else torch.get_num_threads(),
        })
    return store


def read_lineage(store: RunStore) -> dict:
    """The run's ``lineage.json`` ({} for a run written before it existed)."""
    try:
        return store.read_json(LINEAGE)
    except FileNotFoundError:
        return {}


def remove_unstarted(path: Path) -> None:
    """A run this call created that failed before its first step (a spec whose data, groups or
    model cannot be built; no space for the first checkpoint) leaves no directory behind."""
    try:
        steps = RunStore(path).checkpoint_steps()
    except EosbranchError:
        return
    if max(steps, default=0) == 0:
        shutil.rmtree(path, ignore_errors=True)
