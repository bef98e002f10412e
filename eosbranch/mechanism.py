"""Mechanism terms of the branch effect: the central-flow reading of the EoS (DESIGN §2).

Cohen, Damian et al. (2024) describe GD at the EoS by its time average θ̄ (the central flow)
plus an oscillation x_t along the top eigenvector u, with variance σ² = E[x_t²]. The time-averaged
loss of group k is then l_k(θ̄) + ½σ²·uᵀ∇²l_k u, and θ̄ moves along -(∇L + ½σ²∇S) per unit of
t_eff. Against a branch that exits the EoS (no oscillation, no implicit -∇S drift), the effect on
group k splits into two terms, both measured here per group at measurement steps:

- ``oscillation_cost`` = ½σ²·v1ᵀ∇²l_k v1: how much higher the group's loss sits at the EoS on
  average because of the oscillation (Δl_k lower by this much);
- ``drift_rate`` = ½σ²·Q_k, Q_k = <g_k, ∇S> (``sharpness_coupling``): how much faster per unit of
  t_eff the EoS's drift along -∇S lowers the group's loss (Δl_k grows at this rate).

So Δl_k(t) ≈ ∫_{t_fork}^t drift_rate - oscillation_cost(t); :func:`predict` sets this beside
the measured Δl_k over a window (compare's ``mechanism.parquet``).

The pieces:

- ``oscillation_variance`` σ² (group "all") from the iterates: p_s = <θ_s, u> at the steps of
  the ``measure.oscillation_window`` before a measurement, u the previous measurement's v1 (the
  state's last vector, fixed over the window), and σ² = mean of ((p_{s+1} - 2 p_s + p_{s-1}) / 4)²
  over the window's interior steps: a pure period-two oscillation ±x about a linearly moving
  centre gives exactly x², the drift cancels. The trainer keeps the p_s (:func:`track`) in its
  state, so a resumed run gives the same σ².
- ``v1_group_curvature`` = v1ᵀ∇²l_k v1 per group, the second derivative of each example's loss
  along v1 by forward-over-forward mode (one pass over the groups' points), averaged per group;
  for groups that partition the data, Σ_k (n_k/N)·v1ᵀ∇²l_k v1 = S.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
from torch.func import functional_call, jvp

from .branch_effect import window_mean
from .curvature import running_stats_frozen as _running_stats_frozen, unflatten

if TYPE_CHECKING:
    from .context import Context

__all__ = ["TRACK_KEY", "track", "oscillation_variance", "per_example_v1_curvature", "v1_group_curvature",
           "predict", "MECHANISM_COLUMNS"]

TRACK_KEY = "oscillation_track"  # in TrainState.measured: [[step, <theta_step, u>], ...]

MECHANISM_COLUMNS = ["branch", "group", "fork_step", "valid", "oscillation_variance", "v1_group_curvature",
                     "oscillation_cost", "drift_rate", "predicted_delta_mean", "measured_delta_mean",
                     "predicted_rate", "measured_rate"]


def track(params, u: torch.Tensor) -> float:
    """<θ, u> for the flat trainable parameters θ, accumulated in float64: the oscillation is a
    small difference of large projections, beyond float32's resolution."""
    acc, i = None, 0
    for p in params:
        n = p.numel()
        d = (p.detach().reshape(-1).double() * u[i:i + n].double()).sum()
        acc = d if acc is None else acc + d
        i += n
    return 0.0 if acc is None else float(acc)


def oscillation_variance(entries, step: int, window: int) -> float:
    """σ² at ``step`` from tracked (step, p) pairs of [step - window, step] (NaN if fewer than
    three consecutive steps)."""
    p = {int(s): float(v) for s, v in entries if step - window <= s <= step}
    d = [(p[s + 1] - 2 * p[s] + p[s - 1]) / 4 for s in p if s - 1 in p and s + 1 in p]
    return float(np.mean(np.square(d))) if d else float("nan")


