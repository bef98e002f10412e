"""Each optimizer's update against a hand computation (and torch.optim where one exists)."""

import pytest
import torch

from eosbranch.optimizer import build_optimizer


def _run(section, grads_seq, theta0):
    opt = build_optimizer(section)
    params = [theta0.clone()]
    state = opt.init(params)
    history = []
    for g in grads_seq:
        opt.update(params, [g.clone()], state, section["lr"])
        history.append(params[0].clone())
    return history, state, opt


G = [torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.5]), torch.tensor([-1.0, 3.0])]
T0 = torch.tensor([0.0, 1.0])


def test_gd_hand():
    hist, _, _ = _run({"kind": "gd", "lr": 0.1}, G, T0)
    assert torch.allclose(hist[0], torch.tensor([-0.1, 1.2]))
    assert torch.allclose(hist[2], T0 - 0.1 * (G[0] + G[1] + G[2]))


def test_momentum_with_dampening_hand():
    beta, tau, lr = 0.9, 0.3, 0.1
    hist, _, opt = _run({"kind": "momentum", "lr": lr, "beta": beta, "dampening": tau}, G, T0)
    b1 = G[0]  # the first buffer is the gradient itself (as torch.optim.SGD)
    b2 = beta * b1 + (1 - tau) * G[1]
    b3 = beta * b2 + (1 - tau) * G[2]
    assert torch.allclose(hist[0], T0 - lr * b1)
    assert torch.allclose(hist[1], T0 - lr * (b1 + b2))
    assert torch.allclose(hist[2], T0 - lr * (b1 + b2 + b3))
    assert opt.threshold(lr) == pytest.approx((2 + 2 * beta) / ((1 - tau) * lr))


@pytest.mark.parametrize("nesterov,tau", [(False, 0.0), (False, 0.5), (True, 0.0)])
def test_momentum_matches_torch_optim(nesterov, tau):
    lr, beta = 0.05, 0.8
    hist, _, _ = _run({"kind": "momentum", "lr": lr, "beta": beta, "dampening": tau, "nesterov": nesterov}, G, T0)
    p = torch.nn.Parameter(T0.clone())
    ref = torch.optim.SGD([p], lr=lr, momentum=beta, dampening=tau, nesterov=nesterov)
    for g, mine in zip(G, hist):
        p.grad = g.clone()
        ref.step()
        assert torch.allclose(p.detach(), mine, atol=1e-7)


def test_nesterov_hand():
    beta, lr = 0.9, 0.1
    hist, _, _ = _run({"kind": "momentum", "lr": lr, "beta": beta, "nesterov": True}, G[:2], T0)
    b1 = G[0]
    t1 = T0 - lr * (G[0] + beta * b1)
    b2 = beta * b1 + G[1]
    assert torch.allclose(hist[0], t1)
    assert torch.allclose(hist[1], t1 - lr * (G[1] + beta * b2))


def test_adam_hand_and_torch():
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
    hist, state, opt = _run({"kind": "adam", "lr": lr, "beta1": b1, "beta2": b2, "eps": eps}, [g.double() for g in G], T0.double())
    m = v = torch.zeros(2, dtype=torch.float64)
    theta = T0.double()
    for t, g in enumerate(G, start=1):
        g = g.double()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        mhat, vhat = m / (1 - b1**t), v / (1 - b2**t)
        theta = theta - lr * mhat / (vhat.sqrt() + eps)
        assert torch.allclose(hist[t - 1], theta, atol=1e-12)
    p = torch.nn.Parameter(T0.double().clone())
    ref = torch.optim.Adam([p], lr=lr, betas=(b1, b2), eps=eps)
    for g in G:
        p.grad = g.double()
        ref.step()
    assert torch.allclose(p.detach(), hist[-1], atol=1e-12)
    # The preconditioner is sqrt(v_hat) + eps of the current state.
    (P,) = opt.preconditioner(state)
    assert torch.allclose(P, (v / (1 - b2**3)).sqrt() + eps)
    assert opt.threshold(lr) == pytest.approx(38 / lr)


def test_splitsgd_hand():
    lr, lr_sign, beta, tau = 0.1, 0.01, 0.5, 0.2
    sec = {"kind": "splitsgd", "lr": lr, "lr_sign": lr_sign, "beta": beta, "dampening": tau, "r_quantile": 0.5}
    g0 = torch.tensor([0.1, -4.0, 2.0, 0.01])
    g1 = torch.tensor([1.0, 1.0, -1.0, 0.0])
    theta0 = torch.zeros(4)
    hist, state, _ = _run(sec, [g0, g1], theta0)
    # r: the 0.5-quantile of |g0| = {0.01, 0.1, 2, 4} -> (0.1 + 2) / 2 = 1.05
    assert float(state["r"]) == pytest.approx(1.05)
    m1 = (1 - tau) * g0
    mhat1 = m1 * (1 - beta) / ((1 - tau) * (1 - beta))  # = g0
    assert torch.allclose(mhat1, g0)
    step1 = torch.where(mhat1.abs() > 1.05, lr_sign * mhat1.sign(), lr * mhat1)
    assert torch.allclose(hist[0], theta0 - step1)
    m2 = beta * m1 + (1 - tau) * g1
    mhat2 = m2 * (1 - beta) / ((1 - tau) * (1 - beta**2))
    step2 = torch.where(mhat2.abs() > 1.05, lr_sign * mhat2.sign(), lr * mhat2)
    assert torch.allclose(hist[1], theta0 - step1 - step2)
    # Both branches of the rule were exercised.
    assert (mhat1.abs() > 1.05).any() and (mhat1.abs() <= 1.05).any()


def test_splitsgd_explicit_r():
    hist, state, _ = _run({"kind": "splitsgd", "lr": 0.1, "lr_sign": 0.5, "beta": 0.0, "dampening": 0.0, "r": 1.0},
                          [torch.tensor([3.0, 0.5])], torch.zeros(2))
    assert torch.allclose(hist[0], torch.tensor([-0.5, -0.05]))


def test_gd_threshold():
    assert build_optimizer({"kind": "gd", "lr": 0.01}).threshold(0.01) == pytest.approx(200.0)


def test_state_is_plain_tensors():
    # weights_only=True loading needs tensors, numbers, lists and dicts only.
    import io

    for sec in ({"kind": "momentum", "lr": 0.1}, {"kind": "adam", "lr": 0.1},
                {"kind": "splitsgd", "lr": 0.1, "lr_sign": 0.01}):
        _, state, _ = _run(sec, G[:1], T0)
        buf = io.BytesIO()
        torch.save(state, buf)
        buf.seek(0)
        torch.load(buf, weights_only=True)
