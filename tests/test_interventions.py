"""Each intervention kind against an oracle computed independently from the parent's state."""

import copy

import numpy as np
import pytest
import torch

import eosbranch
from eosbranch.curvature import flatten, hessian_matvec, top_eigenpairs
from eosbranch.errors import EosbranchError
from eosbranch.fork import load_branches
from eosbranch.loss import get_loss
from eosbranch.spec import parse_spec
from eosbranch.experiment import build

S = 10  # fork step: a checkpoint step of the parent, so its exact state is at hand


@pytest.fixture(scope="module")
def parent(tmp_path_factory, request):
    from conftest import TINY

    spec = copy.deepcopy(TINY)
    spec.update(steps=20, dtype="float64", groups={"kind": "prototypes", "per_class": 2, "knn_k": 8},
                checkpoint={"every": 5}, measure={"every": 2, "sharpness": True, "tol": 1e-8})
    return eosbranch.train(spec, tmp_path_factory.mktemp("interventions"))


def state_at(run, step):
    """The experiment of ``run`` with the parameters of its checkpoint at ``step``."""
    exp = build(run.spec)
    exp.model.load_state_dict(run.checkpoint(step)["model"])
    return exp


def fork1(parent, *interventions, steps=4, name="b"):
    (b,) = eosbranch.fork(parent, at=("step", S), branches={"name": name, "interventions": list(interventions)},
                          steps=steps)
    return b


def params_at(run, step):
    return flatten(list(run.checkpoint(step)["model"].values()))


def test_enter_eos_sets_the_threshold_below_the_sharpness(parent):
    b = fork1(parent, {"kind": "enter_eos", "margin": 1.5}, name="enter")
    s, thr = b.metric("sharpness")[S], b.metric("threshold")[S]
    assert s / thr == pytest.approx(1.5, rel=1e-6)
    assert b.metrics.lr.iloc[-1] == pytest.approx(1.5 * 2 / s, rel=1e-6)


def test_stable_margin_sets_the_threshold_above_the_sharpness(parent):
    b = fork1(parent, {"kind": "lr", "stable_margin": 0.5}, name="margin")
    assert b.metric("sharpness")[S] / b.metric("threshold")[S] == pytest.approx(0.5, rel=1e-6)


def test_loss_switch_trains_on_cross_entropy(parent):
    b = fork1(parent, {"kind": "loss_switch", "to": "ce"}, name="ce")
    exp = state_at(parent, S)
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(exp.model(exp.train_X), exp.train_y).item()
    assert b.metric("loss")[S] == pytest.approx(expected, rel=1e-12)
    assert b.metric("loss")[S] != parent.metric("loss")[S]


def test_label_flip_flips_the_group(parent):
    b = fork1(parent, {"kind": "label_flip", "group": "inlier"}, name="flip")
    exp = state_at(parent, S)
    y = exp.data.y.clone()
    y[exp.groups["inlier"]] = 1 - y[exp.groups["inlier"]]
    with torch.no_grad():
        expected = get_loss("mse")(exp.model(exp.data.X), y).item()
    assert b.metric("loss")[S] == pytest.approx(expected, rel=1e-12)


def test_reweight_zero_is_training_without_the_group(parent):
    b = fork1(parent, {"kind": "reweight", "group": "output_outlier", "weight": 0.0}, name="drop")
    exp = state_at(parent, S)
    keep = torch.ones(len(exp.data.X), dtype=torch.bool)
    keep[exp.groups["output_outlier"]] = False
    X, y = exp.data.X[keep], exp.data.y[keep]
    with torch.no_grad():
        assert b.metric("loss")[S] == pytest.approx(get_loss("mse")(exp.model(X), y).item(), rel=1e-12)
    dim = sum(p.numel() for p in exp.params)
    top = top_eigenpairs(hessian_matvec(exp.model, "mse", (X, y)), dim, tol=1e-10).values[0].item()
    assert b.metric("sharpness")[S] == pytest.approx(top, rel=1e-6)  # the Hessian of the reweighted loss
    # Weight 2 doubles the group's terms: sum w l / sum w.
    b2 = fork1(parent, {"kind": "reweight", "group": "output_outlier", "weight": 2.0}, name="double")
    with torch.no_grad():
        per = get_loss("mse")(exp.model(exp.data.X), exp.data.y, reduction="none")
    w = torch.ones_like(per)
    w[exp.groups["output_outlier"]] = 2.0
    assert b2.metric("loss")[S] == pytest.approx(((per * w).sum() / w.sum()).item(), rel=1e-12)


