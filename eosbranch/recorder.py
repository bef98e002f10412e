"""The rows a run records (``metrics``, ``events``, ``examples``) until they are written: whole
tables at each flush, and per checkpoint the segment of rows since the previous checkpoint (the
store keeps them beside it, so a damaged table is rebuilt from the segments; see store.py).

Per-step values computed on the accelerator are *held* (:meth:`Recorder.hold`): their rows wait
with a placeholder value while the values stay on the device, and :meth:`Recorder.settle` moves
them all to the host at once (at measurement and checkpoint steps, at the end), so a plain
training step never waits for the device. Only the host conversion is deferred, never the
computation: each value is the same tensor, rounded the same way, so the rows are bit for bit
those of an immediate ``.item()`` (float32 -> float64 is exact)."""

from __future__ import annotations

from typing import Optional

import torch

from . import tables
from .store import RunStore

HELD = object()  # the value of a metrics row whose value is still on the device

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
        self._clear_held()

    def _clear_held(self) -> None:
        # (values, present) blocks in the order of their rows; rows from _tail on may hold HELD.
        self._held: list[tuple[torch.Tensor, Optional[torch.Tensor]]] = []
        self._tail: Optional[int] = None

    def hold(self, step: int, t_eff: float, lr: float, keys: list[tuple[str, str]], values: torch.Tensor,
             present: Optional[torch.Tensor] = None) -> None:
        """Metrics rows (group, metric) = ``keys`` whose values are the 1-d (or 0-d, one key) device
        tensor ``values``; where ``present`` (a bool tensor like ``values``) is False the row is
        dropped when settled (a group with no member in a minibatch)."""
        if self._tail is None:
            self._tail = len(self.metrics)
        self._held.append((values.detach().reshape(-1), None if present is None else present.reshape(-1)))
        self.metrics.extend((step, t_eff, lr, group, metric, HELD) for group, metric in keys)

    def settle(self) -> None:
        """Move every held value to the host in one transfer per dtype and fill in their rows."""
        if self._tail is None:
            return
        values = _to_host([v for v, _ in self._held])
        masks = [p for _, p in self._held if p is not None]
        keep = iter(_to_host(masks)) if masks else None
        flags = []
        for v, p in self._held:
            flags += [True] * v.numel() if p is None else [next(keep) for _ in range(v.numel())]
        it = iter(zip(values, flags))
        tail = []
        for r in self.metrics[self._tail:]:
            if r[5] is HELD:
                v, k = next(it)
                if k:
                    tail.append(r[:5] + (v,))
            else:
                tail.append(r)
        self.metrics[self._tail:] = tail
        self._clear_held()

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` metrics rows (a divergence: the rows after the first bad loss); held
        values are cut at a block boundary, as rows are only ever cut at a step's loss row."""
        if self._tail is not None and n >= self._tail:
            left = sum(r[5] is HELD for r in self.metrics[self._tail:n])
            kept = []
            for v, p in self._held:
                if left <= 0:
                    break
                assert v.numel() <= left, "truncated inside a held block"
                kept.append((v, p))
                left -= v.numel()
            self._held = kept
            if not kept:
                self._tail = None
        elif self._tail is not None:
            self._clear_held()
        del self.metrics[n:]

    def rows(self, name: str) -> list[tuple]:
        return getattr(self, name)

    def clear(self) -> None:
        self.metrics, self.events, self.examples = [], [], []
        self._clear_held()

    def keep_before(self, rows: dict, step: int) -> None:
        """Take the rows of steps < ``step`` from a resume point's tables (later ones are recomputed:
        dropping them avoids duplicates after a kill)."""
        self._clear_held()
        for name in STEP_AT:
            df = rows[name]
            cols = tables.COLUMNS[name][3:]
            setattr(self, name, list(df.loc[df.step < step, cols].itertuples(index=False, name=None)))

    def events_at(self, step: int) -> list[list]:
        return [list(r) for r in self.events if r[1] == step]

    def segment(self, lo: Optional[int], hi: Optional[int]) -> dict:
        """The rows of steps in [lo, hi) as DataFrames (None: unbounded), for the store's segments."""
        self.settle()
        return {name: tables.frame(name, self._between(name, lo, hi), self.run_name, self.branch, self.seed)
                for name in STEP_AT}

    def flush(self, before: Optional[int] = None) -> None:
        """Write every table whole (only rows of steps < ``before``, if given)."""
        self.settle()
        for name in STEP_AT:
            rows = self._between(name, None, before)
            self.store.write_table(name, tables.frame(name, rows, self.run_name, self.branch, self.seed))

    def _between(self, name: str, lo: Optional[int], hi: Optional[int]) -> list[tuple]:
        at, rows = STEP_AT[name], self.rows(name)
        if lo is None and hi is None:
            return rows
        return [r for r in rows if (lo is None or r[at] >= lo) and (hi is None or r[at] < hi)]


def _to_host(tensors: list[torch.Tensor]) -> list:
    """The elements of ``tensors`` in order as Python numbers: one concatenation and one
    transfer per dtype (float32 values widen to float64 exactly; bools stay bools)."""
    by_dtype: dict = {}
    for i, t in enumerate(tensors):
        by_dtype.setdefault(t.dtype, []).append(i)
    out: list = [None] * len(tensors)
    for idx in by_dtype.values():
        flat = torch.cat([tensors[i] for i in idx]).tolist()
        pos = 0
        for i in idx:
            n = tensors[i].numel()
            out[i] = flat[pos:pos + n]
            pos += n
    return [x for part in out for x in part]
