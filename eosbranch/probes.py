"""Probes: per-group and per-example measurements at one measurement step (DESIGN §2).

A :class:`Context` is built once per measurement step from the model, the loss, the training data,
the groups and ``v1`` -- the *global* top eigenvector of the full training-loss Hessian. Every
shared quantity is computed at most once and cached in ``ctx.cache`` under an explicit key
(``KEYS``); the context holds exactly one eigenvector, the global one, and nothing in this module
computes a group's own Hessian, so the two cannot be confused (the published research code did,
through a shared cache). Probes are functions ``Context -> list[(group, metric, value)]``.

Definitions (group k with indices G_k, l_k = mean_{i in G_k} l_i, g_k = grad l_k, H the Hessian of
the mean training loss, S = v1^T H v1 with v1 held fixed):

- ``cos2_v1`` = <g_k, v1>^2 / ||g_k||^2, ``curvature_influence`` C_k = <g_k, v1>^2,
- ``sharpness_coupling`` Q_k = <g_k, grad S>, ``rayleigh`` R_k = g_k^T H g_k / ||g_k||^2,
- per-example alignment a_i = <grad l_i, v1>^2 / ||grad l_i||^2.

Cost (one measurement, K groups): for MLPs of Linear layers and elementwise activations,
``eosbranch.taylor`` gives the group gradients from per-layer factors (one forward and one backward
over the groups' points), R_k by forward Taylor propagation and Q_k by one reverse pass over the
forward along v1 (about 2.5 gradients in all, benchmarks/probes.py). Otherwise the group gradients
come from one forward pass over the union of the groups' points and one K-batched vector-Jacobian
product; grad S and the K products H g_k share one gradient graph per data chunk (grad S is one
extra reverse pass through the HVP of v1);
the per-example numerators <grad l_i, v1> come from one forward-mode pass over the data, the norms
from exact per-layer identities when every trainable tensor belongs to an ``nn.Linear`` (else
chunked ``torch.func.vmap(grad)``). Data are processed in chunks of ``chunk_size`` points, each
chunk weighted by its size, so memory stays bounded and a short last chunk does not bias a mean.

Per-example quantities assume each example's loss depends only on its own input (no BatchNorm in
training mode). Measuring never changes the model: parameters and buffers are snapshotted.
"""

from __future__ import annotations

import math
import warnings
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from pydantic import Field

from .curvature import _running_stats_frozen, flatten, hessian_matvec, top_eigenpairs, unflatten
from . import mlp_chain
from .curvature import taylor
from .curvature.input_linear import group_curvature, split as input_split
from .loss import get_loss
from .registry import Params, Registry

# torch 2.14's forward-mode AD scripts a helper on first use and warns that torch.jit.script is
# deprecated; the warning is torch's own and nothing a user of eosbranch can act on.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)

__all__ = [
    "Context", "Row", "KEYS", "PROBES", "GROUP_METRICS", "group_probes", "per_example_alignment",
    "curvature_fraction", "weight_projection", "spearman", "fraction_loss_increased", "cos2_v1_own",
]

Row = tuple[str, str, float]

GROUP_METRICS = ("loss", "accuracy", "grad_norm", "cos2_v1", "curvature_influence",
                 "sharpness_coupling", "rayleigh")

# Cache keys. Everything derived from an eigenvector says so ("v1_global"), so a reader of
# ``ctx.cache`` sees which vector a number belongs to.
KEYS = {
    "group_grads": "group_grads",                     # name -> flat g_k
    "group_loss": "group_loss",                       # name -> l_k
    "group_accuracy": "group_accuracy",               # name -> accuracy (classification only)
    "group_hessian_quadratic": "group_hessian_quadratic",  # name -> g_k^T H g_k
    "sharpness_gradient": "sharpness_gradient_v1_global",  # flat grad_theta(v1^T H v1), v1 fixed
    "sharpness_coupling": "sharpness_coupling_v1_global",  # name -> Q_k = <g_k, grad S>
    "v1_hessian_quadratic": "v1_hessian_quadratic_v1_global",  # v1^T H v1 (= sharpness if v1 is top)
    "per_example_loss": "per_example_loss",           # [N]
    "per_example_projection": "per_example_projection_v1_global",  # [N] <grad l_i, v1>
    "per_example_grad_norm": "per_example_grad_norm",  # [N] ||grad l_i||
}

# Per-sample gradients with vmap materialise [chunk, dim]; cap that block at this many entries.
VMAP_BLOCK_ENTRIES = 2 ** 24
VMAP_BLOCK_POINTS = 256


class _NotLinear(Exception):
    """The per-layer norm identity does not apply to this model; use vmap(grad) instead."""


