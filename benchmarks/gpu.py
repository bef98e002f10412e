"""The GPU path in one command (issue 16): the gpu tests, then the 2026 protocol's MLP and a small
ViT trained through eosbranch's API on one device, side by side with a bare PyTorch loop.

1. ``pytest -m gpu`` (tests/test_gpu.py: a bit-exact null fork on CUDA, HVPs on CUDA against a dense
   float64 Hessian on the CPU, two identical CUDA runs equal bit for bit), run as a subprocess with
   CUBLAS_WORKSPACE_CONFIG set; they skip without CUDA.
2. Per model, on CIFAR-10 pair (1, 9) from ``--cifar DIR`` (cifar-10-batches-py/ inside) or else
   CIFAR-shaped synthetic data of the same size (N = 10,000 images 3x32x32, two classes with
   class-dependent mean images plus noise, standardised; a ``tensors`` .npz written to a temp dir),
   with the prototype groups (25 per class, centroid boundary rule: the knn rule's 10,000^2
   distances would be rebuilt on the CPU by every run of the script), full-batch GD, eta = 0.01,
   MSE:
     mlp  3072 -> 512 -> 512 -> 2, ReLU, Kaiming-normal x 0.2 (the 2026 study);
     vit  patch 4 (64 patches), d_model 64, 2 pre-norm blocks, 4 heads, MLP ratio 4, mean pool.
   (a) eosbranch with measurements off (``measure: {every: null, sharpness: false}``) and a bare
       loop of the same GD step (forward, MSE, backward, torch.optim.SGD) on the same data and
       initial weights, alternating, ``--repeats`` times: ms per step, median, and their ratio
       (target <= 1.10). Only ``Trainer.run`` is timed (the data loading and group resolution of
       ``eosbranch.train`` are not steps);
   (b) the same run with sharpness and every probe each 32 steps: the time of one measurement
       (the trainer's ``measure`` call, timed with device synchronisation) and the whole-run
       difference per measurement, both in full-batch gradients (forward + backward, timed
       alone); HVPs per solve (the ``eig_matvecs`` rows), peak GPU memory
       (``torch.cuda.max_memory_allocated``) of runs (a) and (b);
   (c) the sharpness at the last measurement against a CPU float64 solve of the same state (its
       checkpoint, the state that measurement saw, loaded into a float64 copy of the model on the
       float32-rounded data; ``hessian_matvec`` + ``top_eigenpairs``, tol 1e-8, warm-started from
       the checkpoint's vector of the measurement before): relative difference, target <= 1e-3.
Times on CUDA are taken between ``torch.cuda.synchronize()`` calls. ``--small`` (N = 500, 60 steps,
MLP width 64, ViT patch 8 / d_model 16 / 1 block / 2 heads, measure every 20) runs on a 2-core CPU in about a minute with
``--device cpu`` (tests/test_benchmark_gpu.py runs it so the script cannot rot). Results also go
to OUT/results.json with ``--out OUT`` (the runs are kept there too).

    python benchmarks/gpu.py [--device auto|cuda|cpu] [--small] [--steps N] [--out DIR]
                             [--cifar DIR] [--models mlp vit] [--repeats 3] [--no-pytest]
"""

from __future__ import annotations

import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts: deterministic GEMMs

import argparse
import copy
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import eosbranch
import eosbranch.loop as trainmod  # the loop: Trainer.run and the measure it calls
from eosbranch.curvature import top_eigenpairs
from eosbranch.experiment import build
from eosbranch.measure import training_hessian
from eosbranch.spec import parse_spec

ROOT = Path(__file__).resolve().parents[1]

