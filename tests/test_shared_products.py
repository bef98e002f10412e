"""Data products a measurement shares instead of repeating: v1's tangents (first-layer, hidden,
output) recombined from the solve's own products (MLPBackend.tangents_along), exact against the
direct product x V1^T + c1 and torch.func.jvp, refused for a vector outside the products' span, the
caps, and what the Taylor and per-example passes then read (with the cached Linear outputs); and
the data's Gram with the groups' rows, kept across measurements while the data are unchanged. Every value is checked against dense oracles."""

from __future__ import annotations

import gc

import pytest
import torch
from torch import nn

from eosbranch.curvature import hessian_matvec, records, taylor, top_eigenpairs, unflatten
from eosbranch.probes import Context, group_probes

try:  # tests/ is on sys.path under pytest's default (rootdir-less) import mode
    from oracles import Dense, rows_to_dict, sharpness_gradient
except ImportError:  # pragma: no cover
    from tests.oracles import Dense, rows_to_dict, sharpness_gradient

F64 = torch.float64
GROUPS = {"a": torch.arange(0, 6), "b": torch.tensor([2, 9, 15, 21]), "c": torch.arange(24, 30)}


@pytest.fixture(autouse=True)
def many_rows(monkeypatch):
    # Cold solves of these tiny models take 7-30 products at tight tolerances; the trainer's warm
    # solves take a few (test_a_warm_solve_recombines_within_the_default_caps keeps the default).
    monkeypatch.setattr(records, "MAX_ROWS", 64)


