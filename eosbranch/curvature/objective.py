"""The objective every curvature backend differentiates: one place for the model, the loss, the
points, their weights and the chunks.

The Hessian is that of L = sum_i omega_i l_i over the Hessian's points (all of ``X``, or a fixed
``subset``), with omega_i = 1/n, or w_i / sum_j w_j for per-point ``weights`` (a reweighting
branch). Data pass in chunks of ``chunk_size`` points; chunk c carries its share
weight_c = sum_{i in c} omega_i and its own normalised loss L_c = sum_{i in c} omega_i l_i / weight_c
(the plain mean without weights), so L = sum_c weight_c L_c and a short last chunk does not bias
the mean. Parameters and buffers are snapshotted: measuring never moves the model.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from ..loss import get_loss

__all__ = ["Objective", "Chunk", "GroupBatch", "running_stats_frozen"]


@contextmanager
def running_stats_frozen(model: nn.Module):
    # With track_running_stats off, a BatchNorm in training mode still uses batch statistics (same
    # outputs) but skips the in-place update of running_mean/var/num_batches_tracked.
    patched = [mod for mod in model.modules() if isinstance(mod, nn.modules.batchnorm._NormBase)
               and mod.training and mod.track_running_stats]
    for mod in patched:
        mod.track_running_stats = False
    try:
        yield
    finally:
        for mod in patched:
            mod.track_running_stats = True


@dataclass
class Chunk:
    """One chunk of the Hessian's points: ``omega`` [n_c] their weights in L (on the device) or
    None for the plain mean (then omega_i = 1/n), ``weight`` the chunk's share of L (a float without
    weights, so one chunk of weight 1.0 needs no extra pass), ``pos`` positions among the points."""

    X: Tensor
    y: Tensor
    pos: Tensor
    weight: float | Tensor
    omega: Tensor | None
    n_total: int

    def local_omega(self, dtype, device) -> Tensor:
        """The points' weights within L_c (they sum to 1 unless the chunk has weight 0)."""
        if self.omega is None:
            return torch.full((self.X.shape[0],), 1.0 / self.X.shape[0], dtype=dtype, device=device)
        return self.omega / self.omega.sum().clamp_min(1e-30)

    def global_omega(self, dtype, device) -> Tensor:
        """The points' weights within L."""
        if self.omega is None:
            return torch.full((self.X.shape[0],), 1.0 / self.n_total, dtype=dtype, device=device)
        return self.omega


@dataclass
class GroupBatch:
    """K groups as weights over the union of their points: l_k = W[k] @ l[union], W [K, |union|]
    holding 1/|G_k| on G_k. The group pass fills ``grads`` [K, dim] and, for backends that keep
    them, ``factors`` (per-layer factors of the gradient blocks) for the curvature pass."""

    union: Tensor
    W: Tensor
    grads: Tensor | None = None
    factors: object = None