# (key, label): the rows of the printed table, in order; results.json holds the same keys.
FIELDS = [
    ("params", "parameters"),
    ("fw_ms", "eosbranch ms/step, no measurements (median)"),
    ("bare_ms", "bare PyTorch ms/step (median)"),
    ("ratio", "ratio eosbranch / bare (target <= 1.10)"),
    ("grad_ms", "one full-batch gradient, ms"),
    ("n_measurements", "measurements"),
    ("measure_ms", "one measurement, ms (median)"),
    ("measure_grads", "one measurement, in gradients"),
    ("measure_grads_run", "  same, from whole-run difference"),
    ("hvps_median", "HVPs per solve, median"),
    ("hvps_max", "HVPs per solve, max"),
    ("peak_plain_mib", "peak GPU memory MiB, no measurements"),
    ("peak_measured_mib", "peak GPU memory MiB, measuring"),
    ("measured_step", "last measurement at step"),
    ("sharpness_run", "lambda_1 of the run (its dtype, device)"),
    ("sharpness_cpu64", "lambda_1 CPU float64, tol 1e-8"),
    ("cpu64_matvecs", "  HVPs of the float64 solve"),
    ("rel_diff", "relative difference (target <= 1e-3)"),
]
MEMORY_KEYS = ("peak_plain_mib", "peak_measured_mib")  # None (printed n/a) off CUDA


