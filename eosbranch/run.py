"""A run directory as a Python object: ``eosbranch.load(path) -> Run``."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path
from typing import Optional, Union

import pandas as pd

from .errors import EosbranchError
from .spec import load_spec
from .store import LINEAGE, RECORD, SPEC, RunStore


class Run:
    """Read-only view of a run directory; tables are loaded lazily as pandas DataFrames."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        if not (self.path / SPEC).is_file():
            if (self.path / RECORD).is_file():  # a run whose spec.yaml was deleted: say so
                RunStore(self.path).verified_bytes(SPEC)  # (returns if it was just being written)
            else:
                raise EosbranchError(f"{self.path}: not a run directory (no {SPEC})")
        self.store = RunStore(self.path)
        # Both files the run's record guards are checked up front: a damaged or edited one stops
        # whatever reads this run (load, compare, report, fork...) with one line naming it.
        self.store.verified_bytes(SPEC)
        try:
            self.store.verified_bytes(LINEAGE)
        except FileNotFoundError:  # a run written before the record existed, without lineage.json
            pass

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    @cached_property
    def spec(self):
        return load_spec(self.path / SPEC)

    @cached_property
    def lineage(self) -> dict:
        return self.store.read_json(LINEAGE)

    @property
    def metrics(self) -> pd.DataFrame:
        return self.store.read_table("metrics")

    @property
    def events(self) -> pd.DataFrame:
        return self.store.read_table("events")

    @property
    def examples(self) -> pd.DataFrame:
        return self.store.read_table("examples")

    @property
    def checkpoints(self) -> list[int]:
        return self.store.checkpoint_steps()

    @property
    def complete(self) -> bool:
        return self.store.completed_steps() == self.spec.steps

    def checkpoint(self, step: Optional[int] = None) -> dict:
        """The newest valid checkpoint at or before ``step`` (verified by sha256)."""
        return self.store.load_checkpoint(step)

    def metric(self, name: str, group: str = "all") -> pd.Series:
        """One metric as a Series indexed by step."""
        m = self.metrics
        m = m[(m.metric == name) & (m.group == group)]
        return m.set_index("step")["value"]


def load(path: Union[str, Path]) -> Run:
    return Run(path)
