"""The trainer: one deterministic loop for every optimizer, resumable bit for bit.

Per iteration t (the state holds theta_t after t steps):
  1. checkpoint if due (state theta_t; tables flushed with every row of steps < t),
  2. measure if due (rows for step t),
  3. forward/backward: the loss at theta_t (rows for step t); stop cleanly on NaN/inf,
  4. optimizer update -> theta_{t+1}; t_eff += eta.
Resuming from a checkpoint at step s keeps the table rows of steps < s and re-runs iteration s,
so an interrupted run ends with exactly the rows and parameters of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import copy
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import torch

from . import __version__
from .data import Dataset, load_data
from .errors import DivergenceError, EosbranchError, SpecError
from .health import Watch
from .loss import get_loss
from .measure import measure
from .mechanism import record_track
from .models import build_model
from .optimizer import Optimizer, build_optimizer
from .run import Run
from .spec import Spec, load_spec, parse_spec
from .step_losses import StepLosses, group_loss_due
from .store import SPEC, LINEAGE, RunStore
from . import faults, tables

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise EosbranchError("device: cuda requested but no CUDA device is available (use auto or cpu)")
    return torch.device(name)


@dataclass
class Experiment:
    """Everything built from a spec: data on the device, model, loss, optimizer (not state)."""

    spec: Spec
    device: torch.device
    dtype: torch.dtype
    data: Dataset
    model: torch.nn.Module
    loss_fn: Callable
    optimizer: Optimizer

    groups: dict = field(default_factory=dict)  # name -> indices into data.X
    group_info: dict = field(default_factory=dict)  # centroids, v_diff, centroid distances
    train_index: Optional[torch.Tensor] = None  # None: train on every point of data.X
    # Set by interventions (eosbranch.interventions) from a fork on:
    sample_weight: Optional[torch.Tensor] = None  # per row of data.X; loss = sum w l / sum w
    grad_hook: Optional[Callable] = None  # (exp, st, idx, per, grads, record) -> grads

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @cached_property
    def train_X(self) -> torch.Tensor:
        return self.data.X if self.train_index is None else self.data.X[self.train_index]

    @cached_property
    def train_y(self) -> torch.Tensor:
        return self.data.y if self.train_index is None else self.data.y[self.train_index]

    @property
    def train_weight(self) -> Optional[torch.Tensor]:
        w = self.sample_weight
        return w if w is None or self.train_index is None else w[self.train_index]

    def rows(self, idx: Optional[torch.Tensor]) -> torch.Tensor:
        """Rows of data.X behind training positions ``idx`` (None: the whole training set)."""
        pos = torch.arange(self.train_X.shape[0], device=self.device) if idx is None else idx
        return pos if self.train_index is None else self.train_index[pos]

    def objective(self, per: torch.Tensor, idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The training loss from per-example losses at training positions ``idx``: their mean, or
        the weighted mean sum w l / sum w under a reweighting branch."""
        w = self.train_weight
        if w is None:
            return per.mean()
        w = w if idx is None else w[idx]
        return (per * w).sum() / w.sum().clamp_min(1e-30)


def build(spec: Spec) -> Experiment:
    device, dtype = resolve_device(spec.device), DTYPES[spec.dtype]
    if device.type == "cuda":
        # cuBLAS is deterministic only with a fixed workspace; it reads this when its handle is
        # created, at the first matrix product, which comes after this point.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    data = load_data(spec.data)
    groups, info, train_index = {}, {}, None
    if spec.groups:
        from .groups import resolve

        r = resolve(spec.groups, data.X, data.y)  # on the CPU in float64: geometry is exact
        data.X, data.y = r.X, r.y
        groups, info = {k: v.to(device) for k, v in r.groups.items()}, r.info
        if r.train is not None and len(r.train) < len(r.X):
            train_index = r.train.to(device)
    data = _place(data, device, dtype)
    # Every global RNG from the seed (the model's initialisation depends on it only), so that the
    # full state a checkpoint records, Python's and NumPy's RNGs included, is the same in any process.
    torch.manual_seed(spec.seed)
    random.seed(spec.seed)
    np.random.seed(spec.seed)
    model = build_model(spec.model, data.input_shape, data.num_outputs).to(device=device, dtype=dtype)
    return Experiment(spec, device, dtype, data, model, get_loss(spec.loss), build_optimizer(spec.optimizer),
                      groups, info, train_index)


