"""Opposing signals (DESIGN §2): find the points whose loss rises and falls most on one step,
and check that the two groups oscillate in antiphase over a window.

At step t the training points are ranked by l_i(t+1) - l_i(t); the top-m rises and top-m falls
form a candidate pair. Over the window [t, t+W] the pair is reported with its alternation rate
(share of steps on which the two group losses move in opposite directions), the amplitude of each
(mean |step-to-step change|) and the correlation of their step-to-step changes (antiphase: near
-1). Two random groups of the same size are the control. The states come from an exact replay of
the run from its nearest checkpoint, so nothing is re-sampled. ``eosbranch opposing`` saves the
pair as ``RUN/opposing_groups.yaml``, which the ``opposing`` group kind (opposing_kind.py) reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import numpy as np
import pandas as pd
import torch

from .errors import EosbranchError
from .opposing_kind import data_digest, t_star_step
from .run import Run
from .experiment import build
from .state import restore_state
from .step import replay


@dataclass
class Opposing:
    step: int
    points: pd.DataFrame  # index, label, role, loss_before, loss_after, loss_change, pred_before, pred_after
    pairs: pd.DataFrame  # pair, group_a, group_b, size, alternation_rate, amplitude_a, amplitude_b, correlation
    group_spec: dict  # an `opposing` group entry that makes the pair trackable in later runs
    data: object  # the run's Dataset, whose rows the indices name


def pair_statistics(a: np.ndarray, b: np.ndarray) -> dict:
    """Antiphase statistics of two loss series of equal length (at least three points)."""
    da, db = np.diff(np.asarray(a, float)), np.diff(np.asarray(b, float))
    if len(da) < 2:
        raise ValueError("pair_statistics needs series of at least three points")
    moving = (da != 0) & (db != 0)
    alternation = float(np.mean((da * db)[moving] < 0)) if moving.any() else float("nan")
    corr = float(np.corrcoef(da, db)[0, 1]) if da.std() > 0 and db.std() > 0 else float("nan")
    return {"alternation_rate": alternation, "amplitude_a": float(np.abs(da).mean()),
            "amplitude_b": float(np.abs(db).mean()), "correlation": corr}


def resolve_step(run: Run, step: Union[int, str]) -> int:
    if isinstance(step, str) and not step.lstrip("-").isdigit():
        if step != "onset":
            raise EosbranchError(f"--step takes a step number or 'onset', got {step!r}")
        return t_star_step(run.events, run.path)
    return int(step)


def loss_trajectory(run: Run, start: int, window: int):
    """Per-example losses (all points of the data) at steps start..start+window, replayed exactly,
    plus the predictions at ``start`` and ``start + 1``."""
    if start < 0 or start + window > run.spec.steps:
        raise EosbranchError(f"steps {start}..{start + window} are outside the run's 0..{run.spec.steps}")
    exp = build(run.spec)
    st = restore_state(exp, run.checkpoint(start))
    replay(exp, st, start)
    losses, preds = [], []
    for w in range(window + 1):
        with torch.no_grad():
            out = exp.model(exp.data.X)
            losses.append(exp.loss_fn(out, exp.data.y, reduction="none").double().cpu())
            if w <= 1:
                preds.append(out.argmax(1).cpu() if exp.data.task == "classification" else out[:, 0].cpu())
        if w < window:
            replay(exp, st, st.step + 1)
    return torch.stack(losses).numpy(), preds, exp


def find(run: Union[Run, str], step: Union[int, str], top: int = 20, window: int = 20, seed: int = 0) -> Opposing:
    run = run if isinstance(run, Run) else Run(run)
    t = resolve_step(run, step)
    losses, preds, exp = loss_trajectory(run, t, max(window, 2))
    # Only training points are ranked (held-out groups are measured but never trained on).
    trained = np.arange(losses.shape[1]) if exp.train_index is None else np.sort(exp.train_index.cpu().numpy())
    n = len(trained)
    if not 0 < top <= n // 2:
        raise EosbranchError(f"--top must be between 1 and {n // 2} for {n} training points, got {top}")
    change_all = losses[1] - losses[0]
    change = change_all[trained]
    order = trained[np.argsort(change, kind="stable")]
    rise, fall = np.sort(order[::-1][:top]), np.sort(order[:top])
    y = exp.data.y.cpu()
    label = y.numpy() if exp.data.task == "classification" else np.full(losses.shape[1], -1)
    rows = []
    for role, idx in (("rise", order[::-1][:top]), ("fall", order[:top])):
        for i in idx:
            rows.append((int(i), int(label[i]), role, losses[0, i], losses[1, i], change_all[i],
                         float(preds[0][i]), float(preds[1][i])))
    points = pd.DataFrame(rows, columns=["index", "label", "role", "loss_before", "loss_after", "loss_change",
                                         "pred_before", "pred_after"])
    rng = np.random.default_rng(seed)
    perm = trained[rng.permutation(n)]
    control_a, control_b = perm[:top], perm[top:2 * top]
    pairs = pd.DataFrame([
        {"pair": "opposing", "group_a": "opposing_rise", "group_b": "opposing_fall", "size": top,
         **pair_statistics(losses[:, rise].mean(1), losses[:, fall].mean(1))},
        {"pair": "random_control", "group_a": "random_a", "group_b": "random_b", "size": top,
         **pair_statistics(losses[:, control_a].mean(1), losses[:, control_b].mean(1))},
    ])
    pairs.insert(1, "step", t)
    pairs.insert(2, "window", max(window, 2))
    pairs["fraction_loss_increased"] = float((change > 0).mean())
    pairs["full_loss_amplitude"] = float(np.abs(np.diff(losses[:, trained].mean(1))).mean())
    # The entry a spec's `{kind: opposing, run: RUN, step, top}` reads back (opposing_kind): where
    # the pair was found, and the data its indices name.
    spec = {"kind": "opposing", "step": t, "top": top, "indices_rise": [int(i) for i in rise],
            "indices_fall": [int(i) for i in fall], "data_sha256": data_digest(exp.data.X, exp.data.y)}
    return Opposing(t, points, pairs, spec, exp.data)