def test_optimizer_switch_matches_torch_optim(parent):
    b = fork1(parent, {"kind": "optimizer_switch", "to": {"kind": "momentum", "lr": 0.01, "beta": 0.9},
                       "state": "fresh"}, steps=5, name="mom")
    exp = state_at(parent, S)
    opt = torch.optim.SGD(exp.params, lr=0.01, momentum=0.9)
    for _ in range(5):
        opt.zero_grad()
        exp.loss_fn(exp.model(exp.train_X), exp.train_y).backward()
        opt.step()
    assert torch.allclose(flatten(exp.params), params_at(b, S + 5), rtol=0, atol=1e-12)
    assert b.metric("threshold")[S] == pytest.approx((2 + 2 * 0.9) / 0.01)
    with pytest.raises(EosbranchError, match="optimizer_switch.state: cannot carry"):
        fork1(parent, {"kind": "optimizer_switch", "to": {"kind": "adam", "lr": 0.001}, "state": "carried"},
              name="adam_carried")


def test_optimizer_switch_to_adam_matches_torch_optim(parent):
    b = fork1(parent, {"kind": "optimizer_switch", "to": {"kind": "adam", "lr": 0.001}, "state": "fresh"},
              steps=5, name="to_adam")
    exp = state_at(parent, S)
    opt = torch.optim.Adam(exp.params, lr=0.001)
    for _ in range(5):
        opt.zero_grad()
        exp.loss_fn(exp.model(exp.train_X), exp.train_y).backward()
        opt.step()
    assert torch.allclose(flatten(exp.params), params_at(b, S + 5), rtol=0, atol=1e-12)
    assert b.metric("threshold")[S] == pytest.approx(38 / 0.001)  # (2 + 2 beta1) / ((1 - beta1) eta)
    assert "preconditioned_sharpness" in set(b.metrics.metric)


def test_optimizer_switch_to_splitsgd_matches_the_papers_rule(parent):
    """GD -> SplitSGD, fresh state, against the rule written out here: m <- beta m + (1 - tau) g,
    m_hat = m (1 - beta) / ((1 - tau)(1 - beta^t)), r = 10% quantile of |g_1| (linear), and each
    parameter steps by -eta_2 sign(m_hat) where |m_hat| > r, else by -eta_1 m_hat."""
    eta1, eta2, beta, tau = 0.05, 0.001, 0.9, 0.9
    b = fork1(parent, {"kind": "optimizer_switch", "to": {"kind": "splitsgd", "lr": eta1, "lr_sign": eta2},
                       "state": "fresh"}, steps=4, name="to_split")
    exp = state_at(parent, S)
    m = [torch.zeros_like(p) for p in exp.params]
    r = None
    for t in range(1, 5):
        g = torch.autograd.grad(exp.loss_fn(exp.model(exp.train_X), exp.train_y), exp.params)
        if r is None:
            r = float(np.quantile(torch.cat([x.abs().flatten() for x in g]).numpy(), 0.1))
        with torch.no_grad():
            for p, mi, gi in zip(exp.params, m, g):
                mi.mul_(beta).add_((1 - tau) * gi)
                m_hat = mi * (1 - beta) / ((1 - tau) * (1 - beta ** t))
                p -= torch.where(m_hat.abs() > r, eta2 * m_hat.sign(), eta1 * m_hat)
    assert torch.allclose(flatten(exp.params), params_at(b, S + 4), rtol=0, atol=1e-12)
    assert b.checkpoint(S + 4)["optimizer"]["r"].item() == pytest.approx(r, rel=1e-12)


@pytest.fixture(scope="module")
def ce_momentum_parent(tmp_path_factory):
    from conftest import TINY

    spec = copy.deepcopy(TINY)
    spec.update(steps=12, dtype="float64", loss="ce", optimizer={"kind": "momentum", "lr": 0.05, "beta": 0.9},
                checkpoint={"every": 5}, measure={"every": 4, "sharpness": False})
    return eosbranch.train(spec, tmp_path_factory.mktemp("ce_momentum"))