def _place(data: Dataset, device: torch.device, dtype: torch.dtype) -> Dataset:
    """Move a data set to the run's device; inputs (and regression targets) to the run's dtype."""
    def move(t):
        if t is None:
            return None
        return t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device)

    data.X, data.y, data.X_test, data.y_test = (move(t) for t in (data.X, data.y, data.X_test, data.y_test))
    return data


@dataclass
class TrainState:
    """The mutable state besides the model's parameters: all of it goes into a checkpoint."""

    step: int = 0
    t_eff: float = 0.0
    lr: float = 0.0
    opt_state: dict = field(default_factory=dict)
    cursor: dict = field(default_factory=lambda: {"epoch": 0, "pos": 0})
    eig_vectors: Optional[torch.Tensor] = None  # warm start for the next sharpness solve
    precond_vectors: Optional[torch.Tensor] = None  # same, for lambda_1(P^-1 H) under Adam
    measured: dict = field(default_factory=dict)  # e.g. last sharpness, t_star
    prev_example_losses: Optional[torch.Tensor] = None  # for fraction_loss_increased
    reference: Optional[dict] = None  # step, theta and v1 of the weight-projection reference
    intervention: dict = field(default_factory=dict)  # per-step intervention state (gradient surgery's v1)


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        # weights_only refuses object arrays: keep NumPy's legacy state as plain values.
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(tuple(state["python"]) if not isinstance(state["python"], tuple) else state["python"])
    n = state["numpy"]
    np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_state(exp: Experiment, st: TrainState) -> dict:
    return {
        "step": st.step, "t_eff": st.t_eff, "lr": st.lr,
        "model": {k: v.detach().cpu().clone() for k, v in exp.model.state_dict().items()},
        "optimizer": _to_cpu(st.opt_state), "cursor": dict(st.cursor), "rng": _rng_state(),
        "eig_vectors": _to_cpu(st.eig_vectors), "precond_vectors": _to_cpu(st.precond_vectors),
        "measured": copy.deepcopy(st.measured), "prev_example_losses": _to_cpu(st.prev_example_losses),
        "reference": _to_cpu(st.reference), "intervention": _to_cpu(st.intervention),
    }


def restore_state(exp: Experiment, ckpt: dict) -> TrainState:
    exp.model.load_state_dict(ckpt["model"])
    _set_rng_state(ckpt["rng"])
    return TrainState(
        step=int(ckpt["step"]), t_eff=float(ckpt["t_eff"]), lr=float(ckpt["lr"]),
        opt_state=_to_device(ckpt["optimizer"], exp.device), cursor=dict(ckpt["cursor"]),
        eig_vectors=_to_device(ckpt.get("eig_vectors"), exp.device),
        precond_vectors=_to_device(ckpt.get("precond_vectors"), exp.device),
        measured=copy.deepcopy(dict(ckpt.get("measured", {}))),
        prev_example_losses=_to_device(ckpt.get("prev_example_losses"), exp.device),
        reference=_to_device(ckpt.get("reference"), exp.device),
        intervention=_to_device(ckpt.get("intervention", {}), exp.device),
    )


def _to_cpu(obj):
    return _map_tensors(obj, lambda t: t.detach().cpu().clone())


def _to_device(obj, device):
    return _map_tensors(obj, lambda t: t.to(device))


