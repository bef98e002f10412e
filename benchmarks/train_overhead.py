"""Framework overhead: eosbranch's per-step time over a bare PyTorch loop doing the same GD steps.

Both run side by side in one process, alternating, on the same data and initial weights, with no
measurements scheduled (eosbranch still records the loss every step and writes its checkpoints
at step 0 and at the end). Target: ratio <= 1.10.

    .venv/bin/python benchmarks/train_overhead.py [--steps 400] [--repeats 5] [--width 512]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from eosbranch.spec import parse_spec
from eosbranch.store import RunStore
from eosbranch.train import Trainer, build


def spec(steps: int, width: int) -> dict:
    return {
        "name": "overhead", "seed": 0, "device": "cpu", "dtype": "float32",
        "data": {"kind": "digits", "classes": [3, 5]},
        "model": {"kind": "mlp", "width": width, "depth": 2},
        "loss": "mse", "optimizer": {"kind": "gd", "lr": 0.005}, "steps": steps,
        "measure": {"every": None, "sharpness": False}, "checkpoint": {"every": None},
    }


def framework(s, root) -> float:
    exp = build(s)
    store = RunStore(root)
    tr = Trainer(exp, store)
    tr.start_fresh()
    t0 = time.perf_counter()
    tr.run(s.steps)
    return time.perf_counter() - t0


def bare(s) -> float:
    exp = build(s)  # same data, same initial weights
    model, X, y, lr = exp.model, exp.data.X, exp.data.y, s.optimizer["lr"]
    opt = torch.optim.SGD(model.parameters(), lr=lr)  # the canonical bare loop
    target = torch.nn.functional.one_hot(y, 2).to(X.dtype)
    t0 = time.perf_counter()
    for _ in range(s.steps):
        opt.zero_grad(set_to_none=True)
        loss = (model(X) - target).pow(2).sum(1).mean()
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--width", type=int, default=512)
    args = ap.parse_args()
    s = parse_spec(spec(args.steps, args.width))
    fw, br = [], []
    bare(s)  # warm-up both paths (allocator, threads)
    with tempfile.TemporaryDirectory() as tmp:
        framework(s, f"{tmp}/warm")
        for i in range(args.repeats):
            br.append(bare(s))
            fw.append(framework(s, f"{tmp}/r{i}"))
    n = args.steps
    fw_ms, br_ms = 1e3 * statistics.median(fw) / n, 1e3 * statistics.median(br) / n
    print(f"digits 3v5, N={build(s).data.X.shape[0]}, MLP 64->{args.width}->{args.width}->2, GD, {n} steps, "
          f"{args.repeats} alternating repeats, torch threads={torch.get_num_threads()}")
    print(f"{'loop':<12}{'ms/step (median)':>18}")
    print(f"{'bare torch':<12}{br_ms:>18.3f}")
    print(f"{'eosbranch':<12}{fw_ms:>18.3f}")
    print(f"ratio eosbranch / bare = {fw_ms / br_ms:.3f}  (target <= 1.10)")


if __name__ == "__main__":
    main()