def test_optimizer_switch_carries_the_momentum_buffer(ce_momentum_parent):
    """momentum (beta 0.9, lr 0.05) -> momentum (beta 0.5, lr 0.02) with the state carried: the
    parent's buffer at the fork continues, as torch.optim.SGD given that buffer."""
    parent = ce_momentum_parent
    b = fork1(parent, {"kind": "optimizer_switch", "to": {"kind": "momentum", "lr": 0.02, "beta": 0.5},
                       "state": "carried"}, steps=5, name="carried")
    exp = state_at(parent, S)
    buf = parent.checkpoint(S)["optimizer"]["buf"]
    assert any(x.abs().max() > 0 for x in buf)
    opt = torch.optim.SGD(exp.params, lr=0.02, momentum=0.5)
    for p, x in zip(exp.params, buf):
        opt.state[p]["momentum_buffer"] = x.clone()
    for _ in range(5):
        opt.zero_grad()
        exp.loss_fn(exp.model(exp.train_X), exp.train_y).backward()
        opt.step()
    assert torch.allclose(flatten(exp.params), params_at(b, S + 5), rtol=0, atol=1e-12)
    assert b.metrics.lr.unique().tolist() == [0.02]
    # fresh instead: the first step of the new optimizer copies the gradient into a zero buffer.
    fresh = fork1(parent, {"kind": "optimizer_switch", "to": {"kind": "momentum", "lr": 0.02, "beta": 0.5},
                           "state": "fresh"}, steps=1, name="fresh")
    exp = state_at(parent, S)
    g = flatten(torch.autograd.grad(exp.loss_fn(exp.model(exp.train_X), exp.train_y), exp.params))
    assert torch.allclose(params_at(fresh, S + 1), params_at(parent, S) - 0.02 * g, rtol=0, atol=1e-12)


def test_loss_switch_from_cross_entropy_to_mse(ce_momentum_parent):
    parent = ce_momentum_parent
    b = fork1(parent, {"kind": "loss_switch", "to": "mse"}, steps=2, name="to_mse")
    exp = state_at(parent, S)
    with torch.no_grad():
        out = exp.model(exp.train_X)
        onehot = torch.nn.functional.one_hot(exp.train_y, out.shape[1]).to(out.dtype)
        expected = ((out - onehot) ** 2).sum(1).mean().item()  # DESIGN §2: sum over outputs, mean over samples
    assert b.metric("loss")[S] == pytest.approx(expected, rel=1e-12)
    assert parent.metric("loss")[S] == pytest.approx(
        torch.nn.functional.cross_entropy(out, exp.train_y).item(), rel=1e-12)


def test_whole_update_surgery_removes_the_v1_component(parent):
    b = fork1(parent, {"kind": "gradient_surgery"}, steps=1, name="surg_all")
    exp = state_at(parent, S)
    dim = sum(p.numel() for p in exp.params)
    v1 = top_eigenpairs(hessian_matvec(exp.model, "mse", (exp.train_X, exp.train_y)), dim, tol=1e-10).vectors[:, 0]
    step = params_at(b, S + 1) - params_at(parent, S)
    g = flatten(torch.autograd.grad(exp.loss_fn(exp.model(exp.train_X), exp.train_y), exp.params))
    assert abs(step @ v1) <= 1e-6 * step.norm()
    assert torch.allclose(step, -0.05 * (g - (g @ v1) * v1), atol=1e-8)
    cert = b.events.query("event == 'certificate_surgery'")
    assert len(cert) == 1 and cert.value.iloc[0] <= 1e-6


def test_group_surgery_removes_only_the_groups_component(parent):
    b = fork1(parent, {"kind": "gradient_surgery", "group": "input_outlier"}, steps=1, name="surg_group")
    exp = state_at(parent, S)
    dim = sum(p.numel() for p in exp.params)
    v1 = top_eigenpairs(hessian_matvec(exp.model, "mse", (exp.train_X, exp.train_y)), dim, tol=1e-10).vectors[:, 0]
    per = exp.loss_fn(exp.model(exp.data.X), exp.data.y, reduction="none")
    n = len(per)
    g = flatten(torch.autograd.grad(per.mean(), exp.params, retain_graph=True))
    c = flatten(torch.autograd.grad(per[exp.groups["input_outlier"]].sum() / n, exp.params))
    step = params_at(b, S + 1) - params_at(parent, S)
    assert torch.allclose(step, -0.05 * (g - (c @ v1) * v1), atol=1e-8)
    removed = b.metrics.query("metric == 'surgery_removed' and step == @S").value.iloc[0]
    assert removed == pytest.approx((c @ v1).item(), rel=1e-4)


