"""The training loop: one deterministic loop for every optimizer, resumable bit for bit.

Per iteration t (the state holds theta_t after t steps):
  1. checkpoint if due (state theta_t; tables flushed with every row of steps < t),
  2. measure if due (rows for step t),
  3. forward/backward: the loss at theta_t (rows for step t); stop cleanly on NaN/inf,
  4. optimizer update -> theta_{t+1}; t_eff += eta.
Resuming from a checkpoint at step s keeps the table rows of steps < s and re-runs iteration s,
so an interrupted run ends with exactly the rows and parameters of an uninterrupted one. The loop
knows nothing of forks: a branch is a state the fork engine (eosbranch.branch) hands it.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from . import faults
from .errors import DivergenceError, Interrupted
from .experiment import Experiment
from .measure import measure
from .mechanism import record_track
from .recorder import Recorder
from .signals import StopFlag
from .state import TrainState, checkpoint_state, restore_state
from .step import apply_update, forward_backward
from .step_losses import StepLosses, group_loss_due
from .store import SPEC, RunStore

StopRule = Callable[["Trainer"], bool]


class Trainer:
    """Runs one run directory forward to ``steps``, from scratch or from its last checkpoint."""

    def __init__(self, exp: Experiment, store: RunStore, branch: str = "trunk",
                 warn: Callable[[str], None] = lambda m: None):
        self.exp, self.store, self.branch, self.warn = exp, store, branch, warn
        self.rec = Recorder(store, exp.spec.seed, branch)
        self.st = TrainState(lr=exp.spec.optimizer["lr"])
        self.step_losses = StepLosses(exp)
        self._seg_start: Optional[int] = None  # rows of steps >= this go into the next checkpoint's segments

    @property
    def metrics(self) -> list[tuple]:
        return self.rec.metrics

    @property
    def events(self) -> list[tuple]:
        return self.rec.events

    @property
    def examples(self) -> list[tuple]:
        return self.rec.examples

    # -- state -------------------------------------------------------------------------------
    def start_fresh(self) -> None:
        self.st = TrainState(lr=self.exp.spec.optimizer["lr"], opt_state=self.exp.optimizer.init(self.exp.params))

    def resume(self) -> None:
        # The newest valid checkpoint and the rows before it (from its row segments, so damaged
        # tables are rewritten complete at the next checkpoint); see store.py.
        ckpt, rows, chained = self.store.resume_point(warn=self.warn)
        self.st = restore_state(self.exp, ckpt)
        s = self.st.step
        self.rec.keep_before(rows, s)
        # Events of step s recorded before the checkpoint (a branch's fork_* and certificate rows)
        # are not recomputed by re-running step s: the checkpoint carries them.
        self.rec.events += [tuple(r) for r in ckpt.get("events_at_step", [])]
        self._seg_start = s if chained else None

    def save(self, state: Optional[dict] = None) -> None:
        s = self.st.step
        self.rec.flush(before=s)
        if s == self._seg_start:
            return  # the checkpoint this run just resumed from: kept as it is, never rewritten
        if state is None:
            state = self._state_before_measuring()
        self.store.save_checkpoint(s, state, rows=self.rec.segment(self._seg_start, s), rows_from=self._seg_start)
        self._seg_start = s

    def _state_before_measuring(self) -> dict:
        """The checkpoint of this step as :meth:`save` writes it before the measurement."""
        state = checkpoint_state(self.exp, self.st)
        state["events_at_step"] = self.rec.events_at(self.st.step)  # see resume()
        return state

    # -- the loop ------------------------------------------------------------------------------
    def record(self, group: str, metric: str, value: float, step: Optional[int] = None) -> None:
        st = self.st
        self.rec.metrics.append((st.step if step is None else step, st.t_eff, st.lr, group, metric, float(value)))

    def event(self, name: str, value: float = float("nan"), detail: str = "") -> None:
        self.rec.events.append((name, self.st.step, self.st.t_eff, float(value), detail))

    def run(self, steps: int, on_step: Callable[["Trainer", float], None] = lambda tr, loss: None,
            until: Optional[StopRule] = None, replay: bool = False) -> int:
        """Train to ``steps`` (or to the first step where ``until`` holds); returns the last step.
        ``replay``: stop at the top of iteration ``steps`` and write nothing (a fork's way to its
        fork step: measured as the parent was, so warm starts and events match)."""
        exp, st, spec = self.exp, self.st, self.exp.spec
        full_batch = exp.optimizer.batch_size is None
        self.step_losses = StepLosses(exp)
        stop = StopFlag()
        with stop.installed():
            while True:
                t = st.step
                faults.reached("step", t)
                if replay and t == steps:
                    return t
                if not replay and (spec.checkpoint.due(t, steps) or stop.stop):
                    self.save()
                    if stop.stop:
                        raise Interrupted(f"interrupted at step {t}; checkpoint saved, resume with "
                                          f"`eosbranch train --resume {self.store.path}`")
                rule = until is not None and not replay and t < steps
                # The final checkpoint, should the rule fire: the state before this measurement.
                pre = self._state_before_measuring() if rule and spec.measure.due(t) else None
                if spec.measure.sharpness and spec.measure.mechanism:
                    record_track(st, exp.params, spec.measure.oscillation_window, spec.measure)
                if spec.measure.due(t):
                    measure(self)
                    faults.reached("measured", t)
                if rule and until(self):
                    faults.reached("stopping", t)
                    # The final checkpoint holds the state *before* step t's measurement, as every
                    # checkpoint does (a resume or an extension from it re-measures step t bit for
                    # bit); it is committed before the spec says the run ends here, so a kill in
                    # between resumes from it and the stop rule fires again at the same step.
                    self.save(pre)
                    self.store.write_text(SPEC, spec.model_copy(update={"steps": t}).to_yaml())
                    steps = t  # the stop rule ends the run here: its spec now says so
                if t == steps:
                    with torch.no_grad():
                        out = exp.model(exp.train_X)
                        per = exp.loss_fn(out, exp.train_y, reduction="none")
                    self.record_step_loss(exp.objective(per).item(), per, True, out)
                    break
                loss, per, grads, out, idx = forward_backward(exp, st, self.record)
                value = loss.item()
                if not math.isfinite(value):
                    self.diverged(value)
                self.record_step_loss(value, per, full_batch, out, idx)
                apply_update(exp, st, grads)
                on_step(self, value)
        self.rec.flush()
        self.store.mark_complete(steps, rows=self.rec.segment(self._seg_start, None), rows_from=self._seg_start)
        return steps

    def record_step_loss(self, value: float, per: torch.Tensor, full_batch: bool, out: torch.Tensor,
                         idx: Optional[torch.Tensor] = None) -> None:
        """``loss`` (``batch_loss`` for minibatches) and, on full batches, the share of training
        points whose loss rose since the previous step (DESIGN §1: about 0.5 at the EoS); each
        group's loss and accuracy from the same per-example losses (eosbranch.step_losses)."""
        st = self.st
        self.record("all", "loss" if full_batch else "batch_loss", value)
        steps, ms = self.step_losses, self.exp.spec.measure
        if steps.active:
            # Under a minibatch optimizer the probes record the full-data group losses at a
            # measurement step; the trainer adds them at the cadence in between.
            probed = self.exp.optimizer.batch_size is not None and ms.probes and ms.due(st.step)
            if full_batch:
                rows = [] if probed else steps.full(per, out)
            else:
                rows = steps.batch(per, out, idx)
                if not probed and group_loss_due(ms.group_loss_every, st.step):
                    rows += steps.data_rows()
            step, t_eff, lr = st.step, st.t_eff, st.lr
            self.rec.metrics.extend((step, t_eff, lr, group, metric, float(v)) for group, metric, v in rows)
        if full_batch:
            if st.prev_example_losses is not None and st.prev_example_losses.shape == per.shape:
                rose = (per > st.prev_example_losses).double().mean().item()
                self.record("all", "fraction_loss_increased", rose)
            st.prev_example_losses = per

    def diverged(self, value: float) -> None:
        t = self.st.step
        self.event("diverged", value, f"loss became {value} at step {t}")
        self.rec.flush()
        last = max(s for s in self.store.checkpoint_steps() if s <= t)
        raise DivergenceError(
            f"loss became {value} at step {t} (lr={self.st.lr}); stopped. Last good checkpoint: "
            f"step {last} in {self.store.path}"
        )