class Objective:
    """The training loss at snapshotted parameters (see the module docstring). ``who`` prefixes
    error messages (the public function the user called)."""

    def __init__(self, model: nn.Module, loss, X: Tensor, y: Tensor, *, chunk_size=None, subset=None,
                 weights: Tensor | None = None, who: str = "hessian_matvec", subset_name: str = "subset"):
        self.model, self.loss, self.who = model, get_loss(loss), who
        if X.shape[0] != y.shape[0]:
            raise ValueError(f"{who}: X has {X.shape[0]} rows but y has {y.shape[0]}")
        self.X, self.y, self.n = X, y, X.shape[0]
        if self.n == 0:
            raise ValueError(f"{who}: no data points")
        if chunk_size is not None and int(chunk_size) < 1:
            raise ValueError(f"{who}: chunk_size must be >= 1, got {chunk_size}")
        self.chunk_size = self.n if chunk_size is None else int(chunk_size)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError(f"{who}: the model has no trainable parameters")
        self.names = [n for n, _ in named]
        self.params = [p.detach().clone() for _, p in named]
        self.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        self.dim = sum(p.numel() for p in self.params)
        self.dtype, self.device = self.params[0].dtype, self.params[0].device
        self.classification = not (y.dtype.is_floating_point or y.dtype.is_complex)
        self.subset = None if subset is None else self.indices(subset, subset_name)
        self.n_points = self.n if self.subset is None else self.subset.numel()
        self.weights = None
        if weights is not None:
            w = weights.reshape(-1)
            if w.numel() != self.n:
                raise ValueError(f"{who}: {w.numel()} weights for {self.n} points")
            self.weights = w

    def indices(self, idx, what: str) -> Tensor:
        """A validated LongTensor (CPU) of point indices."""
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1).cpu()
        if idx.numel() == 0:
            raise ValueError(f"{self.who}: {what} is empty")
        if int(idx.min()) < 0 or int(idx.max()) >= self.n:
            raise ValueError(f"{self.who}: {what} has indices outside [0, {self.n}): "
                             f"min {int(idx.min())}, max {int(idx.max())}")
        return idx

    # ------------------------------------------------------------------ passes over the data
    def chunks(self, index: Tensor | None = None):
        """(X_chunk, y_chunk, positions) over ``index`` (default all points), ``chunk_size`` at a time."""
        n = self.n if index is None else index.numel()
        for i in range(0, n, self.chunk_size):
            pos = torch.arange(i, min(i + self.chunk_size, n))
            if index is None:
                Xc, yc = self.X[i:i + self.chunk_size], self.y[i:i + self.chunk_size]
            else:
                rows = index[pos]
                Xc, yc = self.X[rows.to(self.X.device)], self.y[rows.to(self.y.device)]
            yield Xc.to(self.device), yc.to(self.device), pos

    def hessian_chunks(self):
        """:class:`Chunk` s over the Hessian's points (all, or ``subset``)."""
        w = None
        if self.weights is not None:
            w = self.weights.to(self.device, self.dtype)
            w = w if self.subset is None else w[self.subset.to(self.device)]
            w = w / w.sum()
        for Xc, yc, pos in self.chunks(self.subset):
            if w is None:
                yield Chunk(Xc, yc, pos, pos.numel() / self.n_points, None, self.n_points)
            else:
                omega = w[pos.to(self.device)]
                yield Chunk(Xc, yc, pos, omega.sum(), omega, self.n_points)

    @property
    def single_chunk(self) -> bool:
        return self.chunk_size >= self.n_points

    # ------------------------------------------------------------------ the model and the loss
    def outputs(self, params: Sequence[Tensor] | dict, Xc: Tensor) -> Tensor:
        named = params if isinstance(params, dict) else dict(zip(self.names, params))
        return functional_call(self.model, (named, self.buffers), (Xc,))

    def chunk_loss(self, out: Tensor, chunk: Chunk) -> Tensor:
        """L_c: the chunk's (weighted) mean loss."""
        if chunk.omega is None:
            return self.loss(out, chunk.y)
        per = self.loss(out, chunk.y, reduction="none")
        return (per * chunk.omega).sum() / chunk.omega.sum().clamp_min(1e-30)  # an all-zero chunk has weight 0

    def correct(self, out: Tensor, yc: Tensor) -> Tensor:
        """1.0 where the argmax (one output: its sign) is the label."""
        pred = out.argmax(-1) if out.shape[-1] > 1 else (out[..., 0] > 0).long()
        return (pred == yc.reshape(pred.shape)).to(self.dtype)

    def per_example_loss_ok(self) -> bool:
        """The factorised backends weight per-example losses themselves: check on a few points that
        the loss gives them (``reduction="none"`` -> [n], whose mean is the loss). Built-in losses do."""
        if getattr(self.loss, "output_derivatives", None) is not None:
            return True
        Xs, ys = self.X[:4].to(self.device), self.y[:4].to(self.device)
        try:
            with torch.no_grad(), running_stats_frozen(self.model):
                out = self.outputs(self.params, Xs)
                per, mean = self.loss(out, ys, reduction="none"), self.loss(out, ys)
        except TypeError:  # no `reduction` argument
            return False
        return (torch.is_tensor(per) and per.shape == (Xs.shape[0],)
                and bool(torch.allclose(per.mean(), mean, rtol=1e-4, atol=1e-12)))

    def rows_independent(self) -> bool:
        """Whether each example's output depends on its own input only, checked on a few points
        (a BatchNorm in training mode mixes them; per-example factorisations then do not hold)."""
        Xs = self.X[:4].to(self.device)
        with torch.no_grad(), running_stats_frozen(self.model):
            both, alone = self.outputs(self.params, Xs), self.outputs(self.params, Xs[:2])
        return both.shape[0] == Xs.shape[0] and bool(torch.allclose(alone, both[:2], rtol=1e-4, atol=1e-8))

    def group_batch(self, groups: dict[str, Tensor]) -> GroupBatch:
        """The :class:`GroupBatch` of ``groups`` (name -> indices, in order)."""
        names = list(groups)
        union = torch.unique(torch.cat([groups[k] for k in names]))  # sorted
        W = torch.zeros(len(names), union.numel(), dtype=self.dtype)
        for k, name in enumerate(names):
            idx = groups[name]
            share = torch.full((idx.numel(),), 1.0 / idx.numel(), dtype=self.dtype)
            W[k].index_add_(0, torch.searchsorted(union, idx), share)
        return GroupBatch(union, W.to(self.device))
