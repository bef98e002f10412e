"""Executors: where a sweep's jobs run. One job per seed (:class:`Job`, plain data) goes through an
executor from :data:`EXECUTORS` (one registry shape, like every extension point):

- ``local``: the standard library's process pool (``forkserver``, where it exists, which imports
  torch once and forks workers from a process that never ran an op; else ``spawn``; never plain
  ``fork``); ``jobs=1`` runs the jobs one by one in this process.
- ``ray``: Ray tasks on ``ray.init(address=...)`` or a local instance (extra ``eosbranch[ray]``).
- ``slurm``: submitit's ``AutoExecutor`` (extra ``eosbranch[slurm]``); ``cluster: local`` or
  ``debug`` runs the same code on this machine.

An executor is registered as a function from its parameters to a runner
``run(jobs_list, *, jobs, out, on_done) -> [JobResult]``; the function checks what it needs (an
installed extra, a cluster) before any job starts. The runner calls :func:`run_job` wherever it
likes (it is a plain module-level function of a picklable :class:`Job`, and never raises). Every
job, a serial one too, runs under ``torch.set_num_threads(job.threads)`` (see sweep.py: the bits
of a CPU reduction can depend on the thread count).
"""

from __future__ import annotations

import ctypes
import importlib
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional

import torch
from pydantic import Field

from .errors import EosbranchError, Interrupted
from .fork import fork as _fork  # noqa: F401  (called through its module, below)
from .registry import Params, Registry
from .run import Run
from .spec import parse_spec
from .rundir import run_dir_for

EXECUTORS = Registry("executor")
# Imported once by the local executor's fork server, so workers start warm (in this order: probes
# silences a warning the jvp decompositions raise; an ImportError there is ignored). The torch
# modules are ones a job otherwise imports on first use (about 2 s per worker).
PRELOAD = ["eosbranch.executors", "eosbranch.train", "eosbranch.fork", "eosbranch.compare", "eosbranch.probes",
           "sklearn.datasets", "torch._dynamo", "torch.fx.experimental.symbolic_shapes",
           "torch._decomp.decompositions_for_jvp"]
# A job calls train and fork through their modules, looked up when it runs (the package binds the
# names `train` and `fork` to the functions), so a replaced eosbranch.train.train or
# eosbranch.fork.fork is the one that runs: tests inject failures this way.
TRAIN = sys.modules[f"{__package__}.train"]
FORK = sys.modules[f"{__package__}.fork"]


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
        run = TRAIN.train(spec, job.out, warn=warnings.append, limits=job.limits)
        res.run = str(run.path)
        if job.fork is not None:
            stage = "fork"
            finished = {p for p in run.path.parent.glob(f"{run.name}--*") if _complete(p)}
            extra = {k: v for k, v in (("until", job.until), ("teff", job.teff)) if v is not None}
            done = FORK.fork(run, at=tuple(job.fork), branches=job.branches, steps=job.steps,
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
    try:
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
