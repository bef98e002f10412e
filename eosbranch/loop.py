"""The training loop: one deterministic loop for every optimizer, resumable bit for bit.

Per iteration t (the state holds theta_t after t steps):
  1. checkpoint if due (state theta_t; tables flushed with every row of steps < t),
  2. measure if due (rows for step t),
  3. forward/backward: the loss at theta_t (rows for step t); stop cleanly on NaN/inf,
  4. optimizer update -> theta_{t+1}; t_eff += eta.
Resuming from a checkpoint at step s keeps the table rows of steps < s and re-runs iteration s,
so an interrupted run ends with exactly the rows and parameters of an uninterrupted one. The loop
knows nothing of forks: a branch is a state the fork engine (eosbranch.branch) hands it.

Sync-free steps (the device path; default off the CPU, ``EOSBRANCH_SYNC_FREE=1|0`` or
``Trainer(sync_free=...)`` to force it): a plain step reads nothing back from the device. Its
per-step values stay there (eosbranch.recorder holds them) and are settled at the next measurement,
checkpoint, stop or end; the non-finite-loss check runs then too, finds the first bad step and
stops with the rows, event and error of a run that had checked every step (the steps run past it
are dropped, and no checkpoint is written after it). On the CPU the host path reads each value at
once, which is cheaper there. The per-step callback ``on_step(trainer, losses)`` gets the
(step, loss) pairs settled since its previous call (each step's on the host path; none on a plain
step of the device path).
"""

from __future__ import annotations

import math
import os
from typing import Callable, Optional, Union

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
OnStep = Callable[["Trainer", list], None]


def sync_free_default(device: torch.device) -> bool:
    """The device path off the CPU, unless ``EOSBRANCH_SYNC_FREE`` (1 or 0) says otherwise."""
    forced = os.environ.get("EOSBRANCH_SYNC_FREE", "")
    return forced == "1" if forced in ("0", "1") else device.type != "cpu"


