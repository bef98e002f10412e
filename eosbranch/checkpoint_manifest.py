"""The checkpoint index (``RUN/checkpoints/manifest.json``): its shape, reading it, rebuilding it.

The manifest lists each checkpoint's file, sha256 and row segments, and whether the run is
complete (with its ``tail``, the end segment). It is written last when a checkpoint is saved, so
it is the commit point. An edited manifest must not point outside checkpoints/ or break the
loader: every entry is checked for shape. A missing or unreadable manifest is reported and rebuilt
from the per-checkpoint ``step_*.json`` copies of its entries (each checked the same way) and, for
a complete run, ``end.json``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable, Optional

from . import atomic_file
from .errors import CheckpointError
from .run_files import END, MANIFEST, TABLES

Warn = Callable[[str], None]
Report = Callable[[str, Optional[Warn]], None]  # RunStore._report: one report per problem

_CKPT_FILE = re.compile(r"step_\d{8}\.pt")
_SEGMENT_FILE = re.compile(r"(step|end)_\d{8}(-[0-9a-f]{12})?\.(metrics|events|examples)\.parquet")
_SHA = re.compile(r"[0-9a-f]{64}")


def check_rows(rows) -> None:
    """A segment record (``{"from": step|None, "tables": {name: {file, sha256, rows}}}``)."""
    if rows["from"] is not None and not isinstance(rows["from"], int):
        raise ValueError("segment 'from' must be a step or null")
    for name in TABLES:
        info = rows["tables"][name]
        if info["file"] is None and info["sha256"] is None and info["rows"] == 0:
            continue
        if not (_SEGMENT_FILE.fullmatch(info["file"]) and _SHA.fullmatch(info["sha256"])):
            raise ValueError(f"bad segment record {info!r}")


def check_entry(e) -> None:
    """An edited manifest must not point outside checkpoints/ or break the loader with a KeyError."""
    if not (isinstance(e["step"], int) and e["step"] >= 0 and isinstance(e["file"], str)
            and _CKPT_FILE.fullmatch(e["file"]) and isinstance(e["sha256"], str) and _SHA.fullmatch(e["sha256"])):
        raise ValueError(f"bad checkpoint entry {json.dumps(e)[:80]}")
    if "rows" in e:
        check_rows(e["rows"])


def check_manifest(m) -> None:
    if not isinstance(m, dict) or not isinstance(m["checkpoints"], list):
        raise ValueError("expected {'checkpoints': [...], 'complete': ...}")
    for e in m["checkpoints"]:
        check_entry(e)
    if m.get("complete") is not None and not isinstance(m["complete"], int):
        raise ValueError("'complete' must be a step or null")
    if m.get("tail") is not None:
        check_rows(m["tail"])


def read_manifest(checkpoint_dir: Path, report: Report, warn: Optional[Warn] = None) -> dict:
    """The checkpoint index; a missing or damaged one is reported and rebuilt from the
    ``step_*.json`` copies of its entries (a run without any checkpoint has an empty one)."""
    f = checkpoint_dir / MANIFEST
    try:
        m = json.loads(f.read_bytes())
        check_manifest(m)
        return m
    except FileNotFoundError:
        if not any(checkpoint_dir.glob("step_*.json")):
            if any(checkpoint_dir.glob("step_*.pt")):  # never restart over checkpoints silently
                raise CheckpointError(f"{f}: missing, and the checkpoints in {checkpoint_dir} have no "
                                      "step_*.json entries to verify them by; restore the manifest") from None
            return {"checkpoints": [], "complete": None}
        why = "missing"
    except (ValueError, TypeError, KeyError) as err:
        why = f"not a valid manifest, edited or damaged ({str(err).splitlines()[0][:120]})"
    rebuilt = rebuild_manifest(checkpoint_dir, report)
    if not rebuilt["checkpoints"]:
        raise CheckpointError(f"{f}: {why}, and no intact step_*.json entry to rebuild it from")
    report(f"{f}: {why}; rebuilt it from {len(rebuilt['checkpoints'])} per-checkpoint entries "
           "(step_*.json)", warn)
    return rebuilt


def rebuild_manifest(checkpoint_dir: Path, report: Report) -> dict:
    entries = []
    for f in sorted(checkpoint_dir.glob("step_*.json")):
        try:
            e = json.loads(f.read_bytes())
            check_entry(e)
            if e["file"] != f.name.replace(".json", ".pt"):
                raise ValueError("names another file")
        except (ValueError, TypeError, KeyError) as err:
            report(f"{f}: damaged checkpoint entry ({str(err).splitlines()[0][:80]}); skipped", None)
            continue
        entries.append(e)
    m = {"checkpoints": sorted(entries, key=lambda e: e["step"]), "complete": None}
    try:
        end = json.loads((checkpoint_dir / END).read_bytes())
        steps = [e["step"] for e in entries]
        if steps and end["complete"] == max(steps):  # stale once a later checkpoint exists
            check_rows(end["tail"])
            m["complete"], m["tail"] = end["complete"], end["tail"]
    except (OSError, ValueError, TypeError, KeyError):
        pass
    return m


def write_manifest(checkpoint_dir: Path, m: dict) -> None:
    atomic_file.atomic_write(checkpoint_dir / MANIFEST, json.dumps(m, indent=2).encode())


def write_end(checkpoint_dir: Path, m: dict) -> None:
    """``end.json``: a complete run's tail, kept apart so a rebuilt manifest finds it."""
    atomic_file.atomic_write(checkpoint_dir / END, json.dumps({"complete": m["complete"], "tail": m["tail"]},
                                                              indent=2).encode())
