"""The branch effect and its window on hand-made curves with known answers (eosbranch.branch_effect,
eosbranch.window, and compare's columns built from them)."""

from __future__ import annotations

import numpy as np
import pytest

import eosbranch
from eosbranch.branch_effect import central, effect_values, window_mean
from eosbranch.window import Validity, diagnose

from test_compare import write_series

ETA = 0.1
TRUE_DELTA = 0.02


def period_two_pair(n_steps: int = 400):
    """The EoS reference oscillates with period two around a falling trend, l = 1 - 0.1 t ± 0.05;
    the exit branch (η / 2, its own clock) follows the trend 0.02 higher. The true mean Δ over
    any window is TRUE_DELTA; read one phase of the reference and it is 0.02 - 0.05 < 0."""
    t_ref = ETA * np.arange(n_steps + 1)
    l_ref = 1 - 0.1 * t_ref + 0.05 * (-1.0) ** np.arange(n_steps + 1)
    t_b = 0.5 * ETA * np.arange(2 * n_steps + 1)
    l_b = 1 - 0.1 * t_b + TRUE_DELTA
    return t_b, l_b, t_ref, l_ref


def test_every_step_and_central_delta_recover_the_true_mean_where_even_steps_do_not():
    t_b, l_b, t_ref, l_ref = period_two_pair()
    start, end = 0.0, t_ref[-1]
    v = effect_values(t_b, l_b, t_ref, l_ref, start, end)
    # Every step: the exact mean of the zigzag's interpolant is the mean of its phases (an edge
    # term of one half-step, amplitude / steps, remains).
    assert v["delta_mean"] == pytest.approx(TRUE_DELTA, abs=0.05 / 400 + 1e-12)
    assert v["delta_central_mean"] == pytest.approx(TRUE_DELTA, abs=1e-9 + 0.05 / 400)
    assert v["delta_central_at_end"] == pytest.approx(TRUE_DELTA, abs=1e-9)
    # The every-step value at the end reads one phase of the oscillation (+0.05 at an even step).
    assert v["delta_at_end"] == pytest.approx(TRUE_DELTA - 0.05, abs=1e-9)
    # Sampling the reference at even steps only (every 2, every 10: one phase) flips the sign.
    for k in (2, 10):
        sampled = effect_values(t_b, l_b, t_ref[::k], l_ref[::k], start, end)
        assert sampled["delta_mean"] == pytest.approx(TRUE_DELTA - 0.05, abs=1e-9) and sampled["delta_mean"] < 0
    # Odd steps only read the other phase: the opposite error.
    odd = effect_values(t_b, l_b, t_ref[1::2], l_ref[1::2], t_ref[1], t_ref[-2])
    assert odd["delta_mean"] == pytest.approx(TRUE_DELTA + 0.05, abs=1e-9)


def test_window_mean_is_the_exact_integral_of_the_interpolant():
    t = np.array([0.0, 1.0, 3.0])
    f = np.array([0.0, 2.0, 0.0])
    # Over [0.5, 2]: the interpolant is 2t on [0.5, 1] and 2 - (t - 1) on [1, 2]: integral 0.75 + 1.5.
    assert window_mean(t, f, 0.5, 2.0) == pytest.approx((0.75 + 1.5) / 1.5, abs=1e-15)
    tc, fc = central(t, f)
    assert tc.tolist() == [0.5, 2.0] and fc.tolist() == [1.0, 1.0]


def hovering(n=50, t0=0.0, dt=0.1, ratio=1.02):
    t = t0 + dt * np.arange(n)
    return t, np.full(n, ratio)


def diag(**kw):
    t_ref, r_ref = kw.pop("ref", hovering())
    bt, br = kw.pop("branch", (np.array([0.0, 1.0, 2.0, 3.0]), np.array([0.5, 0.7, 0.9, 1.1])))
    args = dict(t_fork=0.0, t_end=2.5, tss=2.5, ref_steps_t=0.05 * np.arange(100), ref_ratio_t=t_ref,
                ref_ratio=r_ref, branch_ratio_t=bt, branch_ratio=br)
    args.update(kw)
    return diagnose(**args)


def test_a_window_that_meets_every_rule_is_valid():
    d = diag()
    assert d["valid"] and d["invalid_reason"] == ""
    assert d["tss_reached"] and d["window_steps"] == 51 and d["window_measurements"] == 26
    assert d["reference_ratio_median"] == pytest.approx(1.02) and d["reference_near_share"] == 1.0
    assert d["exit_max_ratio"] == pytest.approx(0.9)


