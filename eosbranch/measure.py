"""What the trainer records at a measurement step (the schedule is ``spec.measure``).

Whole-data quantities go in ``metrics`` with ``group = "all"``: ``accuracy`` (classification),
``test_loss`` / ``test_accuracy`` where the data has a test split, and the full-data ``loss`` for
minibatch optimizers (full-batch ones record it every step anyway).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .train import Trainer


@torch.no_grad()
def _loss_accuracy(exp, X, y):
    out = exp.model(X)
    loss = exp.loss_fn(out, y).item()
    acc = (out.argmax(1) == y).double().mean().item() if exp.data.task == "classification" else None
    return loss, acc


def measure(tr: "Trainer") -> None:
    exp = tr.exp
    loss, acc = _loss_accuracy(exp, exp.data.X, exp.data.y)
    if exp.optimizer.batch_size is not None:
        tr.record("all", "loss", loss)
    if acc is not None:
        tr.record("all", "accuracy", acc)
    if exp.data.X_test is not None and len(exp.data.X_test):
        test_loss, test_acc = _loss_accuracy(exp, exp.data.X_test, exp.data.y_test)
        tr.record("all", "test_loss", test_loss)
        if test_acc is not None:
            tr.record("all", "test_accuracy", test_acc)
