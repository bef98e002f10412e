"""Curvature measurements inside the trainer: sharpness, thresholds, t*, warm starts, Adam."""

import re

import numpy as np
import pytest
import torch

import eosbranch
from eosbranch.catalog import example_path
from eosbranch.curvature import top_eigenpairs, hessian_matvec
from eosbranch.spec import load_spec
from eosbranch.experiment import build
from eosbranch.state import restore_state

from conftest import write_spec
from tests.oracles import dense_hessian


def at_checkpoint(run, step):
    exp = build(run.spec)
    st = restore_state(exp, run.checkpoint(step))
    return exp, st


def test_quick_example_reaches_eos_early_and_stays(quick_run):
    run = quick_run
    ev = run.events
    t_star = int(ev.loc[ev.event == "t_star", "step"].iloc[0])
    assert run.spec.measure.warmup <= t_star <= run.spec.steps / 3
    sharp, thr = run.metric("sharpness"), run.metric("threshold")
    after = sharp[sharp.index >= t_star]
    assert len(after) >= 10
    assert sharp.iloc[0] < thr.iloc[0]  # it sharpens progressively from below
    assert ((after / thr[after.index] - 1).abs() < 0.1).mean() > 0.8  # hovers at 2/eta
    assert (run.metric("eig_residual") <= run.spec.measure.tol).all()


def test_recorded_sharpness_is_the_full_data_hessian(quick_run):
    # The model has 25k parameters (a dense Hessian would take 2.5 GB): check against a tight,
    # cold solve on the same state instead; the solver itself is checked against dense Hessians
    # in test_curvature.py.
    exp, st = at_checkpoint(quick_run, 200)
    H = hessian_matvec(exp.model, exp.loss_fn, (exp.data.X, exp.data.y))
    top = top_eigenpairs(H, sum(p.numel() for p in exp.params), tol=1e-6, max_matvecs=2000).values[0].item()
    recorded = quick_run.metric("sharpness")[200]
    assert recorded == pytest.approx(top, rel=2e-3)
    assert quick_run.metric("threshold")[200] == pytest.approx(2 / 0.12)


def test_warm_start_uses_fewer_matvecs_than_cold_at_eos(quick_run):
    # The checkpoint at step 300 holds the eigenvector measured at step 290 (a run at the EoS).
    exp, st = at_checkpoint(quick_run, 300)
    H = hessian_matvec(exp.model, exp.loss_fn, (exp.data.X, exp.data.y))
    dim = sum(p.numel() for p in exp.params)
    cold = top_eigenpairs(H, dim, tol=1e-3)
    warm = top_eigenpairs(H, dim, tol=1e-3, v0=st.eig_vectors)
    assert cold.converged and warm.converged
    assert warm.values[0].item() == pytest.approx(cold.values[0].item(), rel=2e-3)
    assert warm.n_matvecs < cold.n_matvecs


def test_adam_records_preconditioned_sharpness_against_dense(tmp_path, tiny_spec):
    tiny_spec.update(dtype="float64", steps=20, optimizer={"kind": "adam", "lr": 0.01},
                     measure={"every": 10, "sharpness": True, "tol": 1e-8, "max_matvecs": 2000})
    tiny_spec["model"]["width"] = 8
    run = eosbranch.train(tiny_spec, tmp_path)
    exp, st = at_checkpoint(run, 10)
    H = dense_hessian(exp.model, exp.loss_fn, exp.data.X, exp.data.y)
    P = torch.cat([d.flatten() for d in exp.optimizer.preconditioner(st.opt_state)])
    dense = torch.linalg.eigvals(torch.diag(1 / P) @ H).real.max().item()
    assert run.metric("preconditioned_sharpness")[10] == pytest.approx(dense, rel=1e-6)
    assert run.metric("sharpness")[10] == pytest.approx(torch.linalg.eigvalsh(H)[-1].item(), rel=1e-6)
    assert run.metric("threshold")[10] == pytest.approx(38 / 0.01)
    # Adam's step size along v1: eta v1^T P^-1 v1 with the dense top eigenvector (sign-free).
    v1 = torch.linalg.eigh(H)[1][:, -1]
    want = 0.01 * (v1.pow(2) / P).sum().item()
    assert run.metric("effective_step_v1")[10] == pytest.approx(want, rel=1e-6)
    assert 0.01 / P.max().item() <= want <= 0.01 / P.min().item()


