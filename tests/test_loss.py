"""The MSE convention of DESIGN §2 (value and gradient by hand), CE, and the built-in losses'
closed-form derivatives in the outputs."""

import math

import pytest
import torch

from eosbranch.loss import ce, get_loss, mse, output_derivatives


def test_mse_value_is_sum_over_outputs_mean_over_samples_no_half():
    out = torch.tensor([[0.5, -1.0], [2.0, 0.0]])
    y = torch.tensor([0, 1])  # one-hot: [1, 0], [0, 1]
    # sample 0: (0.5-1)^2 + (-1-0)^2 = 1.25 ; sample 1: (2-0)^2 + (0-1)^2 = 5
    assert mse(out, y).item() == (1.25 + 5.0) / 2
    assert mse(out, y, half=True).item() == (1.25 + 5.0) / 4
    assert torch.equal(mse(out, y, reduction="none"), torch.tensor([1.25, 5.0]))


def test_mse_gradient_by_hand():
    out = torch.tensor([[0.5, -1.0], [2.0, 0.0]], requires_grad=True)
    y = torch.tensor([0, 1])
    mse(out, y).backward()
    # d/df mean_i sum_j (f_ij - y_ij)^2 = 2 (f - y) / N
    expected = 2 * (out.detach() - torch.tensor([[1.0, 0.0], [0.0, 1.0]])) / 2
    assert torch.allclose(out.grad, expected)


def test_mse_regression_targets_used_as_is():
    out = torch.tensor([[1.0], [3.0]])
    y = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    assert mse(out, y).item() == (1.0 + 4.0) / 2


def test_ce_matches_hand_computation():
    out = torch.tensor([[2.0, 0.0]])
    y = torch.tensor([1])
    expected = -math.log(math.exp(0.0) / (math.exp(2.0) + 1.0))
    assert abs(ce(out, y).item() - expected) < 1e-6


def test_get_loss_from_spec_sections():
    out, y = torch.tensor([[0.0, 0.0]]), torch.tensor([0])
    assert get_loss("mse")(out, y).item() == 1.0
    assert get_loss({"kind": "mse", "half": True})(out, y).item() == 0.5


@pytest.mark.parametrize("spec,targets", [
    ("mse", "labels"), ({"kind": "mse", "half": True}, "labels"), ("mse", "float"), ("ce", "labels")])
def test_output_derivatives_equal_autograd(spec, targets):
    """The closed-form per-example loss, gradient and Hessian-times-vector in the outputs that the
    hand-written curvature passes use instead of autograd."""
    g = torch.Generator().manual_seed(0)
    out = torch.randn(6, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=g) if targets == "labels" else torch.randn(6, 3, generator=g, dtype=torch.float64)
    loss = get_loss(spec)
    d = output_derivatives(loss, out, y)
    torch.testing.assert_close(d.losses, loss(out, y, reduction="none"), rtol=1e-12, atol=1e-12)
    jac = torch.func.jacrev(lambda f: loss(f, y, reduction="none").sum())(out)
    torch.testing.assert_close(d.grad, jac, rtol=1e-12, atol=1e-12)
    V = torch.randn(2, 6, 3, generator=g, dtype=torch.float64)  # a block of two tangents
    for i in range(6):
        Hi = torch.func.hessian(lambda f: loss(f[None], y[i:i + 1], reduction="none")[0])(out[i])
        torch.testing.assert_close(d.hess_times(V)[:, i], V[:, i] @ Hi, rtol=1e-12, atol=1e-12)


def test_output_derivatives_only_for_built_in_losses():
    out, y = torch.zeros(2, 3), torch.tensor([0, 1])
    assert output_derivatives(lambda f, t, reduction="mean": mse(f, t, reduction=reduction), out, y) is None
    assert output_derivatives(get_loss("mse"), torch.zeros(2, 3, 4), y) is None  # not one row per example
