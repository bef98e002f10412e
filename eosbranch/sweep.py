"""Sweeps: the same spec over several seeds (and their forks) as independent jobs.

One job per seed: train the spec with that seed (``train`` reuses and resumes existing run
directories), then, if asked, fork it into branches. Jobs go through an executor of
:data:`executors.EXECUTORS` (local process pool, ray, slurm).

Bit-identical results: a CPU reduction's rounding can depend on the number of threads that
split it, so every job, a serial one too, runs under ``torch.set_num_threads(threads)``. The
default is 1 (so ``--jobs J`` never oversubscribes and the bits do not depend on J or on the
machine's core count); a re-run reuses the thread count recorded in ``sweep.json`` so a resumed
run continues with the count it started with. A sweep's runs equal the same ``train`` + ``fork``
calls made one by one with that thread count.

A failed job (any exception) is reported by seed, stage and a one-line error; the others finish.
Re-running the same sweep redoes only what is missing (finished runs and branches are reused).
``OUT/sweep.json`` lists the parent runs and their branches, so ``eosbranch compare OUT`` reads
the whole sweep.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

from .errors import EosbranchError
from .executors import EXECUTORS, FORK, Job, JobResult, one_line, run_job  # noqa: F401  (the sweep API)
from .resources import check_resources
from .run import Run
from .spec import Spec, load_spec, parse_spec
from .sweep_manifest import MANIFEST, is_sweep, load_sweep, read_manifest, sweep_runs, write_manifest  # noqa: F401

FORK_KINDS = ("step", "onset", "teff")


@dataclass
class SweepResult:
    jobs: list[JobResult]
    manifest: Path
    threads: int

    @property
    def failed(self) -> list[JobResult]:
        return [j for j in self.jobs if j.failed]

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def runs(self) -> list[Run]:
        """The parent runs of the jobs that finished."""
        return [Run(j.run) for j in self.jobs if not j.failed]

    @property
    def branches(self) -> list[Run]:
        return [Run(b) for j in self.jobs if not j.failed for b in j.branches]


# -- the sweep ----------------------------------------------------------------------------------
def sweep(spec: Any, seeds: list[int], out: Union[str, Path] = "runs", fork: Optional[tuple] = None,
          branches: Any = "exit_eos", until: Optional[str] = None, steps: Optional[int] = None,
          teff: Optional[float] = None, jobs: int = 1, executor: str = "local", *,
          threads: Optional[int] = None, on_start: Callable[[list[Job]], None] = lambda jobs: None,
          on_done: Callable[[JobResult], None] = lambda r: None, warn: Callable[[str], None] = lambda m: None,
          limits: bool = True, **executor_options) -> SweepResult:
    """Train ``spec`` once per seed (and fork each run at ``fork``) through an executor.

    ``fork``: ``(kind, value)`` with kind ``step``, ``onset`` or ``teff`` (None: train only).
    ``branches``, ``steps``, ``until``, ``teff``: passed to :func:`eosbranch.fork` for each run.
    ``threads``: torch threads per job (default: the count recorded in OUT/sweep.json, else 1).
    ``executor_options``: the executor's own parameters (``mp_context``, ``address``, ``folder``...).
    ``on_start(jobs)`` is called once everything is checked, ``on_done(result)`` as each job ends.
    Returns every job's result; failures are in ``.failed``, nothing is raised for them.
    """
    out = Path(out).resolve()
    resolved = load_spec(spec) if isinstance(spec, (str, Path)) else parse_spec(
        spec.model_dump(mode="json") if isinstance(spec, Spec) else dict(spec))
    if limits:  # once, before any job starts or the manifest is written
        check_resources(resolved, str(spec) if isinstance(spec, (str, Path)) else "<spec>")
    seeds = _check_seeds(seeds)
    if not isinstance(jobs, int) or jobs < 1:
        raise EosbranchError(f"jobs: expected a positive number of parallel jobs, got {jobs!r}")
    entry, params = EXECUTORS.parse({"kind": executor, **executor_options}, "executor")
    execute = entry.fn(params)  # checks what it needs (an installed extra, sbatch) before anything runs
    branches = _check_fork(fork, branches, steps, until, teff)
    previous = read_manifest(out / MANIFEST)
    if threads is None:
        same = previous is not None and previous.get("spec_hash") == _spec_hash(resolved)
        threads = int(previous.get("threads", 1)) if same else 1
    if not isinstance(threads, int) or threads < 1:
        raise EosbranchError(f"threads: expected a positive number of torch threads per job, got {threads!r}")
    cores = _cores()
    if entry.name == "local" and min(jobs, len(seeds)) * threads > cores:
        warn(f"{min(jobs, len(seeds))} jobs x {threads} threads on {cores} cores: oversubscribed "
             f"(--threads {max(1, cores // jobs)} fits)")
    if previous is not None and previous.get("spec_hash") != _spec_hash(resolved):
        warn(f"{out / MANIFEST}: replacing the manifest of another sweep ({previous.get('spec')}); "
             "use one --out per sweep")

    body = resolved.model_dump(mode="json")
    calls = [Job(seed=s, spec=body, out=str(out), fork=None if fork is None else (str(fork[0]), fork[1]),
                 branches=branches, steps=steps, until=until, teff=teff, threads=threads, limits=limits)
             for s in seeds]
    manifest = {
        "spec": resolved.name, "spec_hash": _spec_hash(resolved), "seeds": seeds,
        "fork": None if fork is None else [fork[0], fork[1]], "branches": _jsonable(branches),
        "steps": steps, "until": until, "teff": teff, "executor": entry.name, "jobs": jobs, "threads": threads,
        "runs": [{"seed": s, "run": None, "branches": [], "status": "pending", "stage": None, "error": None}
                 for s in seeds],
    }
    out.mkdir(parents=True, exist_ok=True)
    write_manifest(out, manifest)

    def finished(res: JobResult) -> None:
        slot = next(r for r in manifest["runs"] if r["seed"] == res.seed)
        slot.update(run=_rel(res.run, out), branches=[_rel(b, out) for b in res.branches], status=res.status,
                    stage=res.stage, error=res.error)
        write_manifest(out, manifest)
        on_done(res)

    on_start(calls)
    results = execute(calls, jobs=jobs, out=out, on_done=finished)
    return SweepResult(results, out / MANIFEST, threads)


def _check_seeds(seeds) -> list[int]:
    seeds = list(seeds) if seeds is not None else []
    if not seeds:
        raise EosbranchError("seeds: give at least one seed (e.g. --seeds 0,1,2)")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise EosbranchError(f"seeds: expected non-negative integers, got {seeds}")
    dup = sorted({s for s in seeds if seeds.count(s) > 1})
    if dup:
        raise EosbranchError(f"seeds: each seed once; repeated: {', '.join(map(str, dup))}")
    return seeds


def _check_fork(fork, branches, steps, until, teff):
    """Validate the fork request here, before any job starts; returns the branches to pass on."""
    if fork is None:
        given = [n for n, v in (("steps", steps), ("until", until), ("teff", teff)) if v is not None]
        if given:
            raise EosbranchError(f"{', '.join(given)}: only apply to forks; add a fork (e.g. --fork onset)")
        return branches
    if not (isinstance(fork, (tuple, list)) and len(fork) == 2 and fork[0] in FORK_KINDS):
        raise EosbranchError(f"fork: expected (kind, value) with kind one of {', '.join(FORK_KINDS)}; got {fork!r}")
    accepted = inspect.signature(FORK.fork).parameters
    missing = [k for k, v in (("until", until), ("teff", teff)) if v is not None and k not in accepted]
    if missing:
        raise EosbranchError(f"{', '.join(missing)}: this version of eosbranch.fork does not take it yet")
    if hasattr(FORK, "load_branches"):
        FORK.load_branches(branches)  # a typo fails now, once, not once per job
    if isinstance(branches, (str, Path)) and Path(branches).is_file():
        branches = str(Path(branches).resolve())  # workers may run elsewhere
    return branches


def _spec_hash(spec) -> str:
    """The sweep's identity: the spec without its seed."""
    body = spec.model_dump(mode="json", exclude={"seed"})
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:8]


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _jsonable(obj):
    try:
        json.dumps(obj)
        return obj
    except TypeError:
        return str(obj)


def _rel(path: Optional[str], base: Path) -> Optional[str]:
    if path is None:
        return None
    p = Path(path)
    return str(p.relative_to(base)) if p.is_relative_to(base) else str(p)