@pytest.mark.parametrize("opt,expected", [
    ({"kind": "gd", "lr": 0.05}, 2 / 0.05),
    ({"kind": "momentum", "lr": 0.05, "beta": 0.9}, 3.8 / 0.05),
])
def test_threshold_per_optimizer_and_top_k(tmp_path, tiny_spec, opt, expected):
    tiny_spec.update(optimizer=opt, steps=10, measure={"every": 5, "top_k": 3, "sharpness": True})
    run = eosbranch.train(tiny_spec, tmp_path)
    assert run.metric("threshold").tolist() == pytest.approx([expected] * 3)
    s1, s2, s3 = (run.metric(n) for n in ("sharpness", "sharpness_2", "sharpness_3"))
    assert (s1 >= s2).all() and (s2 >= s3).all()


def test_subset_is_fixed_and_resume_with_measurements_is_bit_exact(tmp_path, tiny_spec):
    from test_train import assert_same_run, crash_then_resume
    from eosbranch.spec import parse_spec

    tiny_spec.update(steps=30, measure={"every": 4, "sharpness": True, "subset": 50, "examples": "all"},
                     checkpoint={"every": 9}, groups="classes")
    ref, resumed, _ = crash_then_resume(tmp_path, tiny_spec, 21)
    spec = parse_spec(tiny_spec)
    assert_same_run(ref, resumed)
    cols = ["step", "index", "group", "loss", "loss_change", "cos2_v1", "centroid_distance"]
    import pandas as pd

    pd.testing.assert_frame_equal(ref.examples[cols], resumed.examples[cols])
    assert len(ref.examples) == 8 * 80  # every example at each of the 8 measurement steps
    from eosbranch.measure import curvature_subset

    a, b = curvature_subset(build(spec)), curvature_subset(build(spec))
    assert torch.equal(a, b) and len(a) == 50


def test_group_probes_and_global_probes_are_recorded(quick_run):
    m = quick_run.metrics
    groups = {"inlier", "boundary", "input_outlier", "output_outlier"}
    probe_metrics = {"loss", "accuracy", "grad_norm", "cos2_v1", "curvature_influence", "sharpness_coupling",
                     "rayleigh", "v1_group_curvature", "oscillation_cost", "drift_rate",
                     "cos2_v1_error_bound"}  # loss, accuracy: every step
    at = m[m.step == 200]
    for g in groups:
        assert set(at[at.group == g].metric) == probe_metrics, g
    # The error bounds of the solve behind v1 (eosbranch.eigen_error; checked against dense
    # eigenvectors in test_eigen_error.py): recorded at every measurement, in [0, 1].
    every = m[m.group == "all"].pivot_table(index="step", columns="metric", values="value")
    solved = every.sharpness.notna()
    gap = every.eig_gap[solved]
    assert every.v1_angle_bound[solved].between(0, 1).all() and gap.dropna().gt(0).all()
    assert (every.v1_angle_bound[solved][gap.isna()] == 1).all()  # a two-vector basis gives no gap estimate
    assert at[at.metric == "cos2_v1_error_bound"].value.between(0, 1).all()
    # C_k = ||g_k||^2 cos^2 (the recorded numbers are consistent with each other).
    piv = at.pivot_table(index="group", columns="metric", values="value").loc[sorted(groups)]
    assert (piv.curvature_influence - piv.grad_norm**2 * piv.cos2_v1).abs().max() < 1e-6 * piv.curvature_influence.max()
    # Output-outliers are misfit: their loss and accuracy are the worst.
    assert piv.loss.idxmax() == "output_outlier" and piv.accuracy.idxmin() == "output_outlier"
    # Fraction of curvature: one row per parameter tensor, summing to one.
    frac = at[at.metric == "curvature_fraction"]
    assert set(frac.group) == {n for n, _ in build(quick_run.spec).model.named_parameters()}
    assert frac.value.sum() == pytest.approx(1.0, abs=1e-6)
    # Weight projection starts at t* with 0 and is recorded at each later measurement.
    t_star = int(quick_run.events.query("event == 't_star'").step.iloc[0])
    wp = quick_run.metric("weight_projection")
    assert wp.index.min() == t_star and wp.iloc[0] == 0.0 and len(wp) == len(quick_run.metric("sharpness").loc[t_star:])
    # Fraction of points whose loss rose: every step but the first, in [0, 1].
    fr = quick_run.metric("fraction_loss_increased")
    assert list(fr.index) == list(range(1, quick_run.spec.steps + 1)) and fr.between(0, 1).all()
    assert quick_run.metric("spearman_alignment_distance").between(-1, 1).all()