def per_example_v1_curvature(ctx: "Context", index: torch.Tensor) -> torch.Tensor:
    """[len(index)] v1ᵀ∇²l_i v1 for the points ``index`` (forward-over-forward; chunked)."""
    v1 = ctx._need_v1("v1_group_curvature")
    tangents = tuple(unflatten(v1, ctx.params))
    names = ctx.param_names
    out = torch.empty(index.numel(), dtype=ctx.dtype, device=ctx.device)
    with _running_stats_frozen(ctx.model), torch.no_grad():
        for Xc, yc, pos in ctx.objective.chunks(index):
            def per(*params):
                return ctx.loss_fn(functional_call(ctx.model, (dict(zip(names, params)), ctx.buffers), (Xc,)),
                                   yc, reduction="none")

            def first(*params):
                return jvp(per, params, tangents)[1]

            out[pos.to(ctx.device)] = jvp(first, tuple(ctx.params), tangents)[1]
    return out


def v1_group_curvature(ctx: "Context") -> dict[str, float]:
    """name -> v1ᵀ∇²l_k v1 (the group's own mean-loss Hessian along the global v1)."""
    if not ctx.groups:
        return {}
    union, W = ctx.group_weights()
    values = W @ per_example_v1_curvature(ctx, union)
    return {name: values[k].item() for k, name in enumerate(ctx.groups)}


def _cumulative(t: np.ndarray, rate: np.ndarray) -> np.ndarray:
    """∫_{t_0}^{t_j} rate of the piecewise-linear interpolant, at each t_j."""
    steps = 0.5 * (rate[1:] + rate[:-1]) * np.diff(t)
    return np.concatenate([[0.0], np.cumsum(steps)])


def predict(t: np.ndarray, drift_rate: np.ndarray, oscillation_cost: np.ndarray, start: float, end: float) -> dict:
    """The central-flow prediction of Δl_k over [start, end] from the reference's measurements
    at times ``t`` (interpolated linearly; constant beyond): ``predicted_delta_mean`` (the mean
    of ∫_{start}^t drift_rate - oscillation_cost(t)) and ``predicted_rate`` (the mean drift rate)."""
    t, drift, cost = (np.asarray(a, float) for a in (t, drift_rate, oscillation_cost))
    keep = np.isfinite(drift) & np.isfinite(cost)
    t, drift, cost = t[keep], drift[keep], cost[keep]
    if len(t) == 0 or end <= start:
        return {"predicted_delta_mean": float("nan"), "predicted_rate": float("nan")}
    knots = np.unique(np.concatenate([[start], t[(t > start) & (t < end)], [end]]))
    rate, cost = np.interp(knots, t, drift), np.interp(knots, t, cost)
    h = np.diff(knots)
    integral = _cumulative(knots, rate)
    # Exact: the rate is linear on each segment, so its integral is quadratic there, and
    # ∫_a^b C = C_a h + r_a h²/2 + (r_b - r_a) h²/6.
    area = integral[:-1] * h + rate[:-1] * h ** 2 / 2 + (rate[1:] - rate[:-1]) * h ** 2 / 6
    return {"predicted_delta_mean": float(area.sum() / (end - start)) - window_mean(knots, cost, start, end),
            "predicted_rate": window_mean(knots, rate, start, end)}


def measured_rate(t: np.ndarray, delta: np.ndarray) -> float:
    """Least-squares slope of Δl_k on t_eff (NaN with fewer than two points)."""
    t, delta = np.asarray(t, float), np.asarray(delta, float)
    if len(t) < 2 or not math.isfinite(float(np.ptp(t))) or np.ptp(t) == 0:
        return float("nan")
    return float(np.polyfit(t, delta, 1)[0])


def due_soon(measure_spec, step: int, window: int) -> bool:
    """Whether a measurement falls in [step, step + window]: the iterate at ``step`` is then
    inside some measurement's oscillation window."""
    return any(measure_spec.due(step + j) for j in range(window + 1))


def record_track(st, params, window: int, measure_spec) -> None:
    """Append <θ_t, u> (u: the previous measurement's v1) when a measurement is within ``window``."""
    if st.eig_vectors is None or not due_soon(measure_spec, st.step, window):
        return
    entries = st.measured.setdefault(TRACK_KEY, [])
    if entries and entries[-1][0] == st.step:  # a step run again (extending a run from its final state)
        entries.pop()
    entries.append([int(st.step), track(params, st.eig_vectors[:, 0])])
    del entries[:-(window + 1)]


def sigma_squared(st, window: int) -> Optional[float]:
    value = oscillation_variance(st.measured.get(TRACK_KEY, []), st.step, window)
    return None if math.isnan(value) else value