def test_random_direction_moves_outliers_orthogonally_at_equal_distance(parent):
    exp0 = build(parent.spec)
    exp = build(parent.spec)
    (b,) = load_branches("random_direction")
    (iv,) = b.compose()
    exp = iv.configure(exp)
    idx = exp.groups["input_outlier"]
    v = exp0.group_info["v_diff"]
    alpha = exp0.group_info["alpha"]["input_outlier"]
    sign = (2 * exp0.data.y[idx].double() - 1)[:, None]
    source = exp0.data.X[idx].flatten(1).double() - sign * alpha * v
    disp = exp.data.X[idx].flatten(1).double() - source
    assert (disp @ v).abs().max() <= 1e-6 * v.norm()
    assert disp.norm(dim=1) == pytest.approx(torch.full((len(idx),), alpha * v.norm().item()), rel=1e-6)
    others = torch.ones(len(exp.data.X), dtype=torch.bool)
    others[idx] = False
    assert torch.equal(exp.data.X[others], exp0.data.X[others])
    # As a fork: the certificate records cos2 before/after, its percentile, and the distances.
    br = fork1(parent, {"kind": "random_direction", "group": "input_outlier"}, name="rd")
    names = set(br.events.event)
    assert {"certificate_perturbation_cos2_before", "certificate_perturbation_cos2_after",
            "certificate_perturbation_percentile", "certificate_perturbation_distance_before",
            "certificate_perturbation_distance_after"} <= names


def dense_top(exp, X, y):
    """The top eigenpair of the dense Hessian of the mean loss on (X, y) (torch.func.hessian + eigh)."""
    named = [(n, p) for n, p in exp.model.named_parameters()]
    theta = flatten([p for _, p in named]).detach()

    def loss(flat):
        params, i = {}, 0
        for n, p in named:
            params[n] = flat[i:i + p.numel()].view_as(p)
            i += p.numel()
        return exp.loss_fn(torch.func.functional_call(exp.model, params, (X,)), y)

    w, V = torch.linalg.eigh(torch.func.hessian(loss)(theta))
    return w[-1].item(), V[:, -1]


def group_cos2(exp, X, y, idx, v1):
    g = flatten(torch.autograd.grad(exp.loss_fn(exp.model(X[idx]), y[idx]), exp.params))
    return ((g @ v1) ** 2 / (g @ g)).item()


def test_perturbation_certificate_values_against_dense_hessians(parent):
    """Certificate 3 of random_direction, value by value: cos2 of the group's gradient with the top
    eigenvector of the dense Hessian before (original data) and after (moved data), its percentile
    under Beta(1/2, (d-1)/2), and the median (np.median: 4 points) distance to the class centroid."""
    from scipy.stats import beta

    br = fork1(parent, {"kind": "random_direction", "group": "input_outlier", "seed": 3}, name="rd_values")
    ev = br.events.set_index("event")
    before, after = state_at(parent, S), state_at(parent, S)
    (iv,) = load_branches({"name": "x", "interventions": [{"kind": "random_direction", "seed": 3}]})[0].compose()
    after = iv.configure(after)
    idx = before.groups["input_outlier"]
    dim = sum(p.numel() for p in before.params)
    values = {}
    for name, exp in (("before", before), ("after", after)):
        X, y = exp.data.X, exp.data.y
        _, v1 = dense_top(exp, X, y)
        values[name] = group_cos2(exp, X, y, idx, v1)
        mu = before.group_info["mu"]
        d = (X[idx].flatten(1).double() - mu[y[idx]]).norm(dim=1)
        assert ev.loc[f"certificate_perturbation_distance_{name}", "value"] == pytest.approx(
            float(np.median(d.numpy())), rel=1e-12)
    assert values["before"] != pytest.approx(values["after"], rel=1e-3)  # the move changed the alignment
    for name, v in values.items():
        assert ev.loc[f"certificate_perturbation_cos2_{name}", "value"] == pytest.approx(v, rel=1e-5, abs=1e-9)
    pct = 100 * beta.cdf(values["after"], 0.5, (dim - 1) / 2)
    assert ev.loc["certificate_perturbation_percentile", "value"] == pytest.approx(pct, rel=1e-4, abs=1e-6)
    # The distance the move preserves: every point stays alpha * ||v_diff|| from its source.
    moved = after.data.X[idx].flatten(1).double() - before.data.X[idx].flatten(1).double()
    assert moved.norm(dim=1).max() > 0


