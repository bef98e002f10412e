"""Dense float64 oracles over a model's flat trainable parameters, shared by every curvature test:
the Hessian of the (weighted, subset) mean loss by ``torch.func.hessian``, per-example gradients by
``torch.func.jacrev``, and the third-derivative contraction grad_theta(v1^T H(theta) v1) by
``jacrev`` of the dense Hessian. None of them calls eosbranch's curvature code."""

from __future__ import annotations

import torch
from torch.func import functional_call

from eosbranch.curvature import flatten, unflatten
from eosbranch.loss import get_loss

F64 = torch.float64


class Dense:
    """Dense oracles over the flat trainable parameters."""

    def __init__(self, model, loss, X, y):
        self.model, self.loss, self.X, self.y = model, get_loss(loss), X, y
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.like = [p.detach() for p in model.parameters() if p.requires_grad]
        self.theta = flatten(self.like)

    def out(self, flat, X):
        return functional_call(self.model, dict(zip(self.names, unflatten(flat, self.like))), (X,))

    def mean_loss(self, flat, idx=None):
        X, y = (self.X, self.y) if idx is None else (self.X[idx], self.y[idx])
        return self.loss(self.out(flat, X), y)

    def per_example_loss(self, flat):
        return self.loss(self.out(flat, self.X), self.y, reduction="none")

    def per_example_grads(self):  # [N, dim]
        return torch.func.jacrev(self.per_example_loss)(self.theta)

    def hessian(self, flat=None, idx=None):
        return torch.func.hessian(lambda f: self.mean_loss(f, idx))(self.theta if flat is None else flat)

    def top(self, flat=None, idx=None):
        w, U = torch.linalg.eigh(self.hessian(flat, idx))
        return w[-1], U[:, -1], w


def dense_weighted(d: Dense, w, idx=None):
    """The objective sum_i w_i l_i / sum_i w_i over idx (default all points), a function of theta."""
    idx = torch.arange(d.X.shape[0]) if idx is None else idx

    def loss(f):
        per = d.loss(d.out(f, d.X[idx]), d.y[idx], reduction="none")
        return (per * w[idx]).sum() / w[idx].sum()

    return loss


def dense_hessian(model, loss, X, y, w=None, idx=None):
    """The Hessian of sum_i w_i l_i / sum_i w_i over idx (default: the mean over all points)."""
    d = Dense(model, loss, X, y)
    if w is None and idx is None:
        return d.hessian()
    w = torch.ones(X.shape[0], dtype=d.theta.dtype) if w is None else w
    return torch.func.hessian(dense_weighted(d, w, idx))(d.theta)


def sharpness_gradient(objective, theta, v1):
    """The third-derivative contraction grad_theta(v1^T H(theta) v1), v1 fixed, H the Hessian of
    ``objective`` (a function of the flat parameters)."""
    return torch.func.jacrev(lambda f: v1 @ torch.func.hessian(objective)(f) @ v1)(theta)


def rows_to_dict(rows):
    return {(g, m): v for g, m, v in rows}