def synthetic_npz(path: Path, n: int, seed: int = 0) -> Path:
    """CIFAR-shaped stand-in: two classes of 3x32x32 images, a smooth random mean image per class
    plus pixel noise, standardised per channel like CIFAR-10 after eosbranch's transform."""
    rng = np.random.default_rng(seed)
    coarse = rng.standard_normal((2, 3, 8, 8))
    means = 0.6 * np.repeat(np.repeat(coarse, 4, axis=2), 4, axis=3)  # smooth: 4x4 blocks
    y = np.repeat(np.arange(2), n // 2)
    X = means[y] + rng.standard_normal((n, 3, 32, 32))
    X = (X - X.mean(axis=(0, 2, 3), keepdims=True)) / X.std(axis=(0, 2, 3), keepdims=True)
    np.savez(path, X=X.astype(np.float32), y=y.astype(np.int64))
    return path


def base_spec(args, model: str, data: dict) -> dict:
    small = args.small
    models = {
        "mlp": {"kind": "mlp", "width": 64 if small else 512, "depth": 2, "activation": "relu",
                "init_scale": 0.2, "bias": True},
        "vit": {"kind": "vit", "patch": 8 if small else 4, "d_model": 16 if small else 64, "depth": 1 if small else 2,
                "heads": 2 if small else 4, "mlp_ratio": 2 if small else 4, "pool": "mean"},
    }
    return {
        "name": f"gpu-{model}", "seed": 0, "device": args.device, "dtype": "float32", "data": data,
        "groups": {"kind": "prototypes", "per_class": 5 if small else 25, "alpha": 3.0, "direction": "coherent",
                   "boundary_rule": "centroid", "mode": "train", "seed": 0},
        "model": models[model], "loss": "mse", "optimizer": {"kind": "gd", "lr": 0.01}, "steps": args.steps,
        "measure": {"every": None, "sharpness": False}, "checkpoint": {"every": None},
    }


class Timers:
    """Times ``Trainer.run`` and the trainer's ``measure`` calls (synchronised) while installed."""

    def __init__(self, sync):
        self.sync, self.run_s, self.measure_s = sync, [], []

    def __enter__(self):
        self._run, self._measure = trainmod.Trainer.run, trainmod.measure
        timers = self

        def run(tr, *a, **k):
            timers.sync()
            t0 = time.perf_counter()
            out = timers._run(tr, *a, **k)
            timers.sync()
            timers.run_s.append(time.perf_counter() - t0)
            return out

        def measure(tr):
            timers.sync()
            t0 = time.perf_counter()
            timers._measure(tr)
            timers.sync()
            timers.measure_s.append(time.perf_counter() - t0)

        trainmod.Trainer.run, trainmod.measure = run, measure
        return self

    def __exit__(self, *exc):
        trainmod.Trainer.run, trainmod.measure = self._run, self._measure


def bare_loop(exp, init_state: dict, steps: int, sync) -> float:
    """The same GD step in plain PyTorch: forward, MSE (sum over outputs, mean over points),
    backward, torch.optim.SGD; seconds for ``steps`` steps."""
    model = exp.model
    model.load_state_dict(init_state)
    X, y = exp.train_X, exp.train_y
    target = torch.nn.functional.one_hot(y, exp.data.num_outputs).to(X.dtype)
    opt = torch.optim.SGD(model.parameters(), lr=exp.spec.optimizer["lr"])
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = (model(X) - target).pow(2).sum(1).mean()
        loss.backward()
        opt.step()
    sync()
    return time.perf_counter() - t0


def gradient_seconds(exp, init_state: dict, sync, repeats: int) -> float:
    """Median seconds of one full-batch gradient (forward + backward) at the initial state."""
    exp.model.load_state_dict(init_state)
    params = [p for p in exp.model.parameters() if p.requires_grad]
    times = []
    for _ in range(repeats + 1):  # the first is a warm-up
        sync()
        t0 = time.perf_counter()
        loss = exp.loss_fn(exp.model(exp.train_X), exp.train_y)
        torch.autograd.grad(loss, params)
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def cpu_float64_sharpness(spec: dict, ckpt: dict) -> tuple[float, int]:
    """lambda_1 of the checkpoint's state, on the CPU in float64 (tol 1e-8)."""
    s = parse_spec({**spec, "device": "cpu", "dtype": "float64"})
    exp = build(s)
    exp.data.X = exp.data.X.float().double()  # the run saw float32 inputs
    exp.model.load_state_dict(ckpt["model"])
    H = training_hessian(exp)
    v0 = ckpt.get("eig_vectors")
    v0 = None if v0 is None else v0[:, :1].to(torch.float64)
    res = top_eigenpairs(H, H.dim, k=1, tol=1e-8, v0=v0, max_matvecs=3000)
    return float(res.values[0]), int(res.n_matvecs)


def bench_model(args, name: str, data: dict, out: Path, sync, cuda: bool) -> dict:
    spec = base_spec(args, name, data)
    steps, every = args.steps, args.every
    plain = parse_spec(spec)
    exp = build(plain)  # the bare loop's copy: same data, same initial weights
    init_state = copy.deepcopy(exp.model.state_dict())
    r = {"params": sum(p.numel() for p in exp.model.parameters())}
    r["grad_ms"] = 1e3 * gradient_seconds(exp, init_state, sync, 10)

    def mem_reset():
        if cuda:
            torch.cuda.reset_peak_memory_stats()

    def mem_peak():
        return torch.cuda.max_memory_allocated() / 2**20 if cuda else None

    # (a) warm-up both paths, then alternate.
    warm = max(2, min(20, steps // 10))
    bare_loop(exp, init_state, warm, sync)
    with Timers(sync):
        eosbranch.train(spec, out=out / "warm", steps=warm)
    fw, br, peak_plain = [], [], []
    for i in range(args.repeats):
        br.append(bare_loop(exp, init_state, steps, sync))
        mem_reset()
        with Timers(sync) as t:
            eosbranch.train(spec, out=out / f"plain{i}")
        peak_plain.append(mem_peak())
        fw.append(t.run_s[0])
    del exp
    r["fw_ms"], r["bare_ms"] = 1e3 * statistics.median(fw) / steps, 1e3 * statistics.median(br) / steps
    r["ratio"] = r["fw_ms"] / r["bare_ms"]
    r["peak_plain_mib"] = max(peak_plain) if cuda else None

    # (b) sharpness and every probe each `every` steps; a checkpoint at the last measurement.
    last = (steps // every) * every
    mspec = {**spec, "measure": {"every": every}, "checkpoint": {"every": None, "at": [last]}}
    mem_reset()
    with Timers(sync) as t:
        run = eosbranch.train(mspec, out=out / "measured")
    r["peak_measured_mib"] = mem_peak()
    r["n_measurements"] = len(t.measure_s)
    r["measure_ms"] = 1e3 * statistics.median(t.measure_s)
    r["measure_grads"] = r["measure_ms"] / r["grad_ms"]
    extra = t.run_s[0] - statistics.median(fw)
    r["measure_grads_run"] = 1e3 * extra / r["n_measurements"] / r["grad_ms"]
    mv = run.metric("eig_matvecs")
    r["hvps_median"], r["hvps_max"] = float(mv.median()), int(mv.max())

    # (c) the eigenvalue of the last measurement against CPU float64.
    sharp = run.metric("sharpness")
    r["measured_step"] = int(sharp.index.max())
    r["sharpness_run"] = float(sharp.loc[r["measured_step"]])
    ckpt = run.checkpoint(r["measured_step"])
    assert int(ckpt["step"]) == r["measured_step"], (ckpt["step"], r["measured_step"])
    r["sharpness_cpu64"], r["cpu64_matvecs"] = cpu_float64_sharpness(mspec, ckpt)
    r["rel_diff"] = abs(r["sharpness_run"] - r["sharpness_cpu64"]) / abs(r["sharpness_cpu64"])
    r["run"] = str(run.path)
    return r


def run_gpu_tests() -> tuple[int, str]:
    env = {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-rs", "-p", "no:cacheprovider",
                        "tests/test_gpu.py"], cwd=ROOT, env=env, capture_output=True, text=True)
    lines = [ln for ln in p.stdout.splitlines() if ln.strip()]
    summary = lines[-1] if lines else p.stderr.strip().splitlines()[-1:]
    if p.returncode not in (0, 5):  # 5: nothing collected
        print(p.stdout[-4000:], p.stderr[-2000:], sep="\n")
    return p.returncode, f"{summary} (exit {p.returncode}, {time.perf_counter() - t0:.0f} s)"


def fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, int):
        return f"{v:,}"
    if v != 0 and (abs(v) < 1e-2 or abs(v) >= 1e5):
        return f"{v:.3e}"
    return f"{v:.4g}" if abs(v) < 10 else f"{v:.1f}"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    ap.add_argument("--small", action="store_true", help="N=500, 60 steps, width 64, measure every 20 (CPU check)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None, help="keep the runs and results.json here")
    ap.add_argument("--cifar", type=Path, default=None, help="a directory holding cifar-10-batches-py/")
    ap.add_argument("--models", nargs="+", choices=["mlp", "vit"], default=["mlp", "vit"])
    ap.add_argument("--repeats", type=int, default=None, help="alternating plain/bare repeats (3; 1 with --small)")
    ap.add_argument("--no-pytest", action="store_true", help="skip the pytest -m gpu part")
    args = ap.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device here")
    args.steps = args.steps or (60 if args.small else 1000)
    args.every = 20 if args.small else 32
    args.repeats = args.repeats or (1 if args.small else 3)
    n = 500 if args.small else 10_000
    cuda = args.device == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    dev_name = torch.cuda.get_device_name() if cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"benchmarks/gpu.py: {dev_name}, torch {torch.__version__}, python {sys.version.split()[0]}")

    results: dict = {"device": dev_name, "torch": torch.__version__, "steps": args.steps, "every": args.every, "n": n}
    if not args.no_pytest:
        rc, line = run_gpu_tests()
        results["pytest_gpu"] = {"returncode": rc, "summary": line}
        print(f"1. pytest -m gpu: {line}")

    out_ctx = tempfile.TemporaryDirectory() if args.out is None else None
    out = Path(out_ctx.name) if out_ctx else args.out
    out.mkdir(parents=True, exist_ok=True)
    try:
        if args.cifar is not None and (args.cifar / "cifar-10-batches-py").is_dir():
            data, what = {"kind": "cifar10", "root": str(args.cifar), "classes": [1, 9], "n": n,
                          "download": False}, f"CIFAR-10 pair (1, 9) from {args.cifar}"
        else:
            if args.cifar is not None:
                print(f"   (--cifar {args.cifar}: no cifar-10-batches-py/ there; synthetic data instead)")
            data = {"kind": "tensors", "path": str(synthetic_npz(out / "cifar_shaped.npz", n))}
            what = "CIFAR-shaped synthetic data (3x32x32, 2 classes)"
        print(f"2. {what}, N={n:,}, full-batch GD eta=0.01, MSE, {args.steps} steps, prototype groups; "
              f"measuring: sharpness + all probes every {args.every} steps; {args.repeats} alternating repeats")
        results["data"] = what
        for name in args.models:
            t0 = time.perf_counter()
            results[name] = bench_model(args, name, data, out / name, sync, cuda)
            print(f"   {name}: {time.perf_counter() - t0:.0f} s")
    finally:
        if out_ctx:
            out_ctx.cleanup()
    models = [m for m in args.models]
    print(f"3. {'':<44}" + "".join(f"{m:>14}" for m in models))
    for key, label in FIELDS:
        print(f"   {label:<44}" + "".join(f"{fmt(results[m][key]):>14}" for m in models))
    if args.out is not None:
        (args.out / "results.json").write_text(json.dumps(results, indent=1))
        print(f"results: {args.out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
