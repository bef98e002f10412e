"""The rows a run records (``metrics``, ``events``, ``examples``) until they are written: whole
tables at each flush, and per checkpoint the segment of rows since the previous checkpoint (the
store keeps them beside it, so a damaged table is rebuilt from the segments; see store.py)."""

from __future__ import annotations

from typing import Optional

from . import tables
from .store import RunStore

# Where each table's rows keep their step (metrics and examples rows start with it).
STEP_AT = {"metrics": 0, "events": 1, "examples": 0}


class Recorder:
    """Pending rows of one run, as plain tuples in the tables' column order (after run/branch/seed)."""

    def __init__(self, store: RunStore, seed: int, branch: str = "trunk"):
        self.store, self.seed, self.branch = store, seed, branch
        self.run_name = store.path.name
        self.metrics: list[tuple] = []
        self.events: list[tuple] = []
        self.examples: list[tuple] = []

    def rows(self, name: str) -> list[tuple]:
        return getattr(self, name)

    def clear(self) -> None:
        self.metrics, self.events, self.examples = [], [], []

    def keep_before(self, rows: dict, step: int) -> None:
        """Take the rows of steps < ``step`` from a resume point's tables (later ones are recomputed:
        dropping them avoids duplicates after a kill)."""
        for name in STEP_AT:
            df = rows[name]
            cols = tables.COLUMNS[name][3:]
            setattr(self, name, list(df.loc[df.step < step, cols].itertuples(index=False, name=None)))

    def events_at(self, step: int) -> list[list]:
        return [list(r) for r in self.events if r[1] == step]

    def segment(self, lo: Optional[int], hi: Optional[int]) -> dict:
        """The rows of steps in [lo, hi) as DataFrames (None: unbounded), for the store's segments."""
        return {name: tables.frame(name, self._between(name, lo, hi), self.run_name, self.branch, self.seed)
                for name in STEP_AT}

    def flush(self, before: Optional[int] = None) -> None:
        """Write every table whole (only rows of steps < ``before``, if given)."""
        for name in STEP_AT:
            rows = self._between(name, None, before)
            self.store.write_table(name, tables.frame(name, rows, self.run_name, self.branch, self.seed))

    def _between(self, name: str, lo: Optional[int], hi: Optional[int]) -> list[tuple]:
        at, rows = STEP_AT[name], self.rows(name)
        if lo is None and hi is None:
            return rows
        return [r for r in rows if (lo is None or r[at] >= lo) and (hi is None or r[at] < hi)]
