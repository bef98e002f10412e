"""The torch thread count a run keeps: float reductions (sums over thousands of points) can round
differently with another count, and a resumed run or a fork must reproduce its parent bit for
bit. It is recorded in ``lineage.json`` (``threads``) when a run starts."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import torch

from .errors import EosbranchError
from .store import LINEAGE


def positive_threads(threads) -> int:
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise EosbranchError(f"threads: expected a positive number of torch threads, got {threads!r}")
    return threads


def check_threads(path: Path, recorded: Optional[int], threads: Optional[int]) -> None:
    """A run continues with the thread count it was started with (lineage.json ``threads``):
    float reductions can round differently with another count, which would break bit-exact resume."""
    if threads is not None and recorded is not None and positive_threads(threads) != int(recorded):
        raise EosbranchError(f"{path / LINEAGE}: threads: the run was started with {recorded} torch thread(s) "
                             f"and continues with them; --threads {threads} differs (omit it)")


@contextlib.contextmanager
def pinned_threads(n: Optional[int]):
    """Run with the CPU thread count a run was started with (see the module docstring)."""
    old = torch.get_num_threads()
    if n and n != old:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)