def _map_tensors(obj, fn):
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(v, fn) for v in obj)
    return obj


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

    Measurements are skipped: use it where only parameters matter (a fork replays through
    :class:`Trainer` instead, so its warm starts and events match the parent's)."""
    while st.step < to_step:
        loss, _, grads, _, _ = forward_backward(exp, st)
        if not np.isfinite(loss.item()):
            raise DivergenceError(f"replay diverged at step {st.step}")
        apply_update(exp, st, grads)


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the next step boundary."""

    def __init__(self):
        self.stop = False

    @contextlib.contextmanager
    def installed(self):
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

        def handler(signum, frame):
            if self.stop:  # a second Ctrl-C means now
                signal.default_int_handler(signum, frame)
            self.stop = True

        for s in old:
            signal.signal(s, handler)
        try:
            yield self
        finally:
            for s, h in old.items():
                signal.signal(s, h)


class Interrupted(EosbranchError):
    """Training was stopped by a signal after saving a checkpoint."""


class Trainer:
    """Runs one run directory forward to ``steps``, from scratch or from its last checkpoint."""

    def __init__(self, exp: Experiment, store: RunStore, branch: str = "trunk",
                 warn: Callable[[str], None] = lambda m: None):
        self.exp, self.store, self.branch, self.warn = exp, store, branch, warn
        self.run_name = store.path.name
        self.metrics: list[tuple] = []
        self.events: list[tuple] = []
        self.examples: list[tuple] = []
        self.st = TrainState(lr=exp.spec.optimizer["lr"])
        self.step_losses = StepLosses(exp)  # rebuilt where interventions may change the groups' rows
        # A branch replays its parent from a checkpoint up to fork_at, checks the replayed state
        # (check_fork), then applies its interventions (eosbranch.interventions).
        self.fork_at: Optional[int] = None
        self._seg_start: Optional[int] = None  # rows of steps >= this go into the next checkpoint's segments
        self.interventions: list = []
        self.check_fork: Callable[[float], None] = lambda loss: None
        self._fork_curvature: Optional[dict] = None
        # A stop rule (e.g. the branch's own t** plus a margin): the run ends at the first step where it holds.
        self.until: Optional[Callable[["Trainer"], bool]] = None

    # -- state -------------------------------------------------------------------------------
    def start_fresh(self) -> None:
        self.st = TrainState(lr=self.exp.spec.optimizer["lr"], opt_state=self.exp.optimizer.init(self.exp.params))

    def resume(self) -> None:
        # The newest valid checkpoint and the rows before it (from its row segments, so damaged
        # tables are rewritten complete at the next checkpoint); see store.py.
        ckpt, rows, chained = self.store.resume_point(warn=self.warn)
        self.st = restore_state(self.exp, ckpt)
        s = self.st.step
        # Rows of steps >= s are recomputed: dropping them avoids duplicates after a kill.
        for name in ("metrics", "events", "examples"):
            df = rows[name]
            cols = tables.COLUMNS[name][3:]
            setattr(self, name, list(df.loc[df.step < s, cols].itertuples(index=False, name=None)))
        # Events of step s recorded before the checkpoint (a branch's fork_* and certificate rows)
        # are not recomputed by re-running step s: the checkpoint carries them.
        self.events += [tuple(r) for r in ckpt.get("events_at_step", [])]
        self._seg_start = s if chained else None

    def save(self, state: Optional[dict] = None) -> None:
        s = self.st.step
        self.flush(before=s)
        if s == self._seg_start:
            return  # the checkpoint this run just resumed from: kept as it is, never rewritten
        if state is None:
            state = checkpoint_state(self.exp, self.st)
            state["events_at_step"] = [list(r) for r in self.events if r[1] == s]  # see resume()
        self.store.save_checkpoint(s, state, rows=self._segment(self._seg_start, s), rows_from=self._seg_start)
        self._seg_start = s

    def _state_before_measuring(self) -> dict:
        """The checkpoint of this step as :meth:`save` would write it before the measurement."""
        state = checkpoint_state(self.exp, self.st)
        state["events_at_step"] = [list(r) for r in self.events if r[1] == self.st.step]
        return state

    def _segment(self, lo: Optional[int], hi: Optional[int]) -> dict:
        """The rows of steps in [lo, hi) as DataFrames (None: unbounded), for the store's segments."""
        seed, out = self.exp.spec.seed, {}
        for name, rows, step_at in (("metrics", self.metrics, 0), ("events", self.events, 1),
                                    ("examples", self.examples, 0)):
            keep = [r for r in rows if (lo is None or r[step_at] >= lo) and (hi is None or r[step_at] < hi)]
            out[name] = tables.frame(name, keep, self.run_name, self.branch, seed)
        return out

    def flush(self, before: Optional[int] = None) -> None:
        seed = self.exp.spec.seed
        for name, rows, step_at in (("metrics", self.metrics, 0), ("events", self.events, 1),
                                    ("examples", self.examples, 0)):
            keep = rows if before is None else [r for r in rows if r[step_at] < before]
            self.store.write_table(name, tables.frame(name, keep, self.run_name, self.branch, seed))

    # -- the loop ------------------------------------------------------------------------------
    def record(self, group: str, metric: str, value: float, step: Optional[int] = None) -> None:
        st = self.st
        self.metrics.append((st.step if step is None else step, st.t_eff, st.lr, group, metric, float(value)))

    def event(self, name: str, value: float = float("nan"), detail: str = "") -> None:
        self.events.append((name, self.st.step, self.st.t_eff, float(value), detail))

    def run(self, steps: int, on_step: Callable[["Trainer", float], None] = lambda tr, loss: None) -> int:
        """Train to ``steps`` (or to the first step where ``until`` holds); returns the last step."""
        exp, st, spec = self.exp, self.st, self.exp.spec
        full_batch = exp.optimizer.batch_size is None
        self.step_losses = StepLosses(exp)
        stop = _StopFlag()
        with stop.installed():
            while True:
                t = st.step
                faults.reached("step", t)
                if self.fork_at is not None:
                    if t == self.fork_at:
                        self.start_branch()
                elif spec.checkpoint.due(t, steps) or stop.stop:
                    self.save()
                    if stop.stop:
                        raise Interrupted(f"interrupted at step {t}; checkpoint saved, resume with "
                                          f"`eosbranch train --resume {self.store.path}`")
                pre = None
                if spec.measure.due(t) and t < steps and self.until is not None and self.fork_at is None:
                    pre = self._state_before_measuring()  # the final checkpoint, should the rule fire
                if spec.measure.sharpness and spec.measure.mechanism:
                    record_track(st, exp.params, spec.measure.oscillation_window, spec.measure)
                if spec.measure.due(t):
                    measure(self)
                    faults.reached("measured", t)
                if t < steps and self.until is not None and self.fork_at is None and self.until(self):
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
                if not np.isfinite(value):
                    self.diverged(value)
                self.record_step_loss(value, per, full_batch, out, idx)
                apply_update(exp, st, grads)
                on_step(self, value)
        self.flush()
        self.store.mark_complete(steps, rows=self._segment(self._seg_start, None), rows_from=self._seg_start)
        return steps

    def start_branch(self) -> None:
        """At the fork step: record and check the replayed state before anything changes (the
        parent's loss at this step, bit for bit; the fork-state snapshot of the integrity
        certificate), forget the replay's rows (they are the parent's), apply the interventions
        and save the branch's first checkpoint."""
        from .certificate import fork_snapshot

        devices = [self.exp.device] if self.exp.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # measuring must not consume the run's randomness
            snapshot = fork_snapshot(self)
        self.check_fork(snapshot["loss"])
        self.metrics, self.events, self.examples = [], [], []
        for detail, value in snapshot["rows"]:
            self.event("fork_state", value, detail)
        self.event("fork_params", float("nan"), snapshot["params_sha256"])
        self.st.measured["fork_step"] = self.st.step
        for iv in self.interventions:
            iv.at_fork(self)
        self.step_losses = StepLosses(self.exp)
        self.fork_at = None
        self.event("fork_step", float(self.st.step))
        self.save()

    def fork_curvature(self) -> dict:
        """Sharpness and v1 at the fork step before any intervention (cached): ``sharpness``,
        ``v1``, and ``compared`` (what the threshold applies to: preconditioned for Adam).
        Warm-started from the state's vectors without changing them, so measuring here leaves the
        branch's later measurements (and a null branch's bit-exactness) untouched."""
        if self._fork_curvature is None:
            from .measure import solve_sharpness

            self._fork_curvature = solve_sharpness(self.exp, self.st)
        return self._fork_curvature

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
            self.metrics.extend((step, t_eff, lr, group, metric, float(v)) for group, metric, v in rows)
        if full_batch:
            if st.prev_example_losses is not None and st.prev_example_losses.shape == per.shape:
                rose = (per > st.prev_example_losses).double().mean().item()
                self.record("all", "fraction_loss_increased", rose)
            st.prev_example_losses = per

    def diverged(self, value: float) -> None:
        t = self.st.step
        self.event("diverged", value, f"loss became {value} at step {t}")
        self.flush()
        last = max(s for s in self.store.checkpoint_steps() if s <= t)
        raise DivergenceError(
            f"loss became {value} at step {t} (lr={self.st.lr}); stopped. Last good checkpoint: "
            f"step {last} in {self.store.path}"
        )


def run_dir_for(spec: Spec, out: Union[str, Path]) -> Path:
    return Path(out) / f"{spec.name}-s{spec.seed}-{spec.digest()}"


def open_run(spec: Spec, path: Path, lineage: Optional[dict] = None, threads: Optional[int] = None,
             store: Optional[RunStore] = None) -> RunStore:
    """Create a run directory, or check that an existing one holds the same spec (and, if
    ``threads`` is given, the same torch thread count)."""
    store = store or RunStore(path)
    store.check_writable()  # a planted symlink must not redirect the run outside --out
    if (path / SPEC).exists():
        old = load_spec(path / SPEC)
        if old.digest() != spec.digest():
            raise EosbranchError(f"{path}: exists with a different spec; choose another --out or name")
        check_threads(path, _lineage(store).get("threads"), threads)
    else:
        store.path.mkdir(parents=True, exist_ok=True)
        store.create(spec.to_yaml(), lineage or {
            "parent": None, "fork_step": None, "branch": "trunk", "branch_spec": None,
            "branch_hash": None, "code_version": __version__,
            "threads": positive_threads(threads) if threads is not None else torch.get_num_threads(),
        })
    return store


def positive_threads(threads) -> int:
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise EosbranchError(f"threads: expected a positive number of torch threads, got {threads!r}")
    return threads


def check_threads(path: Path, recorded: Optional[int], threads: Optional[int]) -> None:
    """A run continues with the thread count it was started with (lineage.json ``threads``):
    float reductions can round differently with another count, which would break bit-exact resume."""
    if threads is not None and recorded is not None and positive_threads(threads) != int(recorded):
        raise EosbranchError(f"{path / LINEAGE}: threads: the run was started with {recorded} torch thread(s) "
                             f"and continues with them; --threads {threads} differs (omit it)")


def train(spec: Union[Spec, dict, str, Path], out: Union[str, Path] = "runs", *, steps: Optional[int] = None,
          seed: Optional[int] = None, run_dir: Optional[Union[str, Path]] = None, progress: bool = False,
          warn: Callable[[str], None] = lambda m: None, threads: Optional[int] = None, limits: bool = True) -> Run:
    """Train a spec into a run directory (resuming it if it already exists) and return the Run.

    ``threads``: torch threads for a new run (default: torch's current count), recorded in
    ``lineage.json`` and kept on resume and fork; an existing run refuses another count.
    ``limits``: refuse a spec whose memory estimate exceeds the machine's (:mod:`eosbranch.resources`)."""
    source = str(spec) if isinstance(spec, (str, Path)) else ""
    if isinstance(spec, (str, Path)):
        spec = load_spec(spec, steps=steps, seed=seed)
    else:
        raw = spec.model_dump() if isinstance(spec, Spec) else dict(spec)
        spec = parse_spec({**raw, **{k: v for k, v in (("steps", steps), ("seed", seed)) if v is not None}})
    if limits:  # before anything is allocated or written: a spec that cannot fit is one line
        from .resources import check_resources  # top-level in train's successor (helper B)

        check_resources(spec, source or "<spec>")
    path = Path(run_dir) if run_dir else run_dir_for(spec, out)
    # The lock before anything is written or cleaned (store.new_locked): a second writer fails
    # here having changed nothing, and only the lock holder ever removes a run it failed to start.
    store, created = RunStore(path).new_locked()
    try:
        store = open_run(spec, path, threads=threads, store=store)
        return _drive(spec, store, progress, warn)
    except BaseException as e:
        if created and not isinstance(e, DivergenceError):
            _remove_unstarted(path)
        if isinstance(e, SpecError) and source and not str(e).startswith(source):
            raise SpecError(f"{source}: {e}") from None  # e.g. a group named nowhere: name the file too
        raise
    finally:
        store.unlock()


def _remove_unstarted(path: Path) -> None:
    """A run this call created that failed before its first step (a spec whose data, groups or
    model cannot be built; no space for the first checkpoint) leaves no directory behind."""
    import shutil

    try:
        steps = RunStore(path).checkpoint_steps()
    except EosbranchError:
        return
    if max(steps, default=0) == 0:
        shutil.rmtree(path, ignore_errors=True)


def resume(run_dir: Union[str, Path], steps: Optional[int] = None, progress: bool = False,
           warn: Callable[[str], None] = lambda m: None, threads: Optional[int] = None,
           store: Optional[RunStore] = None) -> Run:
    """Continue a run from its last valid checkpoint; ``steps`` is the new total; ``threads``, if
    given, must equal the run's recorded count."""
    path = Path(run_dir)
    if not (path / SPEC).exists():
        raise EosbranchError(f"{path}: not a run directory (no {SPEC})")
    spec = load_spec(path / SPEC, steps=steps)
    store = store or RunStore(path)
    check_threads(path, _lineage(store).get("threads"), threads)
    return _drive(spec, store, progress, warn)


@contextlib.contextmanager
def pinned_threads(n: Optional[int]):
    """Run with the CPU thread count a run was started with: float reductions (sums over
    thousands of points) can round differently with another count, and a resumed run or a fork
    must reproduce its parent bit for bit."""
    old = torch.get_num_threads()
    if n and n != old:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        if torch.get_num_threads() != old:
            torch.set_num_threads(old)


def _drive(spec: Spec, store: RunStore, progress: bool, warn) -> Run:
    lineage = _lineage(store)
    with pinned_threads(lineage.get("threads")):
        return _drive_pinned(spec, store, lineage, progress, warn)


def _drive_pinned(spec: Spec, store: RunStore, lineage: dict, progress: bool, warn) -> Run:
    store.warn = warn
    store.lock()
    try:
        if load_spec(store.path / SPEC).steps != spec.steps:  # written only under the lock
            if spec.steps < max(store.checkpoint_steps(), default=0):
                raise EosbranchError(f"{store.path}: has checkpoints past step {spec.steps}; "
                                     "a run can be extended, not shortened")
            store.write_text(SPEC, spec.to_yaml())  # an extension: the same run, more steps
        done = store.completed_steps()
        if done is not None and done == spec.steps and _final_checkpoint_ok(store, done, warn) \
                and store.repair_tables(warn):
            return Run(store.path)  # complete (damaged tables rewritten from the checkpoints' rows)
        exp = build(spec)
        trainer = Trainer(exp, store, branch=lineage.get("branch") or "trunk", warn=warn)
        if store.checkpoint_steps():
            if lineage.get("fork_step") is not None:
                # A branch's checkpoints all follow its fork: rebuild what its interventions changed.
                from .fork import BranchSpec, stop_rule

                for iv in BranchSpec.model_validate(lineage["branch_spec"]).compose(str(store.path / LINEAGE)):
                    iv.configure(exp)
                trainer.until = stop_rule(lineage)
            trainer.resume()
        else:
            trainer.start_fresh()
        with _progress(progress, spec.steps, trainer.st.step) as on_step:
            trainer.run(spec.steps, Watch(on_step, warn))  # warns if the run saturates or collapses
    finally:
        store.unlock()
    return Run(store.path)


def _final_checkpoint_ok(store: RunStore, done: int, warn) -> bool:
    """A finished run's final checkpoint is there and valid; else it is reported and the run is
    re-run from its newest valid checkpoint (the training is deterministic: it comes back bit for bit)."""
    try:
        step = store.load_checkpoint(warn=warn)["step"]
    except EosbranchError:
        step = None
    if step == done:
        return True
    warn(f"{store.checkpoint_dir}: the final checkpoint (step {done}) is missing or damaged; rebuilding it "
         f"from {'the start' if step is None else f'step {step}'}")
    return False


def _lineage(store: RunStore) -> dict:
    try:
        return store.read_json(LINEAGE)
    except FileNotFoundError:
        return {}


@contextlib.contextmanager
def _progress(enabled: bool, total: int, start: int):
    """A rich progress bar on stderr: step, loss, last sharpness, ETA."""
    if not enabled:
        yield lambda tr, loss: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    cols = [TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4g}  sharpness {task.fields[sharp]}"), TimeRemainingColumn()]
    with Progress(*cols, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task("train", total=total, completed=start, loss=float("nan"), sharp="-")
        last = [0.0]

        def on_step(tr: Trainer, loss: float) -> None:
            now = time.monotonic()
            if now - last[0] > 0.1 or tr.st.step == total:  # keep the hot loop cheap
                s = tr.st.measured.get("sharpness")
                bar.update(task, completed=tr.st.step, loss=loss, sharp="-" if s is None else f"{s:.4g}")
                last[0] = now

        yield on_step