@pytest.mark.parametrize("kw, reason", [
    (dict(tss=float("nan")), "t** not reached"),
    (dict(branch=(np.array([0.0, 1.0, 2.0]), np.array([1.2, 0.8, 0.9]))), "not below its own threshold"),
    (dict(ref=hovering(ratio=1.3)), "does not hover: median S/threshold 1.3"),
    (dict(ref=(np.arange(40) * 0.1, np.r_[np.full(10, 1.0), np.full(30, 1.5)])), "does not hover"),
    # In the window (26 measurements): 12 at the threshold, 7 at 0.85 and 7 at 1.15; median 1.0.
    (dict(ref=(np.arange(40) * 0.1, np.r_[np.full(12, 1.0), np.tile([0.85, 1.15], 7), np.full(14, 1.0)])),
     "within ±10% of its threshold in 46%"),
    (dict(ref=hovering(n=2, dt=1.0)), "2 reference measurement(s) in the window (< 3)"),
    (dict(ref_steps_t=np.arange(10) * 0.25), "10 reference step(s) in the window (< 20)"),
])
def test_each_rule_marks_the_window_invalid_with_its_reason(kw, reason):
    d = diag(**kw)
    assert not d["valid"] and reason in d["invalid_reason"], d["invalid_reason"]


def test_the_share_within_the_band_is_measured_on_the_window_only():
    t, r = hovering(n=50)
    r = r.copy()
    r[t > 2.5] = 3.0  # far off, but after the window
    d = diag(ref=(t, r))
    assert d["valid"] and d["reference_near_share"] == 1.0


def test_compare_marks_a_capped_window_and_a_reference_that_does_not_hover(tmp_path):
    """Hand-made runs: exit never reaches its threshold (t** capped); eos sits at 1.5 x its
    threshold (not hovering). compare keeps the rows, marks them invalid with both reasons and
    warns once per branch; summarize counts no valid seed."""
    ts = np.linspace(0, 3, 31)
    parent = write_series(tmp_path, {
        (None, None): [(0.0, {"loss": 1.0})],
        ("eos", 0): [(t, {"loss": 1 - 0.2 * t, "sharpness": 15.0, "threshold": 10.0}) for t in ts],
        ("exit", 0): [(t, {"loss": 1 - 0.1 * t, "sharpness": 5.0, "threshold": 10.0}) for t in ts],
    })
    with pytest.warns(eosbranch.errors.EosbranchWarning, match="invalid window") as caught:
        df = eosbranch.compare(parent)
    assert len([w for w in caught if "invalid window" in str(w.message)]) == 1
    assert not df.valid.any() and not df.tss_reached.any()
    for reason in ("t** not reached", "does not hover: median S/threshold 1.5"):
        assert df.invalid_reason.str.contains(reason, regex=False).all()
    assert (df.reference_ratio_median == 1.5).all() and (df.reference_near_share == 0).all()
    assert (df.exit_max_ratio == 0.5).all() and (df.window_measurements == 31).all()
    assert (df.source == "every_step").all()
    # Linear curves: every variant of Δ gives Δ(t) = 0.1 t, mean 0.15 over [0, 3].
    assert df.delta_mean.tolist() == pytest.approx([0.15] * len(df))
    assert df.delta_central_mean.tolist() == pytest.approx([0.15] * len(df))
    summary = eosbranch.summarize(df.assign(seed=0))
    assert (summary.n_valid == 0).all() and (summary.effect == "no valid window").all()
    assert (summary.invalid_seeds == "0").all()
    everything = eosbranch.summarize(df.assign(seed=0), valid_only=False)
    assert everything.delta_mean_median.tolist() == pytest.approx([0.15] * len(everything))


def test_a_valid_window_summarises_its_seeds(tmp_path):
    ts = np.linspace(0, 3, 31)
    parent = write_series(tmp_path, {
        (None, None): [(0.0, {"loss": 1.0})],
        ("eos", 0): [(t, {"loss": 1 - 0.2 * t, "sharpness": 10.2, "threshold": 10.0}) for t in ts],
        ("exit", 0): [(t, {"loss": 1 - 0.1 * t, "sharpness": 5.0 + 2 * t, "threshold": 10.0}) for t in ts],
    })
    df = eosbranch.compare(parent, validity=Validity(min_steps=5))
    assert df.valid.all() and df.tss_reached.all() and df.t_star_star.tolist() == pytest.approx([2.5] * len(df))
    assert (df.invalid_reason == "").all() and (df.window_steps == 26).all()
    s = eosbranch.summarize(df.assign(seed=3))
    assert (s.n_valid == 1).all() and (s.invalid_seeds == "").all()
