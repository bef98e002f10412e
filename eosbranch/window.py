"""Validity of a comparison window [t_fork, t**] (DESIGN §2, "Window validity").

A branch effect means "learning at the EoS versus off it" only if, over the window, the exit
branch is off the EoS and the reference is on it. :func:`diagnose` measures, per branch:

- ``tss_reached``: the branch's own sharpness reached its own threshold (t**); if not, the window
  ends at the branch's (or the reference's) last step, a cap, not t**;
- ``window_steps``: steps of the EoS reference inside the window; ``window_measurements``: its
  sharpness measurements there;
- ``reference_ratio_median``: the reference's median S / threshold over those measurements, and
  ``reference_near_share``: the share of them within ±``band`` of the threshold (it hovers);
- ``exit_max_ratio``: the branch's largest S / its own threshold from the fork up to t**
  (below 1: it left the EoS).

``valid`` is False, with every failed rule in ``invalid_reason``, when a rule of
:class:`Validity` fails. The defaults: t** reached; the branch below its own threshold before
t**; at least 3 measurements and 20 steps of the reference in the window; the reference's median
S / threshold within 10 % of 1 and at least half of its measurements within ±10 % of the
threshold.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["Validity", "DIAGNOSTIC_COLUMNS", "diagnose"]

DIAGNOSTIC_COLUMNS = ["tss_reached", "window_steps", "window_measurements", "reference_ratio_median",
                      "reference_near_share", "exit_max_ratio", "valid", "invalid_reason"]


@dataclass(frozen=True)
class Validity:
    """Thresholds of a valid window (documented defaults; pass another to ``compare``)."""

    band: float = 0.10              # "near the threshold": |S / threshold - 1| <= band
    min_near_share: float = 0.5     # share of the reference's measurements near the threshold
    max_median_deviation: float = 0.10  # |median S / threshold - 1| of the reference
    min_measurements: int = 3       # reference sharpness measurements in the window
    min_steps: int = 20             # reference steps in the window
    require_tss: bool = True        # the window must end at the branch's own t**, not a cap

    def as_dict(self) -> dict:
        return asdict(self)


def diagnose(*, t_fork: float, t_end: float, tss: float, ref_steps_t, ref_ratio_t, ref_ratio,
             branch_ratio_t, branch_ratio, validity: Validity = Validity()) -> dict:
    """The window's diagnostics and validity (columns :data:`DIAGNOSTIC_COLUMNS`).

    ``ref_steps_t``: t_eff of every step of the reference; ``ref_ratio_t, ref_ratio``: the
    reference's S / threshold at its measurements; ``branch_ratio_t, branch_ratio``: the branch's."""
    eps = 1e-9 * max(1.0, abs(t_end))
    ref_steps_t = np.asarray(ref_steps_t, float)
    rt, rr = np.asarray(ref_ratio_t, float), np.asarray(ref_ratio, float)
    bt, br = np.asarray(branch_ratio_t, float), np.asarray(branch_ratio, float)
    in_window = (rt >= t_fork - eps) & (rt <= t_end + eps)
    r = rr[in_window]
    steps = int(((ref_steps_t >= t_fork - eps) & (ref_steps_t <= t_end + eps)).sum())
    reached = bool(np.isfinite(tss))
    before = (bt >= t_fork - eps) & (bt < (tss if reached else t_end + eps) - eps)
    out = {
        "tss_reached": reached,
        "window_steps": steps,
        "window_measurements": int(len(r)),
        "reference_ratio_median": float(np.median(r)) if len(r) else float("nan"),
        "reference_near_share": float(np.mean(np.abs(r - 1) <= validity.band)) if len(r) else float("nan"),
        "exit_max_ratio": float(br[before].max()) if before.any() else float("nan"),
    }
    why = []
    if validity.require_tss and not reached:
        why.append(f"t** not reached: the window is capped at t_eff {t_end:.4g}")
    if np.isfinite(out["exit_max_ratio"]) and out["exit_max_ratio"] >= 1:
        why.append(f"the branch is not below its own threshold before t** (max S/threshold "
                   f"{out['exit_max_ratio']:.3g})")
    if out["window_measurements"] < validity.min_measurements:
        why.append(f"{out['window_measurements']} reference measurement(s) in the window "
                   f"(< {validity.min_measurements})")
    if steps < validity.min_steps:
        why.append(f"{steps} reference step(s) in the window (< {validity.min_steps})")
    med = out["reference_ratio_median"]
    if np.isfinite(med) and abs(med - 1) > validity.max_median_deviation:
        why.append(f"the reference does not hover: median S/threshold {med:.3g}")
    share = out["reference_near_share"]
    if np.isfinite(share) and share < validity.min_near_share:
        why.append(f"the reference is within ±{validity.band:.0%} of its threshold in {share:.0%} of "
                   f"the window's measurements (< {validity.min_near_share:.0%})")
    out["valid"] = not why
    out["invalid_reason"] = "; ".join(why)
    return out
