"""The MSE convention of DESIGN §2 (value and gradient by hand) and CE."""

import math

import torch

from eosbranch.loss import ce, get_loss, mse


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