class Trainer:
    """Runs one run directory forward to ``steps``, from scratch or from its last checkpoint."""

    def __init__(self, exp: Experiment, store: RunStore, branch: str = "trunk",
                 warn: Callable[[str], None] = lambda m: None, sync_free: Optional[bool] = None):
        self.exp, self.store, self.branch, self.warn = exp, store, branch, warn
        self.sync_free = sync_free_default(exp.device) if sync_free is None else sync_free
        self.rec = Recorder(store, exp.spec.seed, branch)
        self.st = TrainState(lr=exp.spec.optimizer["lr"])
        self.step_losses = StepLosses(exp, numpy=not self.sync_free)
        self._seg_start: Optional[int] = None  # rows of steps >= this go into the next checkpoint's segments
        # Device path: each unchecked training step's (step, t_eff, lr, loss tensor, metrics rows
        # before its loss row), and the settled (step, loss) pairs on_step has not had yet.
        self._unchecked: list[tuple] = []
        self._settled: list[tuple[int, float]] = []

    @property
    def metrics(self) -> list[tuple]:
        self.rec.settle()
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
        self.settle()  # first: a diverged run stops here, before any checkpoint of a later state
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
    def record(self, group: str, metric: str, value: Union[float, torch.Tensor], step: Optional[int] = None) -> None:
        """A metrics row; a 0-dim tensor ``value`` is held on the device path (see the module doc)."""
        st = self.st
        step = st.step if step is None else step
        if isinstance(value, torch.Tensor) and self.sync_free:
            self.rec.hold(step, st.t_eff, st.lr, [(group, metric)], value)
        else:
            self.rec.metrics.append((step, st.t_eff, st.lr, group, metric, float(value)))

    def settle(self) -> None:
        """Move the held per-step values to the host; stop here if a training loss went non-finite
        (the device path's check, deferred to this point)."""
        pending, self._unchecked = self._unchecked, []
        if pending:
            values = torch.stack([p[3] for p in pending]).tolist()
            for (step, t_eff, lr, _, mark), value in zip(pending, values):
                if not math.isfinite(value):
                    self.rec.truncate(mark)  # the rows of this step's loss and after: never recorded
                    self.diverged(value, step, t_eff, lr)
                self._settled.append((step, value))
        self.rec.settle()

    def _hand_over(self, on_step: OnStep) -> None:
        losses, self._settled = self._settled, []
        on_step(self, losses)

    def event(self, name: str, value: float = float("nan"), detail: str = "") -> None:
        self.rec.events.append((name, self.st.step, self.st.t_eff, float(value), detail))

    def run(self, steps: int, on_step: OnStep = lambda tr, losses: None,
            until: Optional[StopRule] = None, replay: bool = False) -> int:
        """Train to ``steps`` (or to the first step where ``until`` holds); returns the last step.
        ``replay``: stop at the top of iteration ``steps`` and write nothing (a fork's way to its
        fork step: measured as the parent was, so warm starts and events match)."""
        exp, st, spec = self.exp, self.st, self.exp.spec
        full_batch = exp.optimizer.batch_size is None
        self.step_losses = StepLosses(exp, numpy=not self.sync_free)
        self._unchecked, self._settled = [], []
        stop = StopFlag()
        with stop.installed():
            while True:
                t = st.step
                faults.reached("step", t)
                if replay and t == steps:
                    self.settle()
                    self._hand_over(on_step)
                    return t
                if not replay and (spec.checkpoint.due(t, steps) or stop.stop):
                    self.save()
                    if stop.stop:
                        raise Interrupted(f"interrupted at step {t}; checkpoint saved, resume with "
                                          f"`eosbranch train --resume {self.store.path}`")
                if spec.measure.due(t) or t == steps:
                    self.settle()  # a measurement (and the end) starts from checked, settled steps
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
                    self.record_step_loss(exp.objective(per), per, True, out)
                    break
                loss, per, grads, out, idx = forward_backward(exp, st, self.record)
                loss = loss.detach()
                if self.sync_free:
                    self._unchecked.append((t, st.t_eff, st.lr, loss, len(self.rec.metrics)))
                else:
                    value = loss.item()
                    if not math.isfinite(value):
                        self.diverged(value, t, st.t_eff, st.lr)
                    self._settled.append((t, value))
                self.record_step_loss(loss, per, full_batch, out, idx)
                apply_update(exp, st, grads)
                self._hand_over(on_step)
        if self._settled:  # the losses settled at the last step, for the callback's last look
            self._hand_over(on_step)
        self.rec.flush()
        self.store.mark_complete(steps, rows=self.rec.segment(self._seg_start, None), rows_from=self._seg_start)
        return steps

    def record_step_loss(self, loss: torch.Tensor, per: torch.Tensor, full_batch: bool, out: torch.Tensor,
                         idx: Optional[torch.Tensor] = None) -> None:
        """``loss`` (``batch_loss`` for minibatches) and, on full batches, the share of training
        points whose loss rose since the previous step (DESIGN §1: about 0.5 at the EoS); each
        group's loss and accuracy from the same per-example losses (eosbranch.step_losses)."""
        st = self.st
        self.record("all", "loss" if full_batch else "batch_loss", loss)
        steps, ms = self.step_losses, self.exp.spec.measure
        if steps.active:
            # Under a minibatch optimizer the probes record the full-data group losses at a
            # measurement step; the trainer adds them at the cadence in between.
            probed = self.exp.optimizer.batch_size is not None and ms.probes and ms.due(st.step)
            if full_batch:
                blocks = [] if probed else steps.full(per, out)
            else:
                blocks = steps.batch(per, out, idx)
                if not probed and group_loss_due(ms.group_loss_every, st.step):
                    blocks += steps.data_rows()
            for keys, values, present in blocks:
                self._put(keys, values, present)
        if full_batch:
            if st.prev_example_losses is not None and st.prev_example_losses.shape == per.shape:
                self.record("all", "fraction_loss_increased", (per > st.prev_example_losses).double().mean())
            st.prev_example_losses = per

    def _put(self, keys: list[tuple[str, str]], values, present: Optional[torch.Tensor]) -> None:
        """One block of per-step rows (eosbranch.step_losses): held, or read now on the host path."""
        st = self.st
        if isinstance(values, torch.Tensor):
            if self.sync_free:
                self.rec.hold(st.step, st.t_eff, st.lr, keys, values, present)
                return
            values = values.reshape(-1).tolist()
        keep = [True] * len(keys) if present is None else present.reshape(-1).tolist()
        self.rec.metrics.extend((st.step, st.t_eff, st.lr, group, metric, float(v))
                                for (group, metric), v, k in zip(keys, values, keep) if k)

    def diverged(self, value: float, step: int, t_eff: float, lr: float) -> None:
        self.rec.events.append(("diverged", step, t_eff, float(value), f"loss became {value} at step {step}"))
        self.rec.flush()
        last = max(s for s in self.store.checkpoint_steps() if s <= step)
        raise DivergenceError(
            f"loss became {value} at step {step} (lr={lr}); stopped. Last good checkpoint: "
            f"step {last} in {self.store.path}"
        )
