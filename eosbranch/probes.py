"""Probes: per-group and per-example measurements at one measurement step (DESIGN §2).

Probes are functions ``Context -> list[(group, metric, value)]`` (a registry, ``PROBES``); the
:class:`~eosbranch.context.Context` they read is a cache over one curvature backend
(``eosbranch.curvature``), so every shared quantity is computed once per measurement step.

Definitions (group k with indices G_k, l_k = mean_{i in G_k} l_i, g_k = grad l_k, H the Hessian of
the mean training loss, S = v1^T H v1 with v1 -- the *global* top eigenvector -- held fixed):

- ``cos2_v1`` = <g_k, v1>^2 / ||g_k||^2, ``curvature_influence`` C_k = <g_k, v1>^2,
- ``sharpness_coupling`` Q_k = <g_k, grad S>, ``rayleigh`` R_k = g_k^T H g_k / ||g_k||^2,
- per-example alignment a_i = <grad l_i, v1>^2 / ||grad l_i||^2.

Cost (one measurement, K groups): for MLPs of Linear layers and elementwise activations, the
Taylor route gives the group gradients from per-layer factors (one forward and one backward over
the groups' points), R_k by forward Taylor propagation and Q_k by one reverse pass over the
forward along v1 (about 2.5 gradients in all, benchmarks/probes.py). Otherwise the group gradients
come from one forward pass over the union of the groups' points and one K-batched vector-Jacobian
product; grad S and the K products H g_k share one gradient graph per data chunk. The per-example
numerators <grad l_i, v1> come from one forward-mode pass over the data, the norms from exact
per-layer identities when every trainable tensor belongs to an ``nn.Linear`` (else chunked
``torch.func.vmap(grad)``). Data are processed in chunks of ``chunk_size`` points, each chunk
weighted by its share, so memory stays bounded and a short last chunk does not bias a mean.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch
from torch import Tensor, nn

from pydantic import Field

from .context import KEYS, Context
from .curvature import flatten, hessian_matvec, top_eigenpairs, unflatten
from .registry import Params, Registry

__all__ = [
    "Context", "Row", "KEYS", "PROBES", "GROUP_METRICS", "group_probes", "per_example_alignment",
    "curvature_fraction", "weight_projection", "spearman", "fraction_loss_increased", "cos2_v1_own",
]

Row = tuple[str, str, float]

GROUP_METRICS = ("loss", "accuracy", "grad_norm", "cos2_v1", "curvature_influence",
                 "sharpness_coupling", "rayleigh")

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