def test_examples_table_holds_group_members(quick_run):
    ex = quick_run.examples
    from eosbranch.tables import EXAMPLES_COLUMNS

    assert list(ex.columns) == EXAMPLES_COLUMNS
    exp = build(quick_run.spec)
    members = sorted({i for idx in exp.groups.values() for i in idx.tolist()})
    at = ex[ex.step == 200].sort_values("index")
    assert at["index"].tolist() == members
    assert set(at.group) == set(exp.groups)
    # The per-example loss matches a direct evaluation at that state.
    exp, st = at_checkpoint(quick_run, 200)
    with torch.no_grad():
        per = exp.loss_fn(exp.model(exp.data.X), exp.data.y, reduction="none").double()
    assert at.loss.to_numpy() == pytest.approx(per[members].numpy(), rel=1e-5)
    assert at.cos2_v1.between(0, 1).all() and (at.centroid_distance > 0).all()
    # loss_change is l_i(t) - l_i(t-1).
    exp.model.load_state_dict(quick_run.checkpoint(200)["model"])
    assert at.loss_change.notna().all()


# ---------------------------------------------------------------------- probes named in the spec
class _ScaleParams(__import__("eosbranch.registry", fromlist=["Params"]).Params):
    scale: float = 1.0


@pytest.fixture
def registered_probe():
    """A user probe added with the registry's decorator: each group's size times ``scale``, and
    the global v1's squared norm (1 when the context holds the global eigenvector)."""
    from eosbranch.probes import PROBES

    @PROBES.register("group_size", _ScaleParams)
    def group_size(ctx, scale):
        rows = [(name, "group_size", scale * idx.numel()) for name, idx in ctx.groups.items()]
        if ctx.v1 is not None:
            rows.append(("all", "v1_norm2", float(ctx.v1 @ ctx.v1)))
        return rows

    yield "group_size"
    del PROBES["group_size"]


def test_a_registered_probe_named_in_the_spec_runs_at_every_measurement(tmp_path, tiny_spec, registered_probe):
    import eosbranch

    groups = [{"kind": "class", "label": 0}, {"kind": "class", "label": 1}]
    tiny_spec["groups"] = groups
    tiny_spec["measure"] = {"every": 10, "sharpness": True, "extra_probes": [{"kind": "group_size", "scale": 2}]}
    run = eosbranch.train(tiny_spec, out=tmp_path)
    m = run.metrics
    rows = m[m.metric == "group_size"]
    assert sorted(rows.step.unique()) == [0, 10, 20, 30]
    X, y = _digits(tiny_spec)
    sizes = {f"class_{c}": 2.0 * int((y == c).sum()) for c in (0, 1)}  # counted here, not by the groups code
    assert rows.groupby("group").value.unique().apply(list).to_dict() == {g: [v] for g, v in sizes.items()}
    assert (m[m.metric == "v1_norm2"].value - 1.0).abs().max() < 1e-5
    assert run.spec.measure.extra_probes == [{"kind": "group_size", "scale": 2.0}]  # stored resolved


def _digits(spec):
    from eosbranch.data import load_data
    from eosbranch.spec import parse_spec

    d = load_data(parse_spec(spec).data)
    return d.X, d.y


@pytest.mark.parametrize("probes,message", [
    (["group_sise"], "measure.extra_probes[0].kind: unknown probe 'group_sise'"),
    ([{"kind": "group_size", "scal": 2}], "measure.extra_probes[0]"),
    (["groups"], "'groups' runs already"),
    (["group_size", "group_size"], "listed twice"),
])
def test_spec_errors_for_extra_probes_name_the_field(tmp_path, tiny_spec, registered_probe, probes, message):
    from eosbranch.errors import SpecError
    from eosbranch.spec import parse_spec

    tiny_spec["measure"]["extra_probes"] = probes
    with pytest.raises(SpecError, match=re.escape(message)):
        parse_spec(tiny_spec, "my.yaml")


