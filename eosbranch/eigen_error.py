"""Error bounds for quantities that depend on a computed eigenvector (DESIGN §2 "Alignment").

A Lanczos solve stops at a relative residual ||H v - theta v|| <= tol * |theta|; what that means
for v1 itself, and for everything measured along it (cos2_v1, C_k, Q_k, ...), depends on how far
lambda_1 stands from the rest of the spectrum. Two bounds, both cheap:

- ``angle_bound``: sin of the angle between the computed v and the true top eigenvector (or,
  for a repeated lambda_1, its eigenspace). For a unit v with Rayleigh quotient theta above every
  other eigenvalue, ||H v - theta v||^2 = sum_i (lambda_i - theta)^2 c_i^2 >= (theta - lambda_2)^2
  sin^2, so sin <= residual / gap (Davis-Kahan's sin-theta theorem, one vector). The gap is
  estimated from the solver's own Ritz values (``EigenResult.gaps``: theta_1 minus the second Ritz
  value and its residual), and the bound doubles residual / gap: it holds as long as that estimate
  of lambda_2 is off by less than half the gap. What no Krylov method can see is an eigenvalue
  whose eigenvector the basis has not met (e.g. lambda_2 within 1e-3 of lambda_1 on a start
  orthogonal to it): there the bound is wrong, and so is any v1 from the same solve. The residual
  is floored at ROUNDING * eps * |theta| (eps of the solve's dtype): the Krylov relation gives the
  residual of the operator as computed, which differs from the exact Hessian by rounding (float32
  reductions over a million entries are good to about 1e-5 relative, 100 eps).
- ``cos2_error_bound``: cos^2 of the angle between a fixed vector g and the line of v. If the
  line moves by an angle delta, cos^2 changes by |sin(a + b) sin(a - b)| <= sin(delta) (sin 2b +
  sin(delta)), b the measured angle: a bound from the measured cos^2 and the angle bound alone.
"""

from __future__ import annotations

import math

__all__ = ["angle_bound", "cos2_error_bound", "GAP_SAFETY", "ROUNDING"]


# Margin on residual / gap for a second Ritz value still below lambda_2 (see the docstring).
GAP_SAFETY = 2.0
# Rounding floor of a computed residual, in units of eps * |theta| (float32: 1.2e-5 relative).
ROUNDING = 100.0


def angle_bound(residual: float, gap: float, value: float = 0.0, eps: float = 0.0) -> float:
    """Bound on sin of the angle between a computed unit eigenvector and the true one (its
    eigenspace): GAP_SAFETY * max(residual, ROUNDING * eps * |value|) / gap, capped at 1.
    ``residual`` = ||H v - theta v|| (absolute), ``value`` = theta, ``eps`` = the machine epsilon of
    the solve's dtype. Without a positive gap estimate (NaN, or Ritz intervals that overlap)
    nothing is known: 1."""
    if not (gap > 0) or not math.isfinite(residual):
        return 1.0
    return min(1.0, GAP_SAFETY * max(abs(residual), ROUNDING * eps * abs(value)) / gap)


def cos2_error_bound(cos2: float, sin_delta: float) -> float:
    """Bound on |cos2_true - cos2| where cos2 = <g, v>^2 / ||g||^2 is measured along a unit v whose
    angle to the true eigenvector has sine at most ``sin_delta``. Capped at 1 (cos2 lies in [0, 1])."""
    if not math.isfinite(cos2) or not math.isfinite(sin_delta):
        return 1.0
    c = min(max(cos2, 0.0), 1.0)
    s = min(max(sin_delta, 0.0), 1.0)
    return min(1.0, s * (2.0 * math.sqrt(c * (1.0 - c)) + s))
