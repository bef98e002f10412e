"""Error bounds for quantities that depend on a computed eigenvector (DESIGN §2 "Alignment").

A Lanczos solve stops at a relative residual ||H v - theta v|| <= tol * |theta|; what that means
for v1 itself, and for everything measured along it (cos2_v1, C_k, Q_k, ...), depends on how far
lambda_1 stands from the rest of the spectrum. Two bounds, both cheap:

- ``angle_bound``: sin of the angle between the computed v and the true eigenvector. For a unit v
  with Rayleigh quotient theta above every other eigenvalue, ||H v - theta v||^2 =
  sum_i (lambda_i - theta)^2 c_i^2 >= (theta - lambda_2)^2 sin^2, so sin <= residual / gap
  (Davis-Kahan's sin-theta theorem, one vector). The gap theta - lambda_2 is estimated from the
  solver's own Ritz values (``EigenResult.gaps``): lambda_2 by the second Ritz value plus its
  residual, since an interval theta_2 +- res_2 holds an eigenvalue.
- ``cos2_error_bound``: cos^2 of the angle between a fixed vector g and the line of v. If the
  line moves by an angle delta, cos^2 changes by |sin(a + b) sin(a - b)| <= sin(delta) (sin 2b +
  sin(delta)), b the measured angle: a bound from the measured cos^2 and the angle bound alone.
"""

from __future__ import annotations

import math

__all__ = ["angle_bound", "cos2_error_bound"]


def angle_bound(residual: float, gap: float) -> float:
    """Bound on sin of the angle between a computed unit eigenvector and the true one: absolute
    residual ||H v - theta v|| over the gap to the rest of the spectrum, capped at 1. Without a
    positive gap estimate (NaN, or Ritz intervals that overlap) nothing is known: 1."""
    if not (gap > 0) or not math.isfinite(residual):
        return 1.0
    return min(1.0, abs(residual) / gap)


def cos2_error_bound(cos2: float, sin_delta: float) -> float:
    """Bound on |cos2_true - cos2| where cos2 = <g, v>^2 / ||g||^2 is measured along a unit v whose
    angle to the true eigenvector has sine at most ``sin_delta``. Capped at 1 (cos2 lies in [0, 1])."""
    if not math.isfinite(cos2) or not math.isfinite(sin_delta):
        return 1.0
    c = min(max(cos2, 0.0), 1.0)
    s = min(max(sin_delta, 0.0), 1.0)
    return min(1.0, s * (2.0 * math.sqrt(c * (1.0 - c)) + s))
