"""Sweeps: the same spec over several seeds (and their forks) as independent jobs.

One job per seed: train the spec with that seed (``train`` reuses and resumes existing run
directories), then, if asked, fork it into branches. Jobs go through an executor from
:data:`EXECUTORS` (one registry shape, like every extension point):

- ``local``: the standard library's process pool (``forkserver``, where it exists, which imports
  torch once and forks workers from a process that never ran an op; else ``spawn``; never plain
  ``fork``); ``jobs=1`` runs the jobs one by one in this process.
- ``ray``: Ray tasks on ``ray.init(address=...)`` or a local instance (extra ``eosbranch[ray]``).
- ``slurm``: submitit's ``AutoExecutor`` (extra ``eosbranch[slurm]``); ``cluster: local`` or
  ``debug`` runs the same code on this machine.

An executor is registered as a function from its parameters to a runner
``run(jobs_list, *, jobs, out, on_done) -> [JobResult]``; the function checks what it needs (an
installed extra, a cluster) before any job starts. The runner calls :func:`run_job` wherever it
likes (it is a plain module-level function of a picklable :class:`Job`, and never raises).

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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

from pydantic import Field

from .errors import EosbranchError, Interrupted
from .registry import Params, Registry
from .run import Run
from .store import atomic_write

EXECUTORS = Registry("executor")
MANIFEST = "sweep.json"
FORK_KINDS = ("step", "onset", "teff")
# Imported once by the local executor's fork server, so workers start warm (in this order: probes
# silences a warning the jvp decompositions raise; an ImportError there is ignored). The torch
# modules are ones a job otherwise imports on first use (about 2 s per worker).
PRELOAD = ["eosbranch.sweep", "eosbranch.train", "eosbranch.fork", "eosbranch.compare", "eosbranch.probes",
           "sklearn.datasets", "torch._dynamo", "torch.fx.experimental.symbolic_shapes",
           "torch._decomp.decompositions_for_jvp"]


@dataclass(frozen=True)
class Job:
    """Everything one worker needs, as plain data (it crosses process and machine boundaries)."""

    seed: int
    spec: dict
    out: str
    fork: Optional[tuple] = None
    branches: Any = "exit_eos"
    steps: Optional[int] = None
    until: Optional[str] = None
    teff: Optional[float] = None
    threads: int = 1
    limits: bool = True  # the resource estimate (eosbranch.limits); checked once before the jobs too

    @property
    def name(self) -> str:
        return f"seed {self.seed}"


@dataclass
class JobResult:
    seed: int
    status: str  # "done" (ran something), "reused" (everything existed already), "failed"
    run: Optional[str] = None  # the parent run directory
    branches: list[str] = field(default_factory=list)
    stage: Optional[str] = None  # where a failure happened: train, fork or executor
    error: Optional[str] = None  # one line
    threads: Optional[int] = None  # torch threads the job ran with (as torch reported them)
    pid: Optional[int] = None  # the process that ran the job
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"seed {self.seed}"

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    def describe(self) -> str:
        """``seed 2: train failed: <the error>`` (or ``seed 2: done``)."""
        if self.failed:
            return f"{self.name}: {self.stage} failed: {self.error}"
        return f"{self.name}: {self.status}"


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


def one_line(err: BaseException, limit: int = 400) -> str:
    """A user's error as it is; anything else as ``Type: message``; either on one line."""
    text = " ".join(str(err).split())
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    if isinstance(err, EosbranchError):
        return text or type(err).__name__
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


