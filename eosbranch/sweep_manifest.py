"""A sweep directory's manifest, ``OUT/sweep.json``: the parent runs of a sweep and their branches,
with each job's status, read by ``compare`` and ``report`` (a sweep directory stands for its runs)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Union

from .errors import EosbranchError
from .run import Run
from .store import atomic_write

MANIFEST = "sweep.json"


def write_manifest(out: Path, manifest: dict) -> None:
    atomic_write(out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


def read_manifest(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise EosbranchError(f"{path}: not valid JSON (edited or damaged); delete it and re-run the sweep") from None


def is_sweep(path: Union[str, Path]) -> bool:
    return (Path(path) / MANIFEST).is_file()


def load_sweep(path: Union[str, Path]) -> dict:
    """A sweep manifest with its run and branch directories as absolute paths."""
    path = Path(path)
    manifest = read_manifest(path / MANIFEST)
    if manifest is None:
        raise EosbranchError(f"{path}: not a sweep directory (no {MANIFEST})")
    for r in manifest["runs"]:
        r["run"] = None if r.get("run") is None else str(path / r["run"])
        r["branches"] = [str(path / b) for b in r.get("branches", [])]
    return manifest


def sweep_runs(path: Union[str, Path], warn: Callable[[str], None] = lambda m: None) -> list[Run]:
    """The parent runs of a sweep's finished jobs (a failed or unfinished one is named and skipped)."""
    runs = []
    for r in load_sweep(path)["runs"]:
        if r["status"] in ("done", "reused"):
            runs.append(Run(r["run"]))
        else:
            why = f"{r['stage']} failed: {r['error']}" if r["status"] == "failed" else r["status"]
            warn(f"seed {r['seed']} skipped ({why}); re-run the sweep to finish it")
    if not runs:
        raise EosbranchError(f"{path}: no finished runs in {MANIFEST}; re-run the sweep")
    return runs
