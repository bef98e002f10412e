"""One training step: this step's batch (a pure function of the data cursor), the loss and its
gradients (edited by a branch's gradient transform, if any), and the optimizer's update."""

from __future__ import annotations

from typing import Callable, Optional

import torch

from .errors import DivergenceError
from .experiment import Experiment
from .state import TrainState


def batch_indices(exp: Experiment, cursor: dict) -> Optional[torch.Tensor]:
    """The next minibatch for SGD-type optimizers (None = full batch), advancing the cursor.

    Each epoch's order is a permutation drawn from a generator seeded by (seed, epoch), so the
    order is a pure function of the cursor: nothing else needs saving to resume it.
    """
    bs = exp.optimizer.batch_size
    n = exp.train_X.shape[0]
    if bs is None or bs >= n:
        return None
    if cursor["pos"] + bs > n:  # drop the short tail: every step sees a full batch
        cursor["epoch"], cursor["pos"] = cursor["epoch"] + 1, 0
    g = torch.Generator().manual_seed(exp.spec.seed * 1_000_003 + cursor["epoch"])
    perm = torch.randperm(n, generator=g)
    idx = perm[cursor["pos"] : cursor["pos"] + bs]
    cursor["pos"] += bs
    return idx.to(exp.device)


def forward_backward(exp: Experiment, st: TrainState, record: Callable = lambda group, metric, value: None):
    """Loss, per-example losses (detached), gradients, outputs (detached) and the batch's training
    positions (None: full batch) at the current state on this step's batch (advancing the data
    cursor). A branch's gradient transform (``exp.grad_hook``, e.g.
    gradient surgery) edits the gradients here, so every optimizer sees the edited ones."""
    idx = batch_indices(exp, st.cursor)
    X, y = (exp.train_X, exp.train_y) if idx is None else (exp.train_X[idx], exp.train_y[idx])
    out = exp.model(X)
    per = exp.loss_fn(out, y, reduction="none")
    loss = exp.objective(per, idx)
    hook = exp.grad_hook
    grads = list(torch.autograd.grad(loss, exp.params, retain_graph=hook is not None))
    if hook is not None:
        grads = hook(exp, st, idx, per, grads, record)
    return loss, per.detach(), grads, out.detach(), idx


def apply_update(exp: Experiment, st: TrainState, grads: list[torch.Tensor]) -> None:
    exp.optimizer.update(exp.params, grads, st.opt_state, st.lr)
    st.step += 1
    st.t_eff += st.lr


def replay(exp: Experiment, st: TrainState, to_step: int) -> None:
    """Advance a restored state to ``to_step`` exactly as training did (no records, no files).

    Measurements are skipped: use it where only parameters matter (a fork replays through the
    loop instead, so its warm starts and events match the parent's)."""
    while st.step < to_step:
        loss, _, grads, _, _ = forward_backward(exp, st)
        if not torch.isfinite(loss).item():
            raise DivergenceError(f"replay diverged at step {st.step}")
        apply_update(exp, st, grads)