# -- the job ------------------------------------------------------------------------------------
def run_job(job: Job) -> JobResult:
    """Train one seed, then fork it. A failure is returned, named by its stage, not raised; only
    Ctrl-C (KeyboardInterrupt, or train's Interrupted after its checkpoint) stops the sweep."""
    import torch

    from .fork import fork as fork_run
    from .spec import parse_spec
    from .train import run_dir_for, train as train_run

    start = time.monotonic()
    warnings: list[str] = []
    previous = torch.get_num_threads()
    torch.set_num_threads(job.threads)
    res = JobResult(seed=job.seed, status="failed", threads=torch.get_num_threads(), pid=os.getpid(),
                    warnings=warnings)
    stage = "train"
    try:
        spec = parse_spec({**job.spec, "seed": job.seed})
        path = run_dir_for(spec, job.out)
        res.run = str(path)
        reused = Run(path).complete if (path / "spec.yaml").is_file() else False
        run = train_run(spec, job.out, warn=warnings.append, limits=job.limits)
        res.run = str(run.path)
        if job.fork is not None:
            stage = "fork"
            finished = {p for p in run.path.parent.glob(f"{run.name}--*") if _complete(p)}
            extra = {k: v for k, v in (("until", job.until), ("teff", job.teff)) if v is not None}
            done = fork_run(run, at=tuple(job.fork), branches=job.branches, steps=job.steps,
                            warn=warnings.append, **extra)
            res.branches = [str(b.path) for b in done]
            reused = reused and all(b.path in finished for b in done)
        res.status, res.stage = ("reused" if reused else "done"), None
    except BaseException as err:  # noqa: BLE001 - every failure is reported, the sweep goes on
        if isinstance(err, (KeyboardInterrupt, Interrupted)):
            raise  # Ctrl-C stops the sweep (train has saved a checkpoint; a re-run resumes)
        res.stage, res.error = stage, one_line(err)
    finally:
        torch.set_num_threads(previous)
        res.seconds = time.monotonic() - start
    return res


def _complete(path: Path) -> bool:
    try:
        return Run(path).complete
    except Exception:  # noqa: BLE001 - a half-written directory is simply not complete
        return False


# -- executors ----------------------------------------------------------------------------------
def _failure(job: Job, err: BaseException) -> JobResult:
    return JobResult(seed=job.seed, status="failed", stage="executor", error=one_line(err), threads=job.threads)


def _windowed(calls: list[Job], jobs: int, submit: Callable, wait: Callable, on_done: Callable) -> list[JobResult]:
    """Keep at most ``jobs`` jobs in flight: ``submit(job) -> handle``; ``wait(handles) ->
    [(handle, result-or-exception)]`` for at least one finished handle."""
    results: dict[int, JobResult] = {}
    queue = list(enumerate(calls))
    flying: dict[Any, tuple[int, Job]] = {}
    while queue or flying:
        while queue and len(flying) < jobs:
            i, job = queue.pop(0)
            try:
                flying[submit(job)] = (i, job)
            except Exception as err:  # noqa: BLE001 - a refused submission fails that job only
                results[i] = _failure(job, err)
                on_done(results[i])
        if not flying:
            continue
        for handle, outcome in wait(list(flying)):
            i, job = flying.pop(handle)
            results[i] = outcome if isinstance(outcome, JobResult) else _failure(job, outcome)
            on_done(results[i])
    return [results[i] for i in range(len(calls))]


def _default_start() -> str:
    import multiprocessing

    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


class LocalParams(Params):
    mp_context: Literal["forkserver", "spawn"] = Field(
        default_factory=_default_start,
        description="how worker processes start: forkserver (POSIX; imports once, then forks) or spawn; "
                    "never fork, which torch does not survive")


@EXECUTORS.register("local", LocalParams)
def local_executor(p: LocalParams) -> Callable[..., list[JobResult]]:
    """The standard library's process pool; ``jobs=1`` runs in this process, one job after another."""

    def run(calls: list[Job], *, jobs: int, out: Path, on_done: Callable) -> list[JobResult]:
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor
        from concurrent.futures import wait as wait_futures

        if jobs == 1 or len(calls) == 1:
            results = []
            for job in calls:
                results.append(run_job(job))
                on_done(results[-1])
            return results
        ctx = multiprocessing.get_context(p.mp_context)
        if p.mp_context == "forkserver":
            # The server imports torch and eosbranch once (without running any op, so no threads
            # exist yet); each worker forks from it instead of importing everything again.
            ctx.set_forkserver_preload(PRELOAD)
        pool = ProcessPoolExecutor(max_workers=min(jobs, len(calls)), mp_context=ctx,
                                   initializer=die_with, initargs=(os.getpid(),))
        try:
            def wait(handles):
                done, _ = wait_futures(handles, return_when=FIRST_COMPLETED)
                return [(f, f.exception() or f.result()) for f in done]

            return _windowed(calls, jobs, lambda job: pool.submit(run_job, job), wait, on_done)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    return run


