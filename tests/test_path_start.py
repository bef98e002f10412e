"""The warm start extrapolated along the eigenvectors' path (eosbranch.curvature.warm_start.
extrapolated_start, eosbranch.measure.warm_vectors): closed forms on rotating vectors, products
counted (never timed) on dense matrices whose top eigenvector turns at a constant rate, and the
trainer's own solves reproduced from their checkpoints."""

import math

import pytest
import torch

import eosbranch
from eosbranch.curvature import PATH_STEP, extrapolated_start, path_ratio, top_eigenpairs
from eosbranch.curvature.warm_start import PATH_MIN_COS
from eosbranch.measure import EIG_T_KEY, solve_curvature, warm_vectors
from eosbranch.train import build, restore_state

F64 = torch.float64
N = 200
SPECTRUM = torch.cat([torch.tensor([20.0, 9.0], dtype=F64), torch.linspace(-1, 4, N - 2, dtype=F64)])


def turned(t: float):
    """A symmetric matrix with SPECTRUM whose eigenvectors are exp(t K) Q (K a fixed random skew
    matrix): the top eigenvector moves along a smooth path, spreading over many directions."""
    Q, _ = torch.linalg.qr(torch.randn(N, N, generator=torch.Generator().manual_seed(0), dtype=F64))
    K = torch.randn(N, N, generator=torch.Generator().manual_seed(7), dtype=F64)
    Qt = torch.linalg.matrix_exp(t * (K - K.T) / math.sqrt(2 * N)) @ Q
    return (Qt * SPECTRUM) @ Qt.T, Qt[:, 0]


def sin(u, v):
    u, v = u / u.norm(), v / v.norm()
    return float((u - (u @ v) * v).norm())


def test_path_ratio_clamps_to_one_interval():
    assert path_ratio(3.0, 2.0, 1.0) == 1.0 and path_ratio(2.5, 2.0, 1.0) == 0.5
    assert path_ratio(9.0, 2.0, 1.0) == 1.0  # never further than the last interval
    assert path_ratio(2.0, 2.0, 1.0) == 0.0  # at the last measurement itself: its vectors
    assert path_ratio(3.0, 2.0, 2.0) == 0.0 and path_ratio(3.0, 2.0, math.nan) == 0.0


def test_extrapolation_in_a_plane_is_the_closed_form():
    # Unit vectors at angles 0 and a in the (e0, e1) plane; the previous one given with the other sign.
    a = 0.1
    before = torch.zeros(5, 1, dtype=F64)
    last = torch.zeros(5, 1, dtype=F64)
    before[0, 0], before[1, 0] = -1.0, -0.0
    last[0, 0], last[1, 0] = math.cos(a), math.sin(a)
    u = extrapolated_start(last, before, ratio=1.0)
    # v + s (v - v'): angle atan2((1 + s) sin a, (1 + s) cos a - s), s = PATH_STEP.
    s = PATH_STEP
    expected = math.atan2((1 + s) * math.sin(a), (1 + s) * math.cos(a) - s)
    assert math.atan2(u[1, 0].item(), u[0, 0].item()) == pytest.approx(expected, rel=1e-12)
    assert u.norm().item() == pytest.approx(1.0, rel=1e-12)
    assert a < expected < 2 * a  # ahead of the last vector, short of the straight continuation
    half = extrapolated_start(last, before, ratio=0.5)
    assert a < math.atan2(half[1, 0].item(), half[0, 0].item()) < expected


def test_columns_that_turned_too_far_or_no_ratio_stay_as_they_are():
    g = torch.Generator().manual_seed(3)
    last = torch.randn(50, 2, generator=g, dtype=F64)
    last /= last.norm(dim=0)
    before = last.clone()
    before[:, 0] += 0.05 * torch.randn(50, generator=g, dtype=F64)  # smooth: moved
    before[:, 1] = torch.randn(50, generator=g, dtype=F64)          # |cos| ~ 0.1: kept
    assert abs(float(before[:, 1] @ last[:, 1]) / before[:, 1].norm().item()) < PATH_MIN_COS
    u = extrapolated_start(last, before, ratio=1.0)
    assert not torch.equal(u[:, 0], last[:, 0]) and torch.equal(u[:, 1], last[:, 1])
    assert torch.equal(extrapolated_start(last, before, ratio=0.0), last)
    bad = before.clone()
    bad[3, 0] = float("nan")  # a non-finite previous vector moves nothing
    assert torch.equal(extrapolated_start(last, bad, ratio=1.0)[:, 0], last[:, 0])
    assert torch.equal(extrapolated_start(last, None, ratio=1.0), last)
    # Fewer columns before (top_k raised between measurements): the extra ones stay.
    assert torch.equal(extrapolated_start(last, before[:, :1], 1.0)[:, 1], last[:, 1])


