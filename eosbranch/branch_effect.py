"""The branch effect Δl_k on effective time, free of the EoS's period-two aliasing (DESIGN §2).

Δl_k(t_eff) = l_k^branch(t_eff) - l_k^EoS(t_eff). At the EoS a group's loss oscillates with period
two, so a curve read every k steps reads one phase of the oscillation, and a mean over such
samples can take either sign. Here every curve is the piecewise-linear interpolant of a loss
recorded at every step, and:

- ``delta_mean`` is the exact mean of Δl_k over the window (the integral of the difference of the
  two interpolants, divided by the window's length): over a period-two zigzag this is the mean of
  its two phases, whatever the grid;
- the **central** curve averages consecutive steps, l̄(t) = ½(l(t) + l(t+1)), placed at the mean
  of their t_eff, before differencing: ``delta_central_at_end`` reads the window's end without
  reading one phase, ``delta_central_mean`` is its exact mean;
- ``delta_at_end`` is the every-step difference at the window's end (one phase; kept for its
  plain reading and compared with the central one).

The functions take plain arrays, so a synthetic pair with a known answer tests them directly.
"""

from __future__ import annotations

import numpy as np

__all__ = ["central", "interp_ends", "window_mean", "on_grid", "central_on_grid", "effect_values"]


def central(t, loss) -> tuple[np.ndarray, np.ndarray]:
    """(t̄, l̄): consecutive samples averaged, l̄_j = ½(l_j + l_{j+1}) at t̄_j = ½(t_j + t_{j+1})."""
    t, loss = np.asarray(t, float), np.asarray(loss, float)
    if len(t) < 2:
        return t, loss
    return 0.5 * (t[:-1] + t[1:]), 0.5 * (loss[:-1] + loss[1:])


def window_mean(t, value, start: float, end: float) -> float:
    """Exact mean over [start, end] of the piecewise-linear interpolant of (t, value) (constant
    beyond its ends, as ``np.interp``)."""
    t, value = np.asarray(t, float), np.asarray(value, float)
    if end <= start:
        return float(np.interp(start, t, value))
    inner = t[(t > start) & (t < end)]
    knots = np.concatenate([[start], inner, [end]])
    v = np.interp(knots, t, value)
    return float(np.sum(0.5 * (v[1:] + v[:-1]) * np.diff(knots)) / (end - start))


def interp_ends(x, t, value) -> np.ndarray:
    """``np.interp`` inside [t_0, t_last], continued linearly beyond: a central curve ends half a
    step before the window does, and its trend (the oscillation averaged out) continues there."""
    t, value = np.asarray(t, float), np.asarray(value, float)
    x = np.asarray(x, float)
    y = np.interp(x, t, value)
    if len(t) >= 2:
        lo, hi = x < t[0], x > t[-1]
        y = np.where(lo, value[0] + (x - t[0]) * (value[1] - value[0]) / (t[1] - t[0]), y)
        y = np.where(hi, value[-1] + (x - t[-1]) * (value[-1] - value[-2]) / (t[-1] - t[-2]), y)
    return y


def on_grid(t_branch, loss_branch, t_ref, loss_ref, start: float, end: float, grid: int) -> np.ndarray:
    """Δ on ``grid`` evenly spaced points of [start, end] (for figures and the saved curves)."""
    ts = np.linspace(start, end, grid)
    return np.interp(ts, t_branch, loss_branch) - np.interp(ts, t_ref, loss_ref)


def central_on_grid(t_branch, loss_branch, t_ref, loss_ref, start: float, end: float, grid: int) -> np.ndarray:
    """The central Δ (consecutive steps averaged first) on ``grid`` points of [start, end]; its last
    value is ``delta_central_at_end``."""
    ts = np.linspace(start, end, grid)
    return interp_ends(ts, *central(t_branch, loss_branch)) - interp_ends(ts, *central(t_ref, loss_ref))


def effect_values(t_branch, loss_branch, t_ref, loss_ref, start: float, end: float) -> dict:
    """``delta_at_end``, ``delta_mean``, ``delta_central_at_end``, ``delta_central_mean`` of one
    branch against its reference over [start, end]."""
    tb, lb = np.asarray(t_branch, float), np.asarray(loss_branch, float)
    tr, lr = np.asarray(t_ref, float), np.asarray(loss_ref, float)
    cb, cr = central(tb, lb), central(tr, lr)
    return {
        "delta_at_end": float(np.interp(end, tb, lb) - np.interp(end, tr, lr)),
        "delta_mean": window_mean(tb, lb, start, end) - window_mean(tr, lr, start, end),
        "delta_central_at_end": float(interp_ends(end, *cb) - interp_ends(end, *cr)),
        "delta_central_mean": window_mean(*cb, start, end) - window_mean(*cr, start, end),
    }
