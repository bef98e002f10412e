"""Group losses at every step (DESIGN §2, "Every-step group losses and the central Δ").

At the EoS the loss oscillates with period two, so a group's loss read only at measurement steps
reads one phase of the oscillation and can give the branch effect the wrong sign. The trainer
therefore records, at every step of a full-batch run, each group's ``loss`` (and ``accuracy`` for
classification) in ``metrics`` (``group`` = the group's name), from the per-example losses and
outputs the step has already computed: one [K, n] x [n, 2] product per step, no extra forward
pass (benchmarks/train_overhead.py measures the cost). A held-out group (``mode: heldout``) is not
in the step's batch; its points alone are passed forward once more (no gradient), so every group
has every-step rows.

Minibatch optimizers: each step records ``batch_loss`` per group over the group's members in that
step's batch (no row when none is in it), and the full-data group ``loss`` / ``accuracy`` come at
the measurement schedule, or every ``measure.group_loss_every`` steps if set.

Why rows of ``metrics`` and not a table of their own: the full-data ``loss`` of ``group = "all"``
already has a row at every step there, so every loss curve is read the same way
(``run.metric("loss", group)``), and Parquet's dictionary and run-length encodings store the
repeated run/branch/seed/lr/group/metric columns in almost nothing: about 8 bytes a row, the
value itself (measured: 100,000 steps with four groups, 1,000,000 rows of metrics, 7.8 MB).

Rows come in blocks ``(keys, values, present)``: ``keys`` the (group, metric) of each row,
``values`` a list of floats (the CPU's NumPy path) or a device tensor that the trainer holds until
its next measurement or checkpoint (eosbranch.recorder), ``present`` None or a bool tensor (False:
no such row). The device path reads nothing back to the host, so a step on an accelerator never
waits for it; ``numpy=False`` forces it on the CPU (the sync-count test runs it there).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Union

import torch

from .curvature import _running_stats_frozen

if TYPE_CHECKING:
    from .experiment import Experiment

__all__ = ["StepLosses", "Block"]

Keys = list[tuple[str, str]]
Block = tuple[Keys, Union[list, torch.Tensor], Optional[torch.Tensor]]


class StepLosses:
    """Per-step group rows for one experiment: built once, applied to each step's losses."""

    def __init__(self, exp: "Experiment", numpy: Optional[bool] = None):
        self.exp = exp
        self.names: list[str] = []
        self.heldout: dict[str, torch.Tensor] = {}  # group -> rows of data.X not trained on
        self.classification = exp.data.task == "classification"
        n = exp.train_X.shape[0]
        self._W_np = self._y_np = None
        if not exp.groups:
            self.W = None
            return
        dev, dtype = exp.device, exp.dtype
        # Position of each row of data.X in the training set (-1: held out).
        pos = torch.full((exp.data.X.shape[0],), -1, dtype=torch.long, device=dev)
        pos[exp.rows(None)] = torch.arange(n, device=dev)
        trained, rows = [], []
        for name, idx in exp.groups.items():
            p = pos[idx]
            if bool((p >= 0).all()):
                trained.append(name)
                rows.append(torch.zeros(n, dtype=dtype, device=dev).index_add_(
                    0, p, torch.ones(p.numel(), dtype=dtype, device=dev)))
            else:
                self.heldout[name] = idx
        self.names = trained
        # Indicator rows [K, n]; divided by the group sizes they give the group means.
        self.M = torch.stack(rows) if rows else None
        self.W = None if self.M is None else self.M / self.M.sum(1, keepdim=True)
        on_cpu = self.W is not None and dev.type == "cpu" and numpy is not False
        self._W_np = self.W.numpy() if on_cpu else None
        self._y_np = exp.train_y.numpy() if on_cpu else None

    @property
    def active(self) -> bool:
        return bool(self.exp.groups)

    def _stack(self, per: torch.Tensor, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[n, 2] per-example loss and correctness (or [n, 1] for regression)."""
        per = per.detach().reshape(-1, 1).to(self.exp.dtype)
        if not self.classification:
            return per
        return torch.cat([per, _correct(out, y, per.dtype).reshape(-1, 1)], 1)

    def full(self, per: torch.Tensor, out: torch.Tensor) -> list[Block]:
        """Blocks of (group, metric) rows from the whole training set's per-example losses."""
        blocks: list[Block] = []
        losses, accuracy = [(name, "loss") for name in self.names], [(name, "accuracy") for name in self.names]
        if self.W is not None and self._W_np is not None:
            # On the CPU, NumPy on the same memory (no copy): a NumPy call costs a few microseconds
            # where a torch op costs ten or more, and this runs at every step. Computed the same
            # way at every step (never batched across steps), so a branch's rows equal its
            # parent's bit for bit.
            W, p, o = self._W_np, per.detach().numpy(), out.detach().numpy()
            blocks.append((losses, (W @ (p if p.dtype == W.dtype else p.astype(W.dtype)).reshape(-1)).tolist(), None))
            if self.classification:
                pred = o.argmax(-1) if o.shape[-1] > 1 else (o[..., 0] > 0)
                correct = (pred == self._y_np).astype(W.dtype)
                blocks.append((accuracy, (W @ correct).tolist(), None))
        elif self.W is not None:
            W = self.W
            blocks.append((losses, W @ (per if per.dtype == W.dtype else per.to(W.dtype)).reshape(-1), None))
            if self.classification:
                blocks.append((accuracy, W @ _correct(out, self.exp.train_y, W.dtype), None))
        for name, idx in self.heldout.items():
            blocks.append(self._forward_rows(name, idx))
        return blocks

    def batch(self, per: torch.Tensor, out: torch.Tensor, idx: torch.Tensor) -> list[Block]:
        """``batch_loss`` rows: each group's mean loss over its members in this batch."""
        if self.M is None:
            return []
        Mb = self.M if idx is None else self.M[:, idx]  # a batch as large as the data: every point
        sums = (Mb @ per.detach().reshape(-1, 1).to(Mb.dtype)).reshape(-1)
        counts = Mb.sum(1)
        # Divided in float64, as Python divides the two floats: the same bits on every path.
        return [([(name, "batch_loss") for name in self.names], sums.double() / counts.double(), counts > 0)]

    def data_rows(self) -> list[Block]:
        """Full-data group rows by a forward pass of their points (minibatch runs, at a cadence)."""
        return [self._forward_rows(name, idx) for name, idx in (self.exp.groups or {}).items()]

    def _forward_rows(self, name: str, idx: torch.Tensor) -> Block:
        exp = self.exp
        X, y = exp.data.X[idx], exp.data.y[idx]
        with torch.no_grad(), _running_stats_frozen(exp.model):
            out = exp.model(X)
            per = exp.loss_fn(out, y, reduction="none")
        keys = [(name, "loss")] + ([(name, "accuracy")] if self.classification else [])
        return keys, self._stack(per, out, y).mean(0), None


def _correct(out: torch.Tensor, y: torch.Tensor, dtype) -> torch.Tensor:
    """1.0 where the predicted class (argmax, or the sign of a single output, as the probes read
    it) equals the label."""
    out = out.detach()
    pred = out.argmax(-1) if out.shape[-1] > 1 else (out[..., 0] > 0).long()
    return (pred == y).to(dtype)


def group_loss_due(every: Optional[int], step: int) -> bool:
    return bool(every) and step % every == 0
