"""Training a run directory to its end: ``train(spec)`` starts or resumes a run, ``resume(path)``
continues one. The one entry point for a trunk, a new branch and a resumed branch alike: a trunk
starts fresh or from its newest checkpoint, a branch through :func:`eosbranch.branch.start_branch`;
then the loop (:mod:`eosbranch.loop`) runs it to its last step or its stop rule.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Union

from .branch import start_branch
from .errors import DivergenceError, EosbranchError, SpecError
from .experiment import build
from .health import Watch
from .resources import check_resources
from .lineage import stop_rule
from .loop import Trainer
from .progress import progress_bar
from .run import Run
from .rundir import open_run, read_lineage, remove_unstarted, run_dir_for
from .spec import Spec, load_spec, parse_spec
from .store import SPEC, RunStore
from .threads import check_threads, pinned_threads

# opposing.py imports these from here (the lead moves that import to eosbranch.state / eosbranch.step).
from .state import restore_state  # noqa: E402,F401
from .step import replay  # noqa: E402,F401

__all__ = ["train", "resume", "run_dir_for"]


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
            remove_unstarted(path)
        if isinstance(e, SpecError) and source and not str(e).startswith(source):
            raise SpecError(f"{source}: {e}") from None  # e.g. a group named nowhere: name the file too
        raise
    finally:
        store.unlock()


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
    check_threads(path, read_lineage(store).get("threads"), threads)
    return _drive(spec, store, progress, warn)


def _drive(spec: Spec, store: RunStore, progress: bool, warn) -> Run:
    lineage = read_lineage(store)
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
        start = max(store.checkpoint_steps(), default=lineage.get("fork_step") or 0)
        # Built before the progress bar: a spec that cannot be built (a group named nowhere) is
        # then one line on stderr, with no bar drawn above it.
        exp = build(spec) if lineage.get("fork_step") is None else None
        with progress_bar(progress, spec.steps, start) as show:
            watch = Watch(show, warn)  # warns if the run saturates or collapses
            if lineage.get("fork_step") is not None:
                trainer = start_branch(store, lineage, warn, watch)  # a new or a resumed branch
            else:
                trainer = Trainer(exp, store, warn=warn)
                if store.checkpoint_steps():
                    trainer.resume()
                else:
                    trainer.start_fresh()
            trainer.run(spec.steps, watch, until=stop_rule(lineage))
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