def die_with(pid: int) -> None:
    """A worker dies with the sweep that started it, however the sweep ends (SIGKILL included):
    the kernel's parent-death signal (Linux; the parent is the fork server or the sweep) and a
    watcher thread that ends the worker once the sweep's pid is gone (any POSIX)."""
    import signal
    import threading

    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass

    def watch():
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os.kill(os.getpid(), signal.SIGKILL)
            except PermissionError:
                pass
            if os.getppid() == 1:  # re-parented to init: whatever started us is gone
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.2)

    threading.Thread(target=watch, name="die-with-sweep", daemon=True).start()


def _need(module: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise EosbranchError(f"--executor {extra} needs {module}: pip install 'eosbranch[{extra}]'") from None


class RayParams(Params):
    address: Optional[str] = Field(None, description="a running Ray cluster (e.g. 'auto' or 'ray://host:10001'); "
                                                     "default: the initialised one, else a local instance")


@EXECUTORS.register("ray", RayParams)
def ray_executor(p: RayParams) -> Callable[..., list[JobResult]]:
    """Ray tasks (one CPU per torch thread), at most ``jobs`` in flight."""
    ray = _need("ray", "ray")
    if ray.is_initialized() and p.address is not None:
        raise EosbranchError("ray is already initialised in this process; drop --address or call ray.shutdown()")

    def run(calls: list[Job], *, jobs: int, out: Path, on_done: Callable) -> list[JobResult]:
        started = not ray.is_initialized()
        if started:  # else: the caller's instance, which the caller shuts down
            ray.init(address=p.address, include_dashboard=False, log_to_driver=False)
        try:
            remote = ray.remote(num_cpus=calls[0].threads, max_retries=0)(run_job)

            def wait(handles):
                done, _ = ray.wait(handles, num_returns=1)
                pairs = []
                for ref in done:
                    try:
                        pairs.append((ref, ray.get(ref)))
                    except Exception as err:  # noqa: BLE001 - a lost worker fails its job only
                        pairs.append((ref, err))
                return pairs

            return _windowed(calls, jobs, lambda job: remote.remote(job), wait, on_done)
        finally:
            if started:
                ray.shutdown()

    return run


class SlurmParams(Params):
    folder: Optional[str] = Field(None, description="submitit's logs and pickles (default: OUT/.submitit)")
    cluster: Literal["slurm", "local", "debug"] = Field(
        "slurm", description="submitit's executor: slurm, or (to try a sweep on this machine) local "
                             "(subprocesses) or debug (in this process)")
    timeout_min: int = Field(60, gt=0)
    partition: Optional[str] = None
    mem_gb: Optional[float] = Field(None, gt=0)
    gpus_per_node: int = Field(0, ge=0)
    poll_seconds: float = Field(1.0, gt=0, description="how often finished jobs are looked for")


@EXECUTORS.register("slurm", SlurmParams)
def slurm_executor(p: SlurmParams) -> Callable[..., list[JobResult]]:
    """submitit's AutoExecutor (Slurm, or its local/debug executors), at most ``jobs`` in flight."""
    import shutil

    submitit = _need("submitit", "slurm")
    if p.cluster == "slurm" and shutil.which("sbatch") is None:
        raise EosbranchError("--executor slurm: sbatch is not on PATH (no Slurm here); "
                             "to try the sweep on this machine use the executor option cluster='local'")

    def run(calls: list[Job], *, jobs: int, out: Path, on_done: Callable) -> list[JobResult]:
        ex = submitit.AutoExecutor(folder=Path(p.folder) if p.folder else out / ".submitit", cluster=p.cluster)
        params = {"timeout_min": p.timeout_min, "cpus_per_task": calls[0].threads,
                  "gpus_per_node": p.gpus_per_node, "name": "eosbranch-sweep"}
        if p.mem_gb is not None:
            params["mem_gb"] = p.mem_gb
        if p.partition is not None:
            params["slurm_partition"] = p.partition
        ex.update_parameters(**params)

        def wait(handles):
            while not any(h.done() for h in handles):
                time.sleep(p.poll_seconds)
            pairs = []
            for h in (h for h in handles if h.done()):
                try:
                    pairs.append((h, h.result()))
                except Exception as err:  # noqa: BLE001 - a failed or cancelled submission
                    pairs.append((h, err))
            return pairs

        return _windowed(calls, jobs, lambda job: ex.submit(run_job, job), wait, on_done)

    return run


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
    from .spec import Spec, load_spec, parse_spec

    out = Path(out).resolve()
    resolved = load_spec(spec) if isinstance(spec, (str, Path)) else parse_spec(
        spec.model_dump(mode="json") if isinstance(spec, Spec) else dict(spec))
    if limits:  # once, before any job starts or the manifest is written
        from .limits import check_resources

        check_resources(resolved, str(spec) if isinstance(spec, (str, Path)) else "<spec>")
    seeds = _check_seeds(seeds)
    if not isinstance(jobs, int) or jobs < 1:
        raise EosbranchError(f"jobs: expected a positive number of parallel jobs, got {jobs!r}")
    entry, params = EXECUTORS.parse({"kind": executor, **executor_options}, "executor")
    execute = entry.fn(params)  # checks what it needs (an installed extra, sbatch) before anything runs
    branches = _check_fork(fork, branches, steps, until, teff)
    previous = _read_manifest(out / MANIFEST)
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
    _write_manifest(out, manifest)

    def finished(res: JobResult) -> None:
        slot = next(r for r in manifest["runs"] if r["seed"] == res.seed)
        slot.update(run=_rel(res.run, out), branches=[_rel(b, out) for b in res.branches], status=res.status,
                    stage=res.stage, error=res.error)
        _write_manifest(out, manifest)
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
    import importlib

    fork_module = importlib.import_module(".fork", __package__)  # the package binds `fork` to the function
    accepted = inspect.signature(fork_module.fork).parameters
    missing = [k for k, v in (("until", until), ("teff", teff)) if v is not None and k not in accepted]
    if missing:
        raise EosbranchError(f"{', '.join(missing)}: this version of eosbranch.fork does not take it yet")
    if hasattr(fork_module, "load_branches"):
        fork_module.load_branches(branches)  # a typo fails now, once, not once per job
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


def _write_manifest(out: Path, manifest: dict) -> None:
    atomic_write(out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())


def _read_manifest(path: Path) -> Optional[dict]:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise EosbranchError(f"{path}: not valid JSON (edited or damaged); delete it and re-run the sweep") from None


def is_sweep(path: Union[str, Path]) -> bool:
    return (Path(path) / MANIFEST).is_file()


def load_sweep(path: Union[str, Path]) -> dict:
    """A sweep manifest with its run and branch directories as absolute paths."""
    path = Path(path)
    manifest = _read_manifest(path / MANIFEST)
    if manifest is None:
        raise EosbranchError(f"{path}: not a sweep directory (no {MANIFEST})")
    for r in manifest["runs"]:
        r["run"] = None if r.get("run") is None else str(path / r["run"])
        r["branches"] = [str(path / b) for b in r.get("branches", [])]
    return manifest


def sweep_runs(path: Union[str, Path], warn: Callable[[str], None] = lambda m: None) -> list[Run]:
    """The parent runs of a sweep's finished jobs (a failed or unfinished one is named and skipped)."""
    runs = []
    for r in load_sweep(path)["runs"]:
        if r["status"] in ("done", "reused"):
            runs.append(Run(r["run"]))
        else:
            why = f"{r['stage']} failed: {r['error']}" if r["status"] == "failed" else r["status"]
            warn(f"seed {r['seed']} skipped ({why}); re-run the sweep to finish it")
    if not runs:
        raise EosbranchError(f"{path}: no finished runs in {MANIFEST}; re-run the sweep")
    return runs