def mlp_and_data(n: int = 30):
    """Two hidden tanh layers (so tangents pass a hidden Linear) and a two-class MSE task; the input
    layer wide enough that the groups take the low-rank (factor) route there, as on real data."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    model = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 5), nn.Tanh(), nn.Linear(5, 2)).to(F64)
    return model, torch.randn(n, 20, generator=g, dtype=F64), torch.randint(0, 2, (n,), generator=g)


def solved(model, X, y, tol=1e-10):
    H = hessian_matvec(model, "mse", (X, y), record=True)
    res = top_eigenpairs(H, H.dim, tol=tol)
    return H, res.vectors[:, 0]


def first(H, v):
    t = H.backend.tangents_along(v)
    return None if t is None else t["first"]


def direct_first_tangent(model, X, v):
    W, b = unflatten(v, [p for p in model.parameters()])[:2]
    return X @ W.T + b


def test_tangents_of_the_ritz_vector_equal_the_direct_products():
    model, X, y = mlp_and_data()
    H, v1 = solved(model, X, y)
    got = first(H, v1)
    assert got is not None and H.backend.records.rows >= 3  # several products were recombined
    torch.testing.assert_close(got, direct_first_tangent(model, X, v1), rtol=1e-11, atol=1e-12)
    d = Dense(model, "mse", X, y)  # R{f} along v1: the jvp of the outputs (torch.func, not eosbranch)
    _, Rf = torch.func.jvp(lambda f: d.out(f, X), (d.theta,), (v1,))
    torch.testing.assert_close(H.backend.tangents_along(v1)["output"], Rf, rtol=1e-11, atol=1e-12)
    # Any scale of a vector in the span recombines too (the Context normalises its v1).
    torch.testing.assert_close(first(H, -2.5 * v1), -2.5 * direct_first_tangent(model, X, v1),
                               rtol=1e-11, atol=1e-12)


def test_a_vector_outside_the_products_span_is_refused():
    model, X, y = mlp_and_data()
    H, v1 = solved(model, X, y, tol=1e-2)  # few products: their span is a small subspace
    other = torch.randn(H.dim, dtype=F64, generator=torch.Generator().manual_seed(5))
    assert first(H, other) is None
    assert first(hessian_matvec(model, "mse", (X, y), record=True), v1) is None  # no products yet
    plain = hessian_matvec(model, "mse", (X, y))  # not a measurement's operator: nothing is kept
    top_eigenpairs(plain, plain.dim, tol=1e-2)
    assert plain.backend.records is None and first(plain, v1) is None


@pytest.mark.parametrize("cap", ["RECORD_BYTES", "MAX_ROWS"])
def test_records_past_a_cap_stop_and_the_passes_multiply_the_data(monkeypatch, cap):
    model, X, y = mlp_and_data()
    monkeypatch.setattr(records, cap, 1 if cap == "RECORD_BYTES" else 2)
    H, v1 = solved(model, X, y)
    assert H.backend.records.disabled and H.backend.records.rows == 0 and first(H, v1) is None
    ctx = Context(model, "mse", X, y, GROUPS, v1, operator=H)
    assert ctx.forward is not None and ctx.tangents_v1 is None
    J = Dense(model, "mse", X, y).per_example_grads()
    torch.testing.assert_close(ctx.per_example_projection, J @ (v1 / v1.norm()), rtol=1e-10, atol=1e-12)


def test_no_records_over_a_subset_or_chunks():
    model, X, y = mlp_and_data()
    for kw in ({"subset": torch.arange(10)}, {"chunk_size": 7}):
        H = hessian_matvec(model, "mse", (X, y), **kw, record=True)
        v1 = top_eigenpairs(H, H.dim, tol=1e-8).vectors[:, 0]
        assert H.backend.records.rows == 0 and first(H, v1) is None


def test_measurement_passes_read_the_recombined_tangent_and_match_dense_oracles():
    model, X, y = mlp_and_data()
    H, v1 = solved(model, X, y)
    v = v1 / v1.norm()
    ctx = Context(model, "mse", X, y, GROUPS, v1, operator=H)
    assert ctx.tangents_v1 is not None
    rows = rows_to_dict(group_probes(ctx))
    d = Dense(model, "mse", X, y)
    J = d.per_example_grads()
    dS = sharpness_gradient(d.mean_loss, d.theta, v)
    for name, idx in GROUPS.items():
        g = J[idx].mean(0)
        assert rows[(name, "sharpness_coupling")] == pytest.approx((g @ dS).item(), rel=1e-9, abs=1e-12)
        assert rows[(name, "cos2_v1")] == pytest.approx(((g @ v) ** 2 / (g @ g)).item(), rel=1e-9)
    torch.testing.assert_close(ctx.per_example_projection, J @ v, rtol=1e-10, atol=1e-12)


def test_the_passes_use_the_recombined_tangent_rather_than_a_product_of_their_own(monkeypatch):
    # Wiring: a deliberately wrong recombined tangent (zeros) must show in what the passes return,
    # so a pass that silently recomputed x V1^T would fail here.
    model, X, y = mlp_and_data()
    H, v1 = solved(model, X, y)
    honest = Context(model, "mse", X, y, GROUPS, v1, operator=H)
    honest_proj, honest_rows = honest.per_example_projection, rows_to_dict(group_probes(honest))
    monkeypatch.setattr(type(H.backend), "tangents_along", lambda self, v: {
        "first": torch.zeros(X.shape[0], 16, dtype=F64), "output": torch.zeros(X.shape[0], 2, dtype=F64)})
    ctx = Context(model, "mse", X, y, GROUPS, v1, operator=H)
    # With R{z1} = 0 only the later layers' tangents move the coupling; with R{f} = 0 every
    # projection is 0.
    assert not torch.allclose(ctx.per_example_projection, honest_proj)
    assert rows_to_dict(group_probes(ctx))[("a", "sharpness_coupling")] != pytest.approx(
        honest_rows[("a", "sharpness_coupling")], rel=1e-6)


def _coupling_against_dense(model, X, y):
    H, v1 = solved(model, X, y)
    ctx = Context(model, "mse", X, y, GROUPS, v1, operator=H)
    rows = rows_to_dict(group_probes(ctx))
    d = Dense(model, "mse", X, y)
    J = d.per_example_grads()
    v = v1 / v1.norm()
    dS = sharpness_gradient(d.mean_loss, d.theta, v)
    Hd = d.hessian()
    for name, idx in GROUPS.items():
        g = J[idx].mean(0)
        assert rows[(name, "sharpness_coupling")] == pytest.approx((g @ dS).item(), rel=1e-9, abs=1e-12)
        assert rows[(name, "rayleigh")] == pytest.approx((g @ Hd @ g / (g @ g)).item(), rel=1e-9)


def test_the_groups_gram_is_kept_across_measurements_and_renewed_when_the_data_change():
    model, X, y = mlp_and_data()
    _coupling_against_dense(model, X, y)
    kept = taylor._last_gram[0][3]
    with torch.no_grad():  # the next measurement: the parameters moved, the data did not
        for p in model.parameters():
            p.mul_(1.1)
    _coupling_against_dense(model, X, y)
    assert taylor._last_gram[0][3] is kept
    with torch.no_grad():
        X.mul_(0.9)  # data changed in place: the kept Gram must not be read
    _coupling_against_dense(model, X, y)
    assert taylor._last_gram[0][3] is not kept and taylor._last_gram[0][0]() is X
    del X, kept
    gc.collect()
    assert not taylor._last_gram  # released with its data


def test_block_products_recombine_each_ritz_vector():
    # Top-2: the solver multiplies blocks of two vectors per product; each Ritz vector recombines.
    model, X, y = mlp_and_data()
    H = hessian_matvec(model, "mse", (X, y), record=True)
    res = top_eigenpairs(H, H.dim, k=2, tol=1e-10)
    assert H.backend.records.rows == res.n_matvecs
    for j in range(2):
        v = res.vectors[:, j]
        torch.testing.assert_close(first(H, v), direct_first_tangent(model, X, v), rtol=1e-11, atol=1e-12)


def test_a_warm_solve_recombines_within_the_default_caps(monkeypatch):
    monkeypatch.setattr(records, "MAX_ROWS", 8)  # the default
    model, X, y = mlp_and_data()
    _, v_prev = solved(model, X, y)
    with torch.no_grad():  # the next measurement: the parameters moved a little
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(7), dtype=F64))
    H = hessian_matvec(model, "mse", (X, y), record=True)
    res = top_eigenpairs(H, H.dim, tol=1e-3, v0=v_prev)
    assert 2 <= res.n_matvecs <= records.MAX_ROWS == 8
    v1 = res.vectors[:, 0]
    torch.testing.assert_close(first(H, v1), direct_first_tangent(model, X, v1), rtol=1e-11, atol=1e-12)


def test_float32_recombination_on_a_wider_model():
    # The default dtype at the protocol's first layer (3072 x 512, 1.6 M parameters): a float32
    # Gram of the recorded vectors is good to ~1e-4 there, too coarse for the span test (what once
    # made every measurement fall back); the float64 blocks must accept v1 and reproduce the direct
    # product to float32 rounding. Few points keep the products cheap.
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(3072, 512), nn.ReLU(), nn.Linear(512, 2))
    X, y = torch.randn(120, 3072, generator=g), torch.randint(0, 2, (120,), generator=g)
    H = hessian_matvec(model, "mse", (X, y), record=True)
    v1 = top_eigenpairs(H, H.dim, tol=1e-3).vectors[:, 0]
    assert H.dim > 1_500_000 and v1.dtype == torch.float32 and H.backend.records.rows >= 2
    torch.testing.assert_close(first(H, v1), direct_first_tangent(model, X, v1), rtol=1e-4, atol=1e-5)


def test_the_trainers_measurements_recombine(monkeypatch, tmp_path, tiny_spec):
    # Wiring: the trainer's operator keeps its products (measure.training_hessian(record=True)) and
    # its probes read v1's tangents from them.
    import eosbranch

    seen = []
    along = records.ProductRecords.along
    monkeypatch.setattr(records.ProductRecords, "along", lambda self, v: seen.append(along(self, v)) or seen[-1])
    tiny_spec.update(steps=20, groups="classes", measure={"every": 10, "sharpness": True})
    eosbranch.train(tiny_spec, tmp_path)
    assert seen and all(t is not None for t in seen)


def test_hidden_tangents_recombine_to_the_jvp_of_the_hidden_layer():
    # R{z_2} along v1 (the second Linear's output): recombined, against torch.func.jvp of the
    # model truncated after that layer.
    model, X, y = mlp_and_data()
    H, v1 = solved(model, X, y)
    got = H.backend.tangents_along(v1)
    assert set(got) == {"first", "linear1", "linear2", "output"}
    torch.testing.assert_close(got["linear2"], got["output"], rtol=0, atol=0)  # no activation after it
    d = Dense(model, "mse", X, y)
    head = model[:3]  # Linear, Tanh, Linear
    names = [n for n, _ in head.named_parameters()]
    like = [p.detach() for p in head.parameters()]
    k = sum(p.numel() for p in like)

    def z2(flat):
        return torch.func.functional_call(head, dict(zip(names, unflatten(flat, like))), (X,))

    _, Rz2 = torch.func.jvp(z2, (d.theta[:k],), (v1[:k],))
    torch.testing.assert_close(got["linear1"], Rz2, rtol=1e-11, atol=1e-12)


def test_the_taylor_pass_reads_the_hidden_tangent_and_the_cached_pre_activations(monkeypatch):
    # Wiring: a wrong recombined R{z_2} (zeros), or a wrong cached pre-activation z_2, must change
    # Q_k, so a pass that silently recomputed either would fail here. The honest values match the
    # dense oracles (test_measurement_passes_read_the_recombined_tangent_and_match_dense_oracles).
    model, X, y = mlp_and_data()
    H, v1 = solved(model, X, y)
    honest = rows_to_dict(group_probes(Context(model, "mse", X, y, GROUPS, v1, operator=H)))
    real = type(H.backend).tangents_along
    with monkeypatch.context() as m:
        m.setattr(type(H.backend), "tangents_along",
                  lambda self, v: {**real(self, v), "linear1": torch.zeros(X.shape[0], 5, dtype=F64)})
        wrong = rows_to_dict(group_probes(Context(model, "mse", X, y, GROUPS, v1, operator=H)))
    assert wrong[("a", "sharpness_coupling")] != pytest.approx(honest[("a", "sharpness_coupling")], rel=1e-6)
    fwd = H.backend.shared_forward()
    fwd.pre[1] = torch.zeros_like(fwd.pre[1])
    wrong = rows_to_dict(group_probes(Context(model, "mse", X, y, GROUPS, v1, operator=H)))
    assert wrong[("a", "sharpness_coupling")] != pytest.approx(honest[("a", "sharpness_coupling")], rel=1e-6)
    assert wrong[("a", "rayleigh")] != pytest.approx(honest[("a", "rayleigh")], rel=1e-6)


def test_past_the_byte_cap_the_hidden_tangents_go_first(monkeypatch):
    # Room for every row without the hidden tangents, not with them: "first" and "output" are kept
    # (they save products with the data), "linear1" is dropped, and the passes still match the oracles.
    model, X, y = mlp_and_data()
    n, dim = X.shape[0], sum(p.numel() for p in model.parameters())
    without = (dim + n * 16 + n * 2) * 8  # float64 bytes of one row of inputs, "first", "output"
    monkeypatch.setattr(records, "RECORD_BYTES", 16 * without)  # 16 rows without "linear1/2", 13 with them
    H, v1 = solved(model, X, y)  # 16 products
    rec = H.backend.records
    assert not rec.disabled and rec.rows > 16 * without // (without + n * (5 + 2) * 8)
    got = H.backend.tangents_along(v1)
    assert set(got) == {"first", "output"}
    torch.testing.assert_close(got["first"], direct_first_tangent(model, X, v1), rtol=1e-11, atol=1e-12)
    _coupling_against_dense(model, X, y)


@pytest.mark.parametrize("last", [nn.Sigmoid, nn.Softplus])
def test_a_trailing_activation_is_not_taken_for_the_last_linear(last):
    # R{f} is the tangent after the trailing activation: the Taylor pass must not read it as the
    # last Linear's (which once applied the activation twice along v1).
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(2)
    model = nn.Sequential(nn.Linear(20, 16), nn.Tanh(), nn.Linear(16, 5), nn.Tanh(), nn.Linear(5, 2), last()).to(F64)
    X, y = torch.randn(30, 20, generator=g, dtype=F64), torch.randint(0, 2, (30,), generator=g)
    H, v1 = solved(model, X, y)
    assert "output" in H.backend.tangents_along(v1)
    _coupling_against_dense(model, X, y)
