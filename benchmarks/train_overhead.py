"""Framework overhead: eosbranch's per-step time over a bare PyTorch loop doing the same GD steps,
and the cost of the every-step group losses (eosbranch.step_losses) on examples/quick.yaml.

1. Both run side by side in one process, alternating, on the same data and initial weights, with
   no measurements scheduled (eosbranch still records the loss every step and writes its
   checkpoints at step 0 and at the end). Target: ratio <= 1.10.
2. examples/quick.yaml (digits 3 vs 5 with the four prototype groups) without measurements, with
   and without its groups, alternating: the difference is the per-step group loss and accuracy
   rows and nothing else (the groups are used by nothing else when no measurement is due).
   Target: <= 3 % of a plain GD step.

    .venv/bin/python benchmarks/train_overhead.py [--steps 400] [--repeats 5] [--width 512]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import replace

import torch

from eosbranch.spec import parse_spec
from eosbranch.store import RunStore
from eosbranch.experiment import build
from eosbranch.loop import Trainer


def spec(steps: int, width: int) -> dict:
    return {
        "name": "overhead", "seed": 0, "device": "cpu", "dtype": "float32",
        "data": {"kind": "digits", "classes": [3, 5]},
        "model": {"kind": "mlp", "width": width, "depth": 2},
        "loss": "mse", "optimizer": {"kind": "gd", "lr": 0.005}, "steps": steps,
        "measure": {"every": None, "sharpness": False}, "checkpoint": {"every": None},
    }


def framework(s, root, groups: bool = True) -> float:
    exp = build(s)
    if not groups:
        exp = replace(exp, groups={})  # the experiment is frozen: a change is a new one
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
    group_losses(args.steps, args.repeats)


def group_losses(steps: int, repeats: int) -> None:
    """Two readings, side by side in one process: (a) whole runs with and without the groups,
    alternating (min of the repeats; this VM's step time scatters by several per cent from run to
    run), which includes writing the extra rows to the tables; (b) inside those same runs, the time spent in the trainer's
    per-step loss recording (``Trainer.record_step_loss``), whose difference between the arms is
    the group rows' own cost, set against the plain arm's whole step."""
    from eosbranch.catalog import example_path
    from eosbranch.spec import load_spec

    q = load_spec(example_path("quick"), steps=steps)
    q = parse_spec({**q.model_dump(mode="json"), "device": "cpu",
                    "measure": {"every": None, "sharpness": False}, "checkpoint": {"every": None}})
    spent = [0.0]
    record = Trainer.record_step_loss

    def timed(self, *a, **k):
        t0 = time.perf_counter()
        record(self, *a, **k)
        spent[0] += time.perf_counter() - t0

    Trainer.record_step_loss = timed
    on, off, rec_on, rec_off = [], [], [], []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            framework(q, f"{tmp}/warm")
            for i in range(repeats):
                spent[0] = 0.0
                off.append(framework(q, f"{tmp}/off{i}", groups=False))
                rec_off.append(spent[0])
                spent[0] = 0.0
                on.append(framework(q, f"{tmp}/on{i}", groups=True))
                rec_on.append(spent[0])
    finally:
        Trainer.record_step_loss = record
    per_step = lambda xs: 1e3 * min(xs) / steps  # noqa: E731  ms per step
    on_ms, off_ms = per_step(on), per_step(off)
    spread = 100 * (statistics.median(off) - min(off)) / min(off)
    rows_us = 1e3 * (statistics.median(rec_on) - statistics.median(rec_off)) / steps
    k = len(build(q).groups)
    print(f"\nexamples/quick.yaml, N={build(q).train_X.shape[0]}, {k} groups, {steps} steps, {repeats} alternating "
          f"repeats")
    print(f"{'GD step':<40}{'ms/step':>10}")
    print(f"{'plain (no groups), min':<40}{off_ms:>10.4f}   (median {spread:.1f} % above the min)")
    print(f"{'with every-step group loss, acc., min':<40}{on_ms:>10.4f}")
    print(f"(a) whole runs: {100 * (on_ms - off_ms) / off_ms:+.2f} % (the group rows plus writing them: the tables "
          "are written whole at each checkpoint)")
    print(f"(b) group rows inside the loop: {rows_us * 1e3:.1f} us per step = "
          f"{100 * rows_us / off_ms:.2f} % of a plain GD step  (target <= 3 %)")


if __name__ == "__main__":
    main()
