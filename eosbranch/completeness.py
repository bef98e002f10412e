"""Which runs an analysis may use: `compare`, `report` and `summarize` refuse a branch or reference
that is not complete (an interrupted run would be compared over a shortened window, silently), and
a branch directory whose lineage cannot be read is reported, never skipped.

``allow_incomplete()`` (the CLI's ``--incomplete``) lets an analysis go on: incomplete runs are
then reported in one line each and their rows marked ``incomplete = True`` (invalid), never
silently summarised."""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from typing import Iterable

from .errors import EosbranchError, EosbranchWarning

_ALLOW = contextvars.ContextVar("eosbranch_allow_incomplete", default=False)


@contextlib.contextmanager
def allow_incomplete(allow: bool = True):
    token = _ALLOW.set(bool(allow))
    try:
        yield
    finally:
        _ALLOW.reset(token)


def allowed() -> bool:
    return _ALLOW.get()


def incomplete_runs(parent, branches: Iterable) -> set:
    """Branch names (and ``"<reference>"`` for the parent) of runs that did not finish; refused
    in one line unless :func:`allow_incomplete` is in force (then each is reported as a warning)."""
    bad = {}
    for b in branches:
        if not b.complete:
            bad[b.lineage.get("branch")] = b
    if not parent.complete:
        bad["<reference>"] = parent
    if bad and not allowed():
        first = next(iter(bad.values()))
        done = max(first.checkpoints, default=0)
        raise EosbranchError(
            f"{first.path}: not complete (stopped at step {done} of {first.spec.steps}"
            f"{'' if len(bad) == 1 else f'; and {len(bad) - 1} more incomplete run(s)'}); "
            f"finish it (`eosbranch train --resume {first.path}`, or re-run the same fork), or pass "
            "--incomplete to mark its rows invalid")
    for name, r in bad.items():
        warnings.warn(f"{r.path}: not complete; its comparison rows are marked incomplete (invalid)",
                      EosbranchWarning, stacklevel=3)
    return set(bad)


def check_summary_rows(df) -> None:
    """`summarize` refuses per-seed rows marked incomplete unless allowed."""
    if "incomplete" in df.columns and df["incomplete"].fillna(False).astype(bool).any() and not allowed():
        raise EosbranchError("summarize: some rows come from incomplete runs (column incomplete); finish them "
                             "or pass --incomplete to summarise them marked invalid")