class Context:
    """Everything a probe needs at one measurement step, with shared quantities cached.

    ``model``: an ``nn.Module``; its trainable parameters (``requires_grad``, in
    ``model.parameters()`` order) define the flat layout of ``v1`` and of every gradient.
    ``loss_fn``: a name ("mse", "ce") or a callable ``(outputs, targets, reduction="mean"|"none")``.
    ``X``, ``y``: the full training set. ``groups``: name -> LongTensor of indices into it.
    ``v1``: the global top eigenvector of the training-loss Hessian ([dim] or [dim, 1]), or None
    (v1-dependent metrics are then skipped). ``chunk_size``: points per pass (None: all at once).
    ``hessian_subset``: the fixed indices the Hessian (and so v1) was computed on, if not all
    points; ``rayleigh`` and ``sharpness_coupling`` then use that same Hessian.
    ``grad_norm_method``: "auto" (per-layer identity for all-``nn.Linear`` models, else vmap),
    "linear" or "vmap". ``batched_vjp``: one vmapped backward for K cotangents (default) rather
    than K sequential ones; both give the same numbers. ``curvature_method``: "auto" (Taylor-mode
    forward propagation, ``eosbranch.taylor``, for MLPs of Linear layers and elementwise
    activations; else the input-layer factorisation of ``eosbranch.input_layer`` when the model
    starts with an ``nn.Linear``; else the generic pass), "taylor", "input_layer" or "generic";
    the same numbers. The Taylor route also takes the group gradients from per-layer factors.
    """

    def __init__(self, model: nn.Module, loss_fn, X: Tensor, y: Tensor,
                 groups: dict[str, Tensor] | None = None, v1: Tensor | None = None,
                 chunk_size: int | None = None, hessian_subset: Tensor | None = None,
                 grad_norm_method: str = "auto", batched_vjp: bool = True, weights: Tensor | None = None,
                 curvature_method: str = "auto"):
        self.model = model
        # Per-point weights of the training loss (a reweighting branch): the Hessian behind v1,
        # R_k and Q_k is then that of sum_i w_i l_i / sum_i w_i. Group losses stay unweighted.
        self.weights = weights
        self.loss_fn = get_loss(loss_fn)
        if X.shape[0] != y.shape[0]:
            raise ValueError(f"Context: X has {X.shape[0]} rows but y has {y.shape[0]}")
        self.X, self.y, self.n = X, y, X.shape[0]
        if self.n == 0:
            raise ValueError("Context: no data points")
        if chunk_size is not None and int(chunk_size) < 1:
            raise ValueError(f"Context: chunk_size must be >= 1 or None, got {chunk_size}")
        self.chunk_size = self.n if chunk_size is None else int(chunk_size)
        if grad_norm_method not in ("auto", "linear", "vmap"):
            raise ValueError(f"Context: grad_norm_method must be 'auto', 'linear' or 'vmap', got {grad_norm_method!r}")
        self.grad_norm_method = grad_norm_method
        self.batched_vjp = batched_vjp
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("Context: the model has no trainable parameters")
        self.param_names = [n for n, _ in named]
        self.params = [p.detach().clone() for _, p in named]  # snapshot: measuring never moves them
        self.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        self.dim = sum(p.numel() for p in self.params)
        self.dtype, self.device = self.params[0].dtype, self.params[0].device
        self.classification = not (y.dtype.is_floating_point or y.dtype.is_complex)
        self.groups = {name: self._indices(idx, f"group {name!r}") for name, idx in (groups or {}).items()}
        self.hessian_subset = None if hessian_subset is None else self._indices(hessian_subset, "hessian_subset")
        self.v1 = None if v1 is None else self._unit(v1)
        if curvature_method not in ("auto", "taylor", "input_layer", "generic"):
            raise ValueError("Context: curvature_method must be 'auto', 'taylor', 'input_layer' or 'generic', "
                             f"got {curvature_method!r}")
        self.taylor = (mlp_chain.split(model, self.param_names, X) if curvature_method in ("auto", "taylor")
                       else None)
        if curvature_method == "taylor" and self.taylor is None:
            raise ValueError("Context: curvature_method='taylor' needs an nn.Sequential of Flatten/Identity, "
                             "then nn.Linear layers (all trainable) and elementwise activations; use 'auto'")
        self.input_split = (input_split(model, self.param_names, X) if curvature_method in ("auto", "input_layer")
                            else None)
        if curvature_method == "input_layer" and self.input_split is None:
            raise ValueError("Context: curvature_method='input_layer' needs an nn.Sequential whose first module "
                             "with tensors is an nn.Linear with trainable weights; use 'auto' or 'generic'")
        self.cache: dict[str, object] = {}

    # ------------------------------------------------------------------ input checks
    def _indices(self, idx, what: str) -> Tensor:
        idx = torch.as_tensor(idx, dtype=torch.long).reshape(-1).cpu()
        if idx.numel() == 0:
            raise ValueError(f"Context: {what} is empty")
        if int(idx.min()) < 0 or int(idx.max()) >= self.n:
            raise ValueError(f"Context: {what} has indices outside [0, {self.n}): "
                             f"min {int(idx.min())}, max {int(idx.max())}")
        return idx

    def _unit(self, v1: Tensor) -> Tensor:
        if v1.numel() != self.dim or not (v1.dim() == 1 or (v1.dim() == 2 and v1.shape[1] == 1)):
            raise ValueError(f"Context: v1 must be a [{self.dim}] vector (one entry per trainable parameter), "
                             f"got shape {tuple(v1.shape)}")
        v = v1.detach().reshape(-1).to(device=self.device, dtype=self.dtype)
        norm = v.norm().item()
        # A solver's eigenvector is unit up to rounding; anything else is a wrong vector.
        if not math.isfinite(norm) or abs(norm - 1.0) > 1e-2:
            raise ValueError(f"Context: v1 must be a unit eigenvector, got norm {norm:.6g}")
        return v / norm

    # ------------------------------------------------------------------ cache
    def _get(self, key: str, producer: Callable[[], None]):
        # A producer may fill several keys in one pass (e.g. group grads, losses and accuracies).
        if key not in self.cache:
            producer()
        return self.cache[key]

    def _need_v1(self, what: str) -> Tensor:
        if self.v1 is None:
            raise ValueError(f"Context: {what} needs v1 (the global top eigenvector); none was given")
        return self.v1

    # ------------------------------------------------------------------ helpers
    def _leaves(self) -> list[Tensor]:
        return [p.detach().requires_grad_(True) for p in self.params]

    def _outputs(self, params: Sequence[Tensor], Xc: Tensor) -> Tensor:
        return functional_call(self.model, (dict(zip(self.param_names, params)), self.buffers), (Xc,))

    def _chunks(self, index: Tensor | None = None):
        """(X_chunk, y_chunk, positions) over ``index`` (default all points), ``chunk_size`` at a time."""
        n = self.n if index is None else index.numel()
        for i in range(0, n, self.chunk_size):
            pos = torch.arange(i, min(i + self.chunk_size, n))
            rows = pos if index is None else index[pos]
            if index is None:
                Xc, yc = self.X[i:i + self.chunk_size], self.y[i:i + self.chunk_size]
            else:
                Xc, yc = self.X[rows.to(self.X.device)], self.y[rows.to(self.y.device)]
            yield Xc.to(self.device), yc.to(self.device), pos

    def _vjp(self, outputs: list[Tensor], leaves, cotangents: list[Tensor], retain: bool = False) -> Tensor:
        """[K, dim]: row k = sum_j <cotangents[j][k], d outputs[j] / d theta>. One vmapped backward
        for all K rows (measured faster than K sequential ones on CPU), or K sequential ones."""
        K = cotangents[0].shape[0]
        if self.batched_vjp and K > 1:
            parts = torch.autograd.grad(outputs, leaves, grad_outputs=cotangents, is_grads_batched=True,
                                        retain_graph=retain, allow_unused=True)
        else:
            rows = [torch.autograd.grad(outputs, leaves, grad_outputs=[c[k] for c in cotangents],
                                        retain_graph=retain or k < K - 1, allow_unused=True) for k in range(K)]
            parts = [None if rows[0][j] is None else torch.stack([r[j] for r in rows]) for j in range(len(leaves))]
        return torch.cat([torch.zeros(K, p.numel(), dtype=self.dtype, device=self.device) if g is None
                          else g.reshape(K, -1) for g, p in zip(parts, self.params)], dim=1)

    def _correct(self, out: Tensor, yc: Tensor) -> Tensor:
        pred = out.argmax(-1) if out.shape[-1] > 1 else (out[..., 0] > 0).long()
        return (pred == yc.reshape(pred.shape)).to(self.dtype)

    # ------------------------------------------------------------------ group pass
    def group_weights(self) -> tuple[Tensor, Tensor]:
        """(union, W): the sorted union of the groups' indices and the [K, |union|] matrix whose
        row k holds 1/|G_k| on G_k, so that l_k = W[k] @ l[union]."""
        names = list(self.groups)
        union = torch.unique(torch.cat([self.groups[k] for k in names]))  # sorted
        W = torch.zeros(len(names), union.numel(), dtype=self.dtype)
        for k, name in enumerate(names):
            idx = self.groups[name]
            share = torch.full((idx.numel(),), 1.0 / idx.numel(), dtype=self.dtype)
            W[k].index_add_(0, torch.searchsorted(union, idx), share)
        return union, W.to(self.device)

    def _group_pass(self) -> None:
        """g_k, l_k and accuracy for every group from one forward over the union of their points
        and one K-batched vjp with a [K, M] weight matrix (row k: 1/|G_k| on G_k)."""
        names = list(self.groups)
        if not names:
            self.cache[KEYS["group_grads"]], self.cache[KEYS["group_loss"]] = {}, {}
            self.cache[KEYS["group_accuracy"]] = {} if self.classification else None
            return
        if self.taylor is not None:
            r = taylor.group_pass(self)
            self.cache[KEYS["group_grads"]], self.cache[KEYS["group_loss"]] = r["grads"], r["loss"]
            self.cache[KEYS["group_accuracy"]] = r["accuracy"]
            return
        union, W = self.group_weights()
        grads = torch.zeros(len(names), self.dim, dtype=self.dtype, device=self.device)
        losses = torch.zeros(len(names), dtype=self.dtype, device=self.device)
        correct = torch.zeros(len(names), dtype=self.dtype, device=self.device)
        with _running_stats_frozen(self.model), torch.enable_grad():
            for Xc, yc, pos in self._chunks(union):
                Wc = W[:, pos.to(self.device)]
                leaves = self._leaves()
                out = self._outputs(leaves, Xc)
                per = self.loss_fn(out, yc, reduction="none")
                grads += self._vjp([per], leaves, [Wc])
                losses += Wc @ per.detach()
                if self.classification:
                    correct += Wc @ self._correct(out.detach(), yc)
        self.cache[KEYS["group_grads"]] = dict(zip(names, grads))
        self.cache[KEYS["group_loss"]] = {k: losses[i].item() for i, k in enumerate(names)}
        self.cache[KEYS["group_accuracy"]] = ({k: correct[i].item() for i, k in enumerate(names)}
                                              if self.classification else None)

    @property
    def group_grads(self) -> dict[str, Tensor]:
        """name -> flat gradient g_k of the group's mean loss."""
        return self._get(KEYS["group_grads"], self._group_pass)

    @property
    def group_loss(self) -> dict[str, float]:
        return self._get(KEYS["group_loss"], self._group_pass)

    @property
    def group_accuracy(self) -> dict[str, float] | None:
        """name -> argmax accuracy, or None for float (regression) targets."""
        return self._get(KEYS["group_accuracy"], self._group_pass)

    # ------------------------------------------------------------------ curvature pass
    @property
    def _n_hessian(self) -> int:
        return self.n if self.hessian_subset is None else self.hessian_subset.numel()

    def _hessian_points(self):
        """(X_c, y_c, positions, omega_c) over the points of the Hessian (all, or ``hessian_subset``)
        in chunks: omega_i is point i's weight in the training loss (1/n, or w_i / sum w over those
        points), so L = sum_i omega_i l_i."""
        n_h = self._n_hessian
        w = None if self.weights is None else self.weights.to(self.device, self.dtype)
        if w is not None:
            w = w if self.hessian_subset is None else w[self.hessian_subset.to(self.device)]
            w = w / w.sum()
        for Xc, yc, pos in self._chunks(self.hessian_subset):
            omega = (torch.full((pos.numel(),), 1.0 / n_h, dtype=self.dtype, device=self.device) if w is None
                     else w[pos.to(self.device)])
            yield Xc, yc, pos, omega

    def _hessian_chunks(self):
        """(X_c, y_c, positions, weight, objective): ``objective(outputs, y_c)`` is the chunk's
        (weighted) mean loss and ``weight`` its share of the whole, so sum_c weight_c objective_c
        is the loss (the autograd passes differentiate the chunk's mean)."""
        for Xc, yc, pos, omega in self._hessian_points():
            if self.weights is None:
                yield Xc, yc, pos, pos.numel() / self._n_hessian, self.loss_fn
                continue

            def objective(out, yc, wc=omega):
                return (self.loss_fn(out, yc, reduction="none") * wc).sum() / wc.sum().clamp_min(1e-30)

            yield Xc, yc, pos, omega.sum(), objective

    def curvature(self, sharpness_gradient: bool = True, group_quadratic: bool = True,
                  sharpness_coupling: bool = False) -> None:
        """Compute (and cache) whichever of grad S (the flat vector), the g_k^T H g_k and the
        Q_k = <g_k, grad S> are asked for and missing. R_k and Q_k come from Taylor-mode forward
        propagation (``eosbranch.taylor``) or the input-layer factorisation
        (``eosbranch.input_layer``) where the model allows it, never forming grad S; otherwise, and
        for the flat grad S, from the generic pass."""
        want_quad = group_quadratic and KEYS["group_hessian_quadratic"] not in self.cache
        want_coup = sharpness_coupling and KEYS["sharpness_coupling"] not in self.cache
        if want_coup:
            self._need_v1("sharpness_coupling")
        names = list(self.groups)
        route = (taylor.group_curvature if self.taylor is not None
                 else group_curvature if self.input_split is not None else None)
        if route is not None and names and (want_quad or want_coup):
            r = route(self, coupling=want_coup, quadratic=want_quad)
            if want_quad:
                self.cache[KEYS["group_hessian_quadratic"]] = dict(zip(names, r["quadratic"].tolist()))
            if want_coup:
                self.cache[KEYS["sharpness_coupling"]] = dict(zip(names, r["coupling"].tolist()))
                self.cache.setdefault(KEYS["v1_hessian_quadratic"], r["s"].item())
            want_quad = want_coup = False
        self._generic_curvature(sharpness_gradient or want_coup, want_quad)
        if want_coup:
            dS = self.cache[KEYS["sharpness_gradient"]]
            self.cache[KEYS["sharpness_coupling"]] = {k: (self.group_grads[k] @ dS).item() for k in names}

    def _generic_curvature(self, sharpness_gradient: bool, group_quadratic: bool) -> None:
        """grad S and the g_k^T H g_k for any model, sharing one gradient graph per chunk.

        Per chunk c (weight n_c / n): g = grad L_c with create_graph; H v1 by a backward through g,
        itself with a graph; grad S = backward of <H v1, v1> (the one extra reverse pass); the K
        products H g_k by one batched backward through g. H is the Hessian of the same loss v1
        came from: all points, or ``hessian_subset``.
        """
        want_dS = sharpness_gradient and KEYS["sharpness_gradient"] not in self.cache
        want_quad = group_quadratic and KEYS["group_hessian_quadratic"] not in self.cache
        if want_dS:
            self._need_v1("sharpness_gradient")
        if not (want_dS or want_quad):
            return
        names = list(self.groups) if want_quad else []
        G = torch.stack([self.group_grads[k] for k in names]) if names else None
        v_parts = unflatten(self.v1, self.params) if want_dS else None
        dS = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        s_total = torch.zeros((), dtype=self.dtype, device=self.device)
        quad = torch.zeros(len(names), dtype=self.dtype, device=self.device)  # g_k^T H g_k
        with _running_stats_frozen(self.model), torch.enable_grad():
            for Xc, yc, pos, weight, objective in self._hessian_chunks():
                leaves = self._leaves()
                loss = objective(self._outputs(leaves, Xc), yc)
                grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
                used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
                if not used:  # loss at most linear in the parameters: H = 0 and grad S = 0
                    continue
                gu = [grads[i] for i in used]
                if want_dS:
                    hv = torch.autograd.grad(gu, leaves, grad_outputs=[v_parts[i] for i in used],
                                             create_graph=True, retain_graph=True, allow_unused=True)
                    s = torch.stack([(h * v).sum() for h, v in zip(hv, v_parts) if h is not None]).sum()
                    s_total += weight * s.detach()
                    if s.requires_grad:  # else H is constant here and grad S = 0
                        dS += weight * self._vjp([s], leaves, [s.new_ones(1)], retain=True)[0]
                if names:
                    tangents = unflatten(G.T, self.params)  # each [K, *shape]
                    quad += weight * (self._vjp(gu, leaves, [tangents[i] for i in used]) * G).sum(1)
        if want_quad:
            self.cache[KEYS["group_hessian_quadratic"]] = {k: quad[i].item() for i, k in enumerate(names)}
        if want_dS:
            self.cache[KEYS["sharpness_gradient"]] = dS
            self.cache[KEYS["v1_hessian_quadratic"]] = s_total.item()

    @property
    def sharpness_gradient(self) -> Tensor:
        """Flat grad_theta (v1^T H(theta) v1) with the global v1 held fixed."""
        return self._get(KEYS["sharpness_gradient"], lambda: self.curvature(group_quadratic=False))

    @property
    def v1_hessian_quadratic(self) -> float:
        """v1^T H v1: equals the sharpness when v1 is the converged top eigenvector (a check)."""
        return self._get(KEYS["v1_hessian_quadratic"], lambda: self.curvature(group_quadratic=False))

    @property
    def sharpness_coupling(self) -> dict[str, float]:
        """name -> Q_k = <g_k, grad S> with the global v1 held fixed."""
        return self._get(KEYS["sharpness_coupling"],
                         lambda: self.curvature(sharpness_gradient=False, group_quadratic=False, sharpness_coupling=True))

    @property
    def group_hessian_quadratic(self) -> dict[str, float]:
        """name -> g_k^T H g_k with H the training-loss Hessian."""
        return self._get(KEYS["group_hessian_quadratic"], lambda: self.curvature(sharpness_gradient=False))

    # ------------------------------------------------------------------ per-example quantities
    def _per_example_loss_pass(self) -> None:
        out = torch.empty(self.n, dtype=self.dtype, device=self.device)
        with torch.no_grad(), _running_stats_frozen(self.model):
            for Xc, yc, pos in self._chunks():
                out[pos.to(self.device)] = self.loss_fn(self._outputs(self.params, Xc), yc, reduction="none")
        self.cache[KEYS["per_example_loss"]] = out

    @property
    def per_example_loss(self) -> Tensor:
        """[N] l_i at the snapshotted parameters."""
        return self._get(KEYS["per_example_loss"], self._per_example_loss_pass)

    def _projection_pass(self) -> None:
        """<grad l_i, v1> for all i in one forward-mode pass: the jvp of the per-example loss vector
        along v1 (its primal output is the per-example loss, cached too)."""
        v1 = self._need_v1("per_example_projection")
        tangent = tuple(unflatten(v1, self.params))
        proj = torch.empty(self.n, dtype=self.dtype, device=self.device)
        loss = torch.empty(self.n, dtype=self.dtype, device=self.device)
        with _running_stats_frozen(self.model):
            for Xc, yc, pos in self._chunks():
                def per(*params):
                    return self.loss_fn(self._outputs(params, Xc), yc, reduction="none")

                lc, pc = torch.func.jvp(per, tuple(self.params), tangent)
                proj[pos.to(self.device)], loss[pos.to(self.device)] = pc.detach(), lc.detach()
        self.cache[KEYS["per_example_projection"]] = proj
        self.cache.setdefault(KEYS["per_example_loss"], loss)

    @property
    def per_example_projection(self) -> Tensor:
        """[N] <grad l_i, v1> with the global v1."""
        return self._get(KEYS["per_example_projection"], self._projection_pass)

    def _grad_norm_pass(self) -> None:
        sq = None
        if self.grad_norm_method in ("auto", "linear"):
            try:
                sq = self._grad_norm_sq_linear()
            except _NotLinear:
                if self.grad_norm_method == "linear":
                    raise ValueError("Context: grad_norm_method='linear' needs every trainable tensor to be the "
                                     "weight or bias of an nn.Linear applied once to [batch, features] inputs; "
                                     "use 'vmap' (or 'auto') for this model") from None
        if sq is None:
            sq = self._grad_norm_sq_vmap()
        self.cache[KEYS["per_example_grad_norm"]] = sq.clamp_min(0).sqrt()

    def _linear_layers(self) -> list[tuple[nn.Linear, bool, bool]]:
        """(layer, weight trainable, bias trainable) for each nn.Linear owning trainable tensors;
        raises _NotLinear if any trainable tensor lives elsewhere."""
        owners = {}
        for mod in self.model.modules():
            for pname, p in mod.named_parameters(recurse=False):
                if p.requires_grad:
                    if type(mod) is not nn.Linear:  # a subclass may compute something else
                        raise _NotLinear
                    owners.setdefault(id(mod), [mod, False, False])[1 if pname == "weight" else 2] = True
        return [tuple(v) for v in owners.values()]

    def _grad_norm_sq_linear(self) -> Tensor:
        """Exact per-example ||grad l_i||^2 for all-Linear models: a Linear layer's per-example
        gradient is delta_i a_i^T (bias: delta_i), so its squared norm is ||delta_i||^2 ||a_i||^2
        (+ ||delta_i||^2). One forward and one backward to the layer outputs (no [N, dim] block)."""
        layers = self._linear_layers()
        sq = torch.zeros(self.n, dtype=self.dtype, device=self.device)
        for Xc, yc, pos in self._chunks():
            seen: dict[int, tuple[Tensor, Tensor]] = {}
            ok = [True]

            def hook(mod, inp, out):
                if id(mod) in seen or inp[0].dim() != 2:  # shared layer or sequence input: no identity
                    ok[0] = False
                seen[id(mod)] = (inp[0].detach(), out)

            handles = [mod.register_forward_hook(hook) for mod, _, _ in layers]
            try:
                with _running_stats_frozen(self.model), torch.enable_grad():
                    leaves = self._leaves()
                    per = self.loss_fn(self._outputs(leaves, Xc), yc, reduction="none")
            finally:
                for h in handles:
                    h.remove()
            if not ok[0] or len(seen) != len(layers):
                raise _NotLinear
            outs = [seen[id(mod)][1] for mod, _, _ in layers]
            # Each loss depends only on its own row, so grad of sum_i l_i wrt row i of an output is delta_i.
            deltas = torch.autograd.grad(per.sum(), outs, allow_unused=True)
            total = torch.zeros(pos.numel(), dtype=self.dtype, device=self.device)
            for (mod, w, b), d in zip(layers, deltas):
                if d is None:
                    continue
                d2 = d.pow(2).sum(1)
                if w:
                    total += d2 * seen[id(mod)][0].pow(2).sum(1)
                if b:
                    total += d2
            sq[pos.to(self.device)] = total
        return sq

    def _grad_norm_sq_vmap(self) -> Tensor:
        """Per-example ||grad l_i||^2 from torch.func.vmap(grad), in blocks of at most
        VMAP_BLOCK_ENTRIES gradient entries (and VMAP_BLOCK_POINTS points)."""
        block = max(1, min(self.chunk_size, VMAP_BLOCK_POINTS, VMAP_BLOCK_ENTRIES // self.dim))
        params = tuple(self.params)
        sq = torch.empty(self.n, dtype=self.dtype, device=self.device)
        with _running_stats_frozen(self.model):
            for Xc, yc, pos in self._chunks():
                for i in range(0, Xc.shape[0], block):
                    xb, yb = Xc[i:i + block], yc[i:i + block]

                    def one(p, x, mask, yb=yb):
                        out = self._outputs(p, x.unsqueeze(0))
                        # The targets stay outside vmap (a loss that one-hot encodes labels cannot
                        # run on batched targets): score this output against every target of the
                        # block, keep entry i. The extra cost is block^2 loss terms, not passes.
                        per = self.loss_fn(out.expand(yb.shape[0], *out.shape[1:]), yb, reduction="none")
                        return (per * mask).sum()

                    masks = torch.eye(xb.shape[0], dtype=self.dtype, device=self.device)
                    gs = torch.func.vmap(torch.func.grad(one), in_dims=(None, 0, 0))(params, xb, masks)
                    rows = pos[i:i + block].to(self.device)
                    sq[rows] = sum(g.reshape(xb.shape[0], -1).pow(2).sum(1) for g in gs)
        return sq

    @property
    def per_example_grad_norm(self) -> Tensor:
        """[N] ||grad l_i||."""
        return self._get(KEYS["per_example_grad_norm"], self._grad_norm_pass)


# ---------------------------------------------------------------------- probes
PROBES = Registry("probe")


def _ratio(num: float, den: float) -> float:
    # A vanishing gradient has no direction: its alignment and Rayleigh quotient are undefined.
    return num / den if den > 0 else float("nan")


@PROBES.register("groups")
def group_probes(ctx: Context, metrics: Iterable[str] = GROUP_METRICS) -> list[Row]:
    """Rows (group, metric, value) per group in ``ctx.groups`` order, metrics in GROUP_METRICS
    order: loss, accuracy (classification only), grad_norm, and with v1 cos2_v1,
    curvature_influence, sharpness_coupling; rayleigh needs only H.

    ``metrics`` selects a subset; the curvature pass (grad S and H g_k, most of the cost) runs only
    for sharpness_coupling / rayleigh, so first-order metrics can be measured often and cheaply.
    """
    want = set(metrics)
    unknown = want - set(GROUP_METRICS)
    if unknown:
        raise ValueError(f"group_probes: unknown metrics {sorted(unknown)}; allowed: {', '.join(GROUP_METRICS)}")
    rows: list[Row] = []
    if not ctx.groups:
        return rows
    has_v1 = ctx.v1 is not None
    ctx.curvature(sharpness_gradient=False, group_quadratic="rayleigh" in want,
                  sharpness_coupling=has_v1 and "sharpness_coupling" in want)
    grads, losses, acc = ctx.group_grads, ctx.group_loss, ctx.group_accuracy
    for name, g in grads.items():
        sq = (g @ g).item()
        values = {"loss": losses[name], "grad_norm": math.sqrt(sq)}
        if acc is not None:
            values["accuracy"] = acc[name]
        if has_v1:
            c = (g @ ctx.v1).item() ** 2
            values["cos2_v1"] = _ratio(c, sq)
            values["curvature_influence"] = c
            if "sharpness_coupling" in want:
                values["sharpness_coupling"] = ctx.sharpness_coupling[name]
        if "rayleigh" in want:
            values["rayleigh"] = _ratio(ctx.group_hessian_quadratic[name], sq)
        rows += [(name, m, values[m]) for m in GROUP_METRICS if m in want and m in values]
    return rows


class OwnV1Params(Params):
    tol: float = Field(1e-4, gt=0, lt=1, description="residual tolerance of each group's own Lanczos solve")
    max_matvecs: int = Field(500, gt=0)


@PROBES.register("cos2_v1_own", OwnV1Params)
def cos2_v1_own(ctx: Context, tol: float = 1e-4, max_matvecs: int = 500) -> list[Row]:
    """Opt-in (``measure.extra_probes: [cos2_v1_own]``): per group, cos² of g_k with the top
    eigenvector of the group's *own* Hessian ∇²l_k (``cos2_v1_own``), that eigenvalue
    (``group_sharpness``) and its relative residual (``group_eig_residual``).

    This is the quantity the 2026 authors' code logs under ``grad_vmax_cos2`` (its eigenvector
    cache is overwritten by the group solve); the paper's text means the global v1, ``cos2_v1``.
    Reported beside it, never instead of it, so the two readings can be compared."""
    rows: list[Row] = []
    for name, idx in ctx.groups.items():
        X, y = ctx.X[idx.to(ctx.X.device)], ctx.y[idx.to(ctx.y.device)]
        H = hessian_matvec(ctx.model, ctx.loss_fn, (X, y), chunk_size=ctx.chunk_size)
        res = top_eigenpairs(H, ctx.dim, k=1, tol=tol, max_matvecs=max_matvecs, dtype=ctx.dtype, device=ctx.device)
        g, v = ctx.group_grads[name], res.vectors[:, 0]
        lam = res.values[0].item()
        rows += [(name, "cos2_v1_own", _ratio((g @ v).item() ** 2, (g @ g).item())),
                 (name, "group_sharpness", lam),
                 (name, "group_eig_residual", res.residuals[0].item() / max(abs(lam), 1e-30))]
    return rows


def per_example_alignment(ctx: Context) -> Tensor:
    """[N] a_i = <grad l_i, v1>^2 / ||grad l_i||^2 with the global v1 (NaN where grad l_i = 0)."""
    num = ctx.per_example_projection.pow(2)
    den = ctx.per_example_grad_norm.pow(2)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), torch.full_like(num, float("nan")))


