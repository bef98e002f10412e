"""Warnings for runs that train but study nothing: a *saturated* run (the training loss reaches ~0,
the Hessian vanishes, there is no EoS left to reach, and Lanczos needs ever more Hessian-vector
products per measurement, so the run slows down many times over) and a *collapsed* run
(accuracy at chance and the loss no lower than at the start: a t* found there is not an EoS).

:class:`Watch` checks a run while it trains (once per kind, through the trainer's per-step
callback, from the losses the trainer has settled: each step's on the CPU, a batch of them at a
measurement or checkpoint on an accelerator, so it never makes a step wait for the device) and
:func:`at_fork` checks a parent's recorded state at the fork step; both only warn.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import pandas as pd
import torch

SATURATED_LOSS = 1e-6  # full-batch training loss at or below this: saturated
CHANCE_MARGIN = 0.02  # accuracy within this of the majority-class share: at chance


def saturated(loss: float) -> bool:
    return math.isfinite(loss) and loss <= SATURATED_LOSS


def collapsed(accuracy: Optional[float], chance: Optional[float], loss: float, initial_loss: Optional[float]) -> bool:
    """Accuracy at chance (the majority class's share) while the loss is no lower than at step 0."""
    if accuracy is None or chance is None or initial_loss is None or not math.isfinite(loss):
        return False
    return accuracy <= chance + CHANCE_MARGIN and loss >= initial_loss


def saturated_message(step: int, loss: float, matvecs: Optional[float] = None) -> str:
    more = f" (Lanczos used {int(matvecs)} Hessian-vector products at the last measurement)" if matvecs else ""
    return (f"saturated at step {step}: the training loss is {loss:.3g} (~0), so the Hessian vanishes, there is no "
            f"EoS left to reach and each sharpness measurement gets slower{more}; use fewer steps, a smaller lr "
            "or init_scale, or another loss")


def collapsed_message(step: int, accuracy: float, chance: float, loss: float, initial_loss: float) -> str:
    return (f"collapsed at step {step}: accuracy {accuracy:.3g} is at chance ({chance:.3g}) and the loss {loss:.4g} "
            f"is no lower than at step 0 ({initial_loss:.4g}); its t* and any fork from it are not an EoS "
            "(try a smaller lr or init_scale)")


def chance_level(y) -> Optional[float]:
    """The majority class's share of the labels (None for non-integer targets: regression)."""
    y = torch.as_tensor(y)
    if y.ndim != 1 or y.dtype.is_floating_point or not len(y):
        return None
    return float(torch.bincount(y.long()).max().item() / len(y))


class Watch:
    """A per-step callback wrapper that warns once when the run saturates and once when it has
    collapsed (read at measurement steps from the trainer's rows)."""

    def __init__(self, on_step: Callable, warn: Callable[[str], None]):
        self.on_step, self.warn = on_step, warn
        self.said: set[str] = set()
        self.initial_loss: Optional[float] = None
        self.chance: Optional[float] = None
        self._chance_read = False

    def __call__(self, tr, losses: list[tuple[int, float]]) -> None:
        """``losses``: the (step, training loss) pairs settled since the previous call."""
        self.on_step(tr, losses)
        for step, loss in losses:
            self._check(tr, step, loss)

    def _check(self, tr, step: int, loss: float) -> None:
        if step == 0:
            self.initial_loss = loss
        if "saturated" not in self.said and tr.exp.optimizer.batch_size is None and saturated(loss):
            self.said.add("saturated")
            self.warn(saturated_message(step, loss, _latest(tr, step, "eig_matvecs")))
        if "collapsed" not in self.said and step > 0 and tr.exp.spec.measure.due(step):
            if not self._chance_read:  # read once, here: never inside a plain step
                self._chance_read = True
                self.chance = chance_level(tr.exp.train_y) if tr.exp.data.task == "classification" else None
            acc = _latest(tr, step, "accuracy")
            if collapsed(acc, self.chance, loss, self.initial_loss):
                self.said.add("collapsed")
                self.warn(collapsed_message(step, acc, self.chance, loss, self.initial_loss))


def _latest(tr, step: int, metric: str) -> Optional[float]:
    """The value of ('all', metric) recorded at ``step`` among the trainer's pending rows, if any."""
    for row in reversed(tr.metrics):
        if row[0] < step:
            break
        if row[0] == step and row[3] == "all" and row[4] == metric:
            return row[5]
    return None


def at_fork(metrics: pd.DataFrame, step: int, chance: Optional[float]) -> list[str]:
    """Warnings about a parent's recorded state at the fork ``step`` (the last measurement at or
    before it for accuracy)."""
    m = metrics[metrics.group == "all"]
    loss = m[(m.metric == "loss")].set_index("step")["value"]
    if loss.empty or step not in loss.index:
        return []
    out = []
    if saturated(float(loss[step])):
        first = int(loss.index[(loss <= SATURATED_LOSS).to_numpy()][0])
        out.append(f"the parent at the fork step {step}: " + saturated_message(first, float(loss[first])))
    acc = m[(m.metric == "accuracy") & (m.step <= step)].sort_values("step")
    if len(acc) and 0 in loss.index and int(acc.step.iloc[-1]) > 0:
        a, at = float(acc.value.iloc[-1]), int(acc.step.iloc[-1])
        if collapsed(a, chance, float(loss[at]) if at in loss.index else float(loss[step]), float(loss[0])):
            out.append(f"the parent at the fork step {step}: "
                       + collapsed_message(at, a, chance, float(loss[at]), float(loss[0])))
    return out