def test_a_single_solve_warm_starts_from_v1_alone_when_the_state_keeps_top_k(tmp_path, tiny_spec, monkeypatch):
    """The fork-time solve and gradient surgery need v1 only: their warm start is the state's first
    vector, not a block of all top_k (which would cost top_k products per Lanczos step)."""
    from eosbranch import measure

    tiny_spec.update(steps=10, measure={"every": 10, "top_k": 3, "sharpness": True})
    run = eosbranch.train(tiny_spec, tmp_path)
    exp, st = at_checkpoint(run, 10)
    assert st.eig_vectors.shape[1] == 3
    seen = []
    real = measure.top_eigenpairs
    monkeypatch.setattr(measure, "top_eigenpairs", lambda H, dim, k, v0=None, **kw: seen.append(v0) or real(H, dim, k, v0=v0, **kw))
    out = measure.solve_sharpness(exp, st)
    assert seen[0].shape == (st.eig_vectors.shape[0], 1) and torch.equal(seen[0][:, 0], st.eig_vectors[:, 0])
    assert out["sharpness"] == pytest.approx(run.metric("sharpness")[10], rel=1e-2)


@pytest.mark.parametrize("mode", ["train", "heldout"])
def test_loss_change_is_the_one_step_change_of_each_trained_point(tmp_path, tiny_spec, mode):
    # Measuring every step with every example listed, l_i(t) - l_i(t-1) can be read off the table.
    tiny_spec.update(steps=6, measure={"every": 1, "sharpness": False, "examples": "all"},
                     groups={"kind": "prototypes", "per_class": 3, "mode": mode})
    run = eosbranch.train(write_spec(tmp_path / "s.yaml", tiny_spec), tmp_path / "runs")
    ex = run.examples.pivot(index="step", columns="index")
    exp = build(run.spec)
    trained = torch.arange(len(exp.data.X)) if exp.train_index is None else exp.train_index
    held = sorted(set(range(len(exp.data.X))) - set(trained.tolist()))
    assert (mode == "heldout") == bool(held)
    want = ex["loss"].diff().iloc[1:]
    got = ex["loss_change"].iloc[1:]
    np.testing.assert_allclose(got[trained.tolist()].to_numpy(), want[trained.tolist()].to_numpy(), rtol=1e-6, atol=1e-9)
    assert got[held].isna().all().all() and ex["loss_change"].iloc[0].isna().all()


def test_spearman_alignment_distance_is_recomputed_from_the_examples_table(tmp_path, tiny_spec):
    import scipy.stats

    tiny_spec.update(steps=20, measure={"every": 10, "examples": "all"},
                     groups={"kind": "prototypes", "per_class": 3})
    run = eosbranch.train(write_spec(tmp_path / "s.yaml", tiny_spec), tmp_path / "runs")
    rho = run.metric("spearman_alignment_distance")
    assert len(rho) == 3  # steps 0, 10, 20
    for step, value in rho.items():
        at = run.examples[run.examples.step == step]
        assert len(at) == len(build(run.spec).data.X)  # every point, not only the groups
        want = scipy.stats.spearmanr(at.cos2_v1, at.centroid_distance).statistic
        assert value == pytest.approx(want, rel=1e-9, abs=1e-12), step


def test_weight_projection_uses_the_reference_step_the_spec_names(tmp_path, tiny_spec):
    tiny_spec.update(dtype="float64", steps=30, measure={"every": 10, "reference": 10, "tol": 1e-8})
    run = eosbranch.train(write_spec(tmp_path / "s.yaml", tiny_spec), tmp_path / "runs")
    wp = run.metric("weight_projection")
    assert list(wp.index) == [10, 20, 30] and wp.loc[10] == 0.0
    exp, _ = at_checkpoint(run, 10)
    theta_ref = torch.cat([p.detach().reshape(-1) for p in exp.model.parameters()])
    dim = theta_ref.numel()
    v1 = top_eigenpairs(hessian_matvec(exp.model, exp.loss_fn, (exp.train_X, exp.train_y)), dim, tol=1e-10).vectors[:, 0]
    for step in (20, 30):
        later, _ = at_checkpoint(run, step)
        theta = torch.cat([p.detach().reshape(-1) for p in later.model.parameters()])
        # v1's sign is the solver's convention: compare magnitudes.
        assert abs(wp.loc[step]) == pytest.approx(abs(((theta - theta_ref) @ v1).item()), rel=1e-6)