# ---------------------------------------------------------------------- plain functions
def curvature_fraction(v1: Tensor, named_params) -> list[tuple[str, float]]:
    """Fraction of curvature: ||v1[p]||^2 / ||v1||^2 per parameter tensor (sums to 1).

    ``named_params``: an ``nn.Module`` (its trainable parameters) or (name, tensor) pairs in the
    flat layout's order; only shapes are read.
    """
    if isinstance(named_params, nn.Module):
        named_params = [(n, p) for n, p in named_params.named_parameters() if p.requires_grad]
    named = list(named_params)
    v = v1.detach().reshape(-1).to(torch.float64)
    total = sum(p.numel() for _, p in named)
    if v.numel() != total:
        raise ValueError(f"curvature_fraction: v1 has {v.numel()} entries, the parameters hold {total}")
    norm2 = (v @ v).item()
    if norm2 == 0:
        raise ValueError("curvature_fraction: v1 is zero")
    parts = unflatten(v, [p for _, p in named])
    return [(name, (part.pow(2).sum() / norm2).item()) for (name, _), part in zip(named, parts)]


def _flat(t) -> Tensor:
    if isinstance(t, Tensor):
        return t.detach().reshape(-1)
    return flatten([x.detach() for x in t])


def weight_projection(theta, theta_ref, v1_ref) -> float:
    """<theta - theta_ref, v1_ref>; each argument a flat tensor or a sequence of tensors."""
    a, b, v = _flat(theta), _flat(theta_ref), _flat(v1_ref)
    if not a.numel() == b.numel() == v.numel():
        raise ValueError(f"weight_projection: sizes differ: theta {a.numel()}, theta_ref {b.numel()}, "
                         f"v1_ref {v.numel()}")
    return ((a.to(torch.float64) - b.to(torch.float64)) @ v.to(torch.float64)).item()


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    # Tied runs share the mean of the 1-based ranks they span.
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    ends = np.r_[starts[1:], len(xs)]
    run_rank = (starts + ends + 1) / 2.0
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def spearman(a, b) -> float:
    """Spearman's rho (Pearson correlation of average ranks; ties share their mean rank).
    NaN if any value is NaN or either input is constant, as scipy.stats.spearmanr."""
    x, y = _as_numpy(a), _as_numpy(b)
    if x.shape != y.shape:
        raise ValueError(f"spearman: inputs differ in length: {x.size} vs {y.size}")
    if x.size < 2 or np.isnan(x).any() or np.isnan(y).any():
        return float("nan")
    rx, ry = _average_ranks(x), _average_ranks(y)
    rx -= rx.mean()
    ry -= ry.mean()
    den = math.sqrt((rx @ rx) * (ry @ ry))
    return float(rx @ ry / den) if den > 0 else float("nan")


def fraction_loss_increased(prev_losses, losses) -> float:
    """Fraction of points whose loss rose strictly from ``prev_losses`` to ``losses``."""
    p, c = _as_numpy(prev_losses), _as_numpy(losses)
    if p.shape != c.shape:
        raise ValueError(f"fraction_loss_increased: {p.size} previous losses but {c.size} losses")
    if p.size == 0:
        raise ValueError("fraction_loss_increased: no losses")
    return float((c > p).mean())