@pytest.mark.parametrize("rate", [0.05, 0.15])
def test_on_a_turning_spectrum_the_extrapolated_start_is_closer_and_costs_no_more(rate):
    # Measurements at t = 0, 1, 2 of a top eigenvector turning at a constant rate: the solve at
    # t = 2 starts from v(1), or from v(1) moved along v(0) -> v(1).
    A, v2 = turned(2 * rate)
    _, v1 = turned(rate)
    _, v0 = turned(0.0)
    plain = v1[:, None]
    moved = extrapolated_start(plain, v0[:, None], path_ratio(2.0, 1.0, 0.0))
    assert sin(moved[:, 0], v2) < 0.75 * sin(v1, v2)
    counts = {}
    for name, start in (("plain", plain), ("moved", moved)):
        res = top_eigenpairs(lambda x: A @ x, N, tol=1e-8, v0=start)
        assert res.converged
        assert res.values[0].item() == pytest.approx(20.0, rel=1e-8)
        assert sin(res.vectors[:, 0], v2) < 1e-7
        counts[name] = res.n_matvecs
    assert counts["moved"] <= counts["plain"]


def test_the_trainer_extrapolates_and_each_solve_reproduces_from_its_checkpoint(tmp_path, tiny_spec):
    tiny_spec.update(dtype="float64", steps=50, measure={"every": 10, "sharpness": True, "tol": 1e-6},
                     checkpoint={"every": 10})
    run = eosbranch.train(tiny_spec, tmp_path)
    m = run.metrics
    recorded = m[m.metric == "sharpness"].set_index("step").value
    products = m[m.metric == "eig_matvecs"].set_index("step").value
    lr = tiny_spec["optimizer"]["lr"]
    moved = []
    for step in (10, 20, 30, 40, 50):
        exp = build(run.spec)
        st = restore_state(exp, run.checkpoint(step))  # the state before step's measurement
        before, last = st.measured[EIG_T_KEY]
        assert last == pytest.approx(st.t_eff - 10 * lr)
        start = warm_vectors(st, 1)
        if step == 10:  # one measurement so far: nothing to extrapolate from
            assert st.prev_eig_vectors is None and before is None
            assert torch.equal(start, st.eig_vectors)
        else:
            assert before == pytest.approx(last - 10 * lr)
            ratio = path_ratio(st.t_eff, last, before)
            assert ratio == pytest.approx(1.0, rel=1e-12)  # equal intervals (t_eff sums round)
            assert torch.equal(start, extrapolated_start(st.eig_vectors, st.prev_eig_vectors, ratio))
            moved.append(not torch.equal(start, st.eig_vectors))
        res, _ = solve_curvature(exp, st)
        assert res.values[0].item() == recorded[step] and res.n_matvecs == products[step]  # bit for bit
    # Early on v1 turns by more than acos(PATH_MIN_COS) in 10 steps (kept as it is); later it is moved.
    assert moved[-3:] == [True, True, True]
    # Each checkpoint's previous vectors are the ones the checkpoint before it held as the last.
    exp = build(run.spec)
    st30, st40 = (restore_state(exp, run.checkpoint(s)) for s in (30, 40))
    assert torch.equal(st40.prev_eig_vectors, st30.eig_vectors)


def test_a_cold_start_drops_the_previous_vectors(tmp_path, tiny_spec):
    # The catapulting setting of tests/test_cold_start.py: after a cold solve the vectors before it
    # were stale, so the next warm start is the cold solve's vectors alone.
    tiny_spec["model"]["activation"] = "tanh"
    tiny_spec.update(dtype="float64", loss="ce", steps=30, optimizer={"kind": "gd", "lr": 1.0}, groups="classes",
                     measure={"every": 10, "sharpness": True, "tol": 1e-2}, checkpoint={"every": 10})
    run = eosbranch.train(tiny_spec, tmp_path)
    cold = set(run.events[run.events.event == "cold_start"].step)
    assert cold and max(cold) < 30, "this setting is chosen to catapult before the last checkpoint"
    exp = build(run.spec)
    for step in cold:
        st = restore_state(exp, run.checkpoint(step + 10))
        assert st.prev_eig_vectors is None and st.measured[EIG_T_KEY][0] is None