def test_fork_state_certificate_values_against_direct_evaluation(parent):
    """Certificate 2's inputs, recorded by a branch at the fork before its change: the full-loss
    gradient norm and each group's gradient norm and cos2 with v1 of the dense Hessian."""
    b = fork1(parent, {"kind": "label_flip", "group": "inlier"}, steps=1, name="flip_state")
    rows = b.events.query("event == 'fork_state'").set_index("detail").value
    exp = state_at(parent, S)
    X, y = exp.data.X, exp.data.y
    _, v1 = dense_top(exp, X, y)
    g = flatten(torch.autograd.grad(exp.loss_fn(exp.model(X), y), exp.params))
    assert rows["loss/all"] == parent.metric("loss")[S]  # bit for bit: the replay check
    assert rows["grad_norm/all"] == pytest.approx(g.norm().item(), rel=1e-10)
    for name, idx in exp.groups.items():
        gk = flatten(torch.autograd.grad(exp.loss_fn(exp.model(X[idx]), y[idx]), exp.params))
        assert rows[f"grad_norm/{name}"] == pytest.approx(gk.norm().item(), rel=1e-10)
        assert rows[f"cos2_v1/{name}"] == pytest.approx(((gk @ v1) ** 2 / (gk @ gk)).item(), rel=1e-5, abs=1e-9)


def test_random_cos2_percentile_matches_sampling():
    from eosbranch.certificate import random_cos2_percentile

    g = torch.Generator().manual_seed(0)
    d = 50
    z = torch.randn(20000, d, generator=g, dtype=torch.float64)
    c = (z[:, 0] / z.norm(dim=1)) ** 2
    q = c.quantile(0.9).item()
    assert random_cos2_percentile(q, d) == pytest.approx(90.0, abs=1.0)


def test_branches_with_interventions_resume_bit_for_bit(parent, tmp_path):
    """Extending a finished branch resumes it from its checkpoint and re-applies its interventions
    (data, weights, gradient transform): the result equals one uninterrupted branch."""
    ivs = [{"kind": "reweight", "group": "boundary", "weight": 3.0},
           {"kind": "gradient_surgery", "group": "input_outlier", "refresh_every": 2},
           {"kind": "random_direction"}]
    short = fork1(parent, *ivs, steps=3, name="combo")
    longer = fork1(parent, *ivs, steps=8, name="combo")  # resumes from step 13 (last) to 18
    assert longer.path == short.path
    import shutil

    other = tmp_path / "copy"
    shutil.copytree(parent.path, other / parent.name, ignore=shutil.ignore_patterns("*--*"))
    (straight,) = eosbranch.fork(other / parent.name, at=("step", S), branches={"name": "combo", "interventions": ivs},
                                 steps=8)
    assert torch.equal(params_at(longer, S + 8), params_at(straight, S + 8))
    cols = ["step", "group", "metric", "value"]
    a = longer.metrics[cols].sort_values(cols[:3]).reset_index(drop=True)
    c = straight.metrics[cols].sort_values(cols[:3]).reset_index(drop=True)
    assert a.equals(c)


def test_intervention_errors_name_the_field(parent, tmp_path):
    bad = tmp_path / "b.yaml"
    bad.write_text("name: x\ninterventions: [{kind: reweight, group: inlier, weight: -1}]\n")
    with pytest.raises(eosbranch.errors.SpecError, match=r"b.yaml: interventions\[0\].weight"):
        load_branches(bad)
    bad.write_text("name: x\ninterventions: [{kind: optimizer_switch, to: {kind: adam, lr: 0.1}}]\n")
    with pytest.raises(eosbranch.errors.SpecError, match=r"interventions\[0\].state"):
        load_branches(bad)
    with pytest.raises(EosbranchError, match="label_flip.group: no group 'nope'"):
        fork1(parent, {"kind": "label_flip", "group": "nope"}, name="nope")
