"""What the trainer records at a measurement step (the schedule is ``spec.measure``).

Whole-data quantities go in ``metrics`` with ``group = "all"``:

- ``accuracy`` (classification), ``test_loss`` / ``test_accuracy`` where the data has a test
  split, and the full-data ``loss`` for minibatch optimizers (full-batch ones record it every step);
- curvature (``measure.sharpness``): ``sharpness`` = lambda_1 of the Hessian of the mean training
  loss (on a fixed, seeded subset if ``measure.subset``), ``sharpness_2`` ... for ``top_k`` > 1,
  ``threshold`` of the optimizer in force, ``eig_residual`` (max ||Hv - lambda v|| / |lambda| over
  the returned pairs) and ``eig_matvecs``. For preconditioned optimizers (Adam) also
  ``preconditioned_sharpness`` = lambda_1(P^-1 H), the quantity its threshold applies to.
- the ``t_star`` event: the first measurement at or after ``measure.warmup`` whose (preconditioned)
  sharpness reaches the threshold.

Each solve is warm-started from the previous measurement's eigenvectors (kept in the training
state and its checkpoints), so measurements are cheap and resume bit for bit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from .curvature import flatten, hessian_matvec, preconditioned_matvec, top_eigenpairs

if TYPE_CHECKING:
    from .train import Experiment, Trainer


@torch.no_grad()
def _loss_accuracy(exp, X, y):
    out = exp.model(X)
    loss = exp.loss_fn(out, y).item()
    acc = (out.argmax(1) == y).double().mean().item() if exp.data.task == "classification" else None
    return loss, acc


def curvature_subset(exp: "Experiment") -> Optional[torch.Tensor]:
    """The fixed subset for curvature: a pure function of the seed, never redrawn."""
    size = exp.spec.measure.subset
    n = exp.train_X.shape[0]
    if size is None or size >= n:
        return None
    g = torch.Generator().manual_seed(exp.spec.seed * 7919 + 17)
    return torch.randperm(n, generator=g)[:size].sort().values.to(exp.device)


def measure(tr: "Trainer") -> None:
    exp = tr.exp
    loss, acc = _loss_accuracy(exp, exp.train_X, exp.train_y)
    if exp.optimizer.batch_size is not None:
        tr.record("all", "loss", loss)
    if acc is not None:
        tr.record("all", "accuracy", acc)
    if exp.data.X_test is not None and len(exp.data.X_test):
        test_loss, test_acc = _loss_accuracy(exp, exp.data.X_test, exp.data.y_test)
        tr.record("all", "test_loss", test_loss)
        if test_acc is not None:
            tr.record("all", "test_accuracy", test_acc)
    if exp.spec.measure.sharpness:
        measure_curvature(tr)


def measure_curvature(tr: "Trainer") -> None:
    exp, st, ms = tr.exp, tr.st, tr.exp.spec.measure
    H = hessian_matvec(exp.model, exp.loss_fn, (exp.train_X, exp.train_y), chunk_size=ms.chunk_size,
                       subset=curvature_subset(exp))
    dim = sum(p.numel() for p in exp.params)
    v0 = st.eig_vectors
    res = top_eigenpairs(H, dim, k=ms.top_k, tol=ms.tol, v0=v0, max_matvecs=ms.max_matvecs)
    st.eig_vectors = res.vectors.detach()
    values = res.values.tolist()
    for i, value in enumerate(values):
        tr.record("all", "sharpness" if i == 0 else f"sharpness_{i + 1}", value)
    rel = (res.residuals / res.values.abs().clamp_min(1e-30)).max().item()
    tr.record("all", "eig_residual", rel)
    tr.record("all", "eig_matvecs", res.n_matvecs)
    threshold = exp.optimizer.threshold(st.lr)
    tr.record("all", "threshold", threshold)
    compared = values[0]
    if exp.optimizer.preconditioned:
        diag = flatten(exp.optimizer.preconditioner(st.opt_state))
        pres = top_eigenpairs(preconditioned_matvec(H, diag), dim, k=1, tol=ms.tol,
                              v0=st.precond_vectors, max_matvecs=ms.max_matvecs)
        compared = pres.values[0].item()
        tr.record("all", "preconditioned_sharpness", compared)
        st.precond_vectors = pres.vectors.detach()
    st.measured["sharpness"] = values[0]
    if "t_star" not in st.measured and st.step >= ms.warmup and compared >= threshold:
        st.measured["t_star"] = st.step
        tr.event("t_star", compared, f"sharpness {compared:.6g} >= threshold {threshold:.6g}")
