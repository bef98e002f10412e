"""The whole measurement in full-batch gradients, by component, as eosbranch/measure.py does it.

Setting: benchmarks/probes.py's synthetic CIFAR-shaped two-class data (D = 3072, four groups of 50
appended: inliers, boundary points, input-outliers, label-flipped output-outliers), MLP
D-512-512-2 with ReLU (Kaiming-normal x 0.2, zero biases), MSE, float32, CPU.

States (cached with --cache, so a rerun only times):
  eos       plain full-batch GD at eta = 2 / (1.3 S_0) from initialisation until the measured
            sharpness (every 32 steps) reaches 2 / eta, then 32 steps more: the protocol's state,
            with the warm start a run measuring every 32 steps holds (v1 of 32 and 64 steps before,
            the two previous measurements: the start is extrapolated along their path);
  phase     the EoS phase after it: PHASE more measurements 32 steps apart at eta, each warm-started
            as the trainer does from the two before it (the chain of solves is recomputed here by
            the current code, untimed); the whole measurement is timed at each;
  catapult  from the eos state, 32 steps at 1.5 eta (an "enter EoS"-like step-size increase): the
            loss spikes and the sharpness falls under 2 / (1.5 eta); the warm start is v1 of the eos
            state (the previous measurement);
  peak      the state of those 32 steps with the highest loss (mid-catapult: the iterate is
            thrown along the new top direction and the gradient points along it), same warm start.

Each component is called as measure.measure calls it (the same functions and arguments; a tiny
stand-in for the trainer records the rows), on a fresh operator/context, and timed next to one
plain gradient (forward + backward of the mean loss) in the same repeat: CPU time of this
process, 1 thread, minimum over repeats. Components:
  losses      full-data loss and accuracy: the operator's forward pass (built here, shared by the rest);
  sharpness   top_eigenpairs (tol 1e-3) on that operator as the trainer calls it: warm from the
              previous v1 extrapolated along its path from the one before (extrapolated_start), or
              cold (gradient hint) where the loss grew more than LOSS_JUMP (2) times since the
              previous measurement ("trainer's choice", with that loss ratio); beside it the solve
              alone (operator build included): "path" (the trainer's warm start), "warm" (the
              previous v1 alone), "cold", and "join" (the opt-in hint join, hint_residual =
              WARM_HINT_RESIDUAL), with their products;
  probes      group probes (loss, accuracy, grad_norm, cos2_v1, C_k, Q_k, R_k) on a Context;
  alignment   per-example cos2 on the same Context, and the Spearman rho with centroid distance;
  small       curvature_fraction and weight_projection.
Accuracy columns: v1_angle_bound and the largest cos2_v1_error_bound over groups, against the
true sin(angle) and |cos2 error| from a float64 reference solve (tol 1e-8), at tol 1e-3, 1e-4,
1e-5 in float32 (the setting that gets cos2_v1 to 1 %).

    .venv/bin/python benchmarks/measurement.py [--sizes 2000 10000] [--repeats 2] [--cache DIR]
    .venv/bin/python benchmarks/measurement.py --small        # tiny sizes, for the test

First-layer products (the data times a width x D matrix, ~0.4 gradient at either size). One
operator serves the whole measurement (measure.measure): its R-operator cache (mlp.build: layer
inputs, activation derivatives, the first layer's output, outputs, per-example losses and dl_i/df;
one forward, counted under "losses") gives (1) the loss and accuracy; (2) every Hessian-vector
product, which multiplies the data twice (by the W1 tangent, and X^T delta), and the cold start's
gradient hint (X^T delta once); each product also records its R{z_j} per Linear and R{f}, which
are linear in the vector, so v1's (a combination of the multiplied vectors) are recombined, not
recomputed (MLPBackend.tangents_along); (3) the Taylor curvature pass, which reads the cache's
Linear outputs and v1's recombined R{z_j} (no forward product of its own along v1), and the data's
Gram with the groups' rows, kept across a run's measurements (taylor._data_gram; here across repeats, as across a run's measurements): no
product with the data; (4) the projections <grad l_i, v1> = dl_i/df . R{f_i} from v1's
recombined R{f}: no product at all; (5) the per-example gradient norms from the cached inputs and
adjoints (no data product). The group pass touches the group points only. So the data are
multiplied once by the forward and twice per product of the solve, and by nothing else.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from probes import data, mlp  # noqa: E402  (benchmarks/probes.py: the same setting)

from eosbranch.curvature import (  # noqa: E402
    WARM_HINT_RESIDUAL, extrapolated_start, flatten, hessian_matvec, stale_warm_start, top_eigenpairs,
)
from eosbranch.eigen_error import angle_bound, cos2_error_bound  # noqa: E402
from eosbranch.loss import get_loss  # noqa: E402
from eosbranch.probes import (  # noqa: E402
    Context, curvature_fraction, group_probes, per_example_alignment, spearman, weight_projection,
)

MSE = get_loss("mse")
TOLS = (1e-3, 1e-4, 1e-5)
CATAPULT = 1.5  # step-size factor of the catapult (2 repeats spikes at N = 2,000; 3 diverges)
PHASE = 8  # measurements of the EoS phase after the eos state
EVERY = 32  # steps between measurements
# (key, label) of every field printed per size and state; the test checks each is there and finite.
FIELDS = [
    ("gradient_s", "gradient s"), ("losses", "losses"), ("sharpness", "sharpness"), ("probes", "probes"),
    ("alignment", "alignment"), ("small", "small"), ("total", "total"),
    ("join_mv", "join mv"), ("warm_mv", "warm mv"), ("path_mv", "path mv"), ("cold_mv", "cold mv"),
    ("join_cost", "join"), ("warm_cost", "warm"), ("path_cost", "path"), ("cold_cost", "cold"),
    ("join_vs_cold", "join/cold"), ("warm_vs_cold", "warm/cold"), ("path_vs_cold", "path/cold"),
    ("loss_ratio", "loss ratio"), ("chosen_mv", "chosen mv"),
    ("chosen_vs_cold", "chosen/cold"),
    ("first_residual", "v0 residual"), ("eig_gap", "gap"), ("v1_angle_bound", "angle bound"),
    ("true_sin", "true sin"), ("cos2_bound", "cos2 bound"), ("true_cos2_err", "true cos2 err"),
]


def gradient(model, X, y):
    model.zero_grad(set_to_none=True)
    MSE(model(X), y).backward()


def sharpness(model, X, y, tol=1e-3, v0=None):
    dim = sum(p.numel() for p in model.parameters())
    return top_eigenpairs(hessian_matvec(model, MSE, (X, y)), dim, tol=tol, v0=v0)


def gd(model, X, y, lr, steps):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = MSE(model(X), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def states(n: int, d: int, width: int, cache: Path | None, every: int = EVERY, max_steps: int = 4000,
           wanted=("eos", "catapult", "peak", "phase"), phase: int = PHASE):
    """(X, y, groups, {state: (model, last, before, loss)}, [(model, loss)] of the phase, note): the
    states of the docstring; per state the warm start the trainer holds (the previous measurement's
    v1 and the one before, None where there was none) and the training loss at the previous one."""
    X, y, groups = data(n, d)
    path = cache / f"measurement_{n}_{d}_{width}.pt" if cache else None
    model = mlp(d, width)
    if path is not None and path.exists():
        saved = torch.load(path, weights_only=True)
        if "v_before2" not in saved or len(saved.get("phase", [])) < phase:
            raise SystemExit(f"{path}: made by an older version of this benchmark (no v_before2 or phase); delete it")
    else:
        s0 = sharpness(model, X, y, tol=1e-4)
        lr = 2.0 / (1.3 * s0.values[0].item())
        v, v2, step, onset = s0.vectors, None, 0, None
        while step < max_steps:
            block = gd(model, X, y, lr, every)  # block[0]: the loss at the previous measurement
            step += every
            r = sharpness(model, X, y, v0=v)
            if onset is not None:
                break
            v, v2 = r.vectors, v
            onset = step if r.values[0].item() >= 2.0 / lr else None
        else:
            raise RuntimeError(f"no EoS onset within {max_steps} steps")
        eos = copy.deepcopy(model.state_dict())
        v_eos = r.vectors  # the measurement at the eos state: the catapult's warm start
        s_eos = r.values[0].item()
        # The EoS phase: the same run goes on at eta (its measurements' vectors are recomputed by run()).
        chain, phase_losses = [], []
        for _ in range(phase):
            losses = gd(model, X, y, lr, every)
            chain.append(copy.deepcopy(model.state_dict()))
            phase_losses.append(losses[0])
        model.load_state_dict(eos)
        losses = gd(model, X, y, CATAPULT * lr, every)
        s_cat = sharpness(model, X, y, v0=v_eos).values[0].item()
        saved = {"eos": eos, "v_before": v, "v_before2": v2, "catapult": copy.deepcopy(model.state_dict()),
                 "v_eos": v_eos, "lr": lr, "onset": onset, "step": step, "s_eos": s_eos, "s_cat": s_cat,
                 "loss_start": losses[0], "loss_peak": max(losses), "loss_end": losses[-1],
                 "loss_before": block[0], "phase": chain, "phase_loss_before": phase_losses}
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(saved, path)
    if "peak" not in saved:  # replay the catapult from the eos state, keeping its highest-loss state
        model.load_state_dict(saved["eos"])
        best, peak = -math.inf, None
        for _ in range(every):
            loss = MSE(model(X), y).item()
            if loss > best:
                best, peak = loss, copy.deepcopy(model.state_dict())
            gd(model, X, y, CATAPULT * saved["lr"], 1)
        saved.update(peak=peak, loss_peak_state=best)
        if path is not None:
            torch.save(saved, path)
    out = {}
    # Per state: the model, the warm start (the previous measurement's v1 and the one before) and
    # the training loss at that previous measurement, which the trainer's warm/cold choice compares with.
    for name, key, v0, before, prev in (("eos", "eos", "v_before", "v_before2", "loss_before"),
                                        ("catapult", "catapult", "v_eos", "v_before", "loss_start"),
                                        ("peak", "peak", "v_eos", "v_before", "loss_start")):
        if name not in wanted:
            continue
        m = mlp(d, width)
        m.load_state_dict(saved[key])
        out[name] = (m, saved[v0], saved[before], saved[prev])
    chain = []
    if "phase" in wanted:
        for sd, loss in zip(saved["phase"][:phase], saved["phase_loss_before"]):
            m = mlp(d, width)
            m.load_state_dict(sd)
            chain.append((m, loss))
    note = (f"eta {saved['lr']:.4g} (2/eta {2 / saved['lr']:.1f}); onset at step {saved['onset']}, eos state at "
            f"{saved['step']} (S {saved['s_eos']:.2f}); catapult: 32 steps at {CATAPULT} eta, loss {saved['loss_start']:.3g} "
            f"-> peak {saved['loss_peak']:.3g} -> {saved['loss_end']:.3g}, S {saved['s_cat']:.2f} "
            f"(2/({CATAPULT} eta) = {2 / CATAPULT / saved['lr']:.1f}); phase: {len(chain)} measurements "
            f"{every} steps apart after the eos state")
    return X, y, groups, out, chain, note


def cpu(fn):
    t = time.process_time()
    out = fn()
    return time.process_time() - t, out


def trainer_start(last, before):
    """The trainer's warm start (measure.warm_vectors) at equal intervals: ``last`` moved along its
    path from ``before``."""
    return extrapolated_start(last, before, 1.0)


def measure_once(model, X, y, groups, last, before, prev_loss):
    """One measurement as measure.measure does it; CPU seconds per component and the solve. One
    operator for the whole measurement: its forward pass (the R-operator's cache, counted under
    losses) gives the loss and accuracy, the solve's products and the per-example passes. The
    solve starts warm from ``last`` extrapolated along its path from ``before`` (trainer_start), or
    cold (the gradient hint) as the trainer chooses: cold where the loss grew more than LOSS_JUMP
    times since the previous measurement (``prev_loss``)."""
    t = {}
    H = hessian_matvec(model, MSE, (X, y), record=True)  # as measure.training_hessian
    dim = sum(p.numel() for p in model.parameters())
    t["losses"], (loss, _) = cpu(lambda: _shared_loss_accuracy(H, y))
    start = None if stale_warm_start(loss, prev_loss) else trainer_start(last, before)
    t["sharpness"], res = cpu(lambda: top_eigenpairs(H, dim, tol=1e-3, v0=start))
    v1 = res.vectors[:, 0]

    def probes_part():
        ctx = Context(model, MSE, X, y, groups, v1, operator=H)
        return ctx, group_probes(ctx)

    t["probes"], (ctx, rows) = cpu(probes_part)
    dist = centroid_distance(X, y)
    t["alignment"], _ = cpu(lambda: spearman(per_example_alignment(ctx).cpu(), dist))
    named = list(model.named_parameters())
    theta = flatten([p.detach() for p in model.parameters()])
    t["small"], _ = cpu(lambda: (curvature_fraction(v1, named), weight_projection(list(model.parameters()), theta, v1)))
    return t, res, rows, loss


def _shared_loss_accuracy(H, y):
    """As measure._shared_loss_accuracy: from the operator's forward pass (built here)."""
    fwd = H.shared_forward()
    return fwd.losses.mean().item(), (fwd.f.argmax(1) == y).double().mean().item()


def centroid_distance(X, y):
    Xf = X.flatten(1).double()
    mu = torch.stack([Xf[y == c].mean(0) for c in range(2)])
    return (Xf - mu[y]).norm(dim=1)


def solve_cost(model, X, y, v0, **kw):
    """CPU seconds and products of one sharpness solve (operator build included)."""
    dim = sum(p.numel() for p in model.parameters())
    return cpu(lambda: top_eigenpairs(hessian_matvec(model, MSE, (X, y)), dim, tol=1e-3, v0=v0, **kw))


def accuracy(model, X, y, groups, v0):
    """Per tol: products, angle bound, true sin, largest cos2 bound and true cos2 error (float32
    solve against a float64 reference)."""
    m64 = copy.deepcopy(model).double()
    ref = sharpness(m64, X.double(), y, tol=1e-8, v0=v0.double()).vectors[:, 0]
    out = {}
    for tol in TOLS:
        res = sharpness(model, X, y, tol=tol, v0=v0)
        v = res.vectors[:, 0]
        vd = v.double() / v.double().norm()
        sin = float((vd - (vd @ ref) * ref).norm())
        bound = angle_bound(res.residuals[0].item(), res.gaps[0].item(), res.values[0].item(),
                            torch.finfo(v.dtype).eps)
        ctx = Context(model, MSE, X, y, groups, v)
        c2b, c2e, rb, re = 0.0, 0.0, 0.0, 0.0
        for g in ctx.group_grads.values():
            g = g.double()
            # vd, not v: a float32 vector of 1.8M entries normalised in float32 is unit only to ~3e-5
            # (a rounding floor of cos2_v1 of that relative size, apart from the angle bounded here).
            c2 = float((g @ vd) ** 2 / (g @ g))
            true = float((g @ ref) ** 2 / (g @ g))
            b = cos2_error_bound(c2, bound)
            c2b, c2e = max(c2b, b), max(c2e, abs(c2 - true))
            rb, re = max(rb, b / max(c2, 1e-30)), max(re, abs(c2 - true) / max(true, 1e-30))
        out[tol] = {"mv": res.n_matvecs, "gap": res.gaps[0].item(), "bound": bound, "sin": sin,
                    "cos2_bound": c2b, "cos2_err": c2e, "cos2_rel_bound": rb, "cos2_rel_err": re}
    return out


def timed_measurement(model, X, y, groups, last, before, prev_loss, repeats):
    """The minimum over ``repeats`` of each component's CPU time and of a plain gradient's beside
    it; the last repeat's solve and training loss."""
    gradient(model, X, y)  # warm-up (allocator, kernels, the first jvp)
    measure_once(model, X, y, groups, last, before, prev_loss)
    best: dict = {}
    for _ in range(repeats):
        best["gradient_s"] = min(best.get("gradient_s", math.inf), cpu(lambda: gradient(model, X, y))[0])
        t, res, _, loss_now = measure_once(model, X, y, groups, last, before, prev_loss)
        for key, value in [*t.items(), ("total", sum(t.values()))]:
            best[key] = min(best.get(key, math.inf), value)
        best["gradient_s"] = min(best["gradient_s"], cpu(lambda: gradient(model, X, y))[0])
    return best, res, loss_now


def run(n: int, args) -> tuple[dict, str]:
    X, y, groups, st, chain, note = states(n, args.dim, args.width, args.cache, wanted=args.states,
                                           phase=args.phase)
    results = {}
    for name, (model, last, before, prev_loss) in st.items():
        best, res, loss_now = timed_measurement(model, X, y, groups, last, before, prev_loss, args.repeats)

        def keep(key, value):
            best[key] = min(best.get(key, math.inf), value)

        best["chosen"], best["chosen_mv"] = res.start, res.n_matvecs
        for _ in range(args.repeats):
            keep("gradient_s", cpu(lambda: gradient(model, X, y))[0])
            for key, kw in (("join", {"hint_residual": WARM_HINT_RESIDUAL}), ("warm", {}),
                            ("path", {"v0": trainer_start(last, before)}), ("cold", {"v0": None})):
                sec, r = solve_cost(model, X, y, **{"v0": last, **kw})
                keep(f"{key}_cost", sec)
                best[f"{key}_mv"] = r.n_matvecs
                best[f"{key}_start"] = r.start
        g = best["gradient_s"]
        for key in ("losses", "sharpness", "probes", "alignment", "small", "total", "join_cost", "warm_cost",
                    "path_cost", "cold_cost"):
            best[key] /= g
        for key in ("join", "warm", "path"):
            best[f"{key}_vs_cold"] = best[f"{key}_cost"] / best["cold_cost"]
        # The trainer's choice costs what that solve costs (the same start, the same products).
        best["chosen_vs_cold"] = best["path_vs_cold"] if best["chosen"] == "warm" else 1.0
        best["loss_ratio"] = loss_now / prev_loss
        # The first product's relative residual of the trainer's start (warm) or the previous v1 alone.
        first = trainer_start(last, before) if best["chosen"] == "warm" else last
        one = top_eigenpairs(hessian_matvec(model, MSE, (X, y)), sum(p.numel() for p in model.parameters()),
                             tol=1e-3, v0=first, max_matvecs=1)
        best["first_residual"] = one.residuals[0].item() / abs(one.values[0].item())
        best["acc"] = accuracy(model, X, y, groups, first)
        a = best["acc"][1e-3]
        best.update(eig_gap=a["gap"], v1_angle_bound=a["bound"], true_sin=a["sin"], cos2_bound=a["cos2_bound"],
                    true_cos2_err=a["cos2_err"])
        best["vectors"] = res.vectors
        results[name] = best
    # The EoS phase: each measurement warm-started from the two before it, as the trainer holds them
    # (the eos state's measurement, then each phase measurement's own solve).
    if chain:
        before, last = (st["eos"][1], results["eos"]["vectors"]) if "eos" in results else (None, None)
        rows = []
        for model, prev_loss in chain:
            if last is None:  # without the eos state: start from an untimed cold solve's vectors
                last = sharpness(model, X, y).vectors
            best, res, _ = timed_measurement(model, X, y, groups, last, before, prev_loss, args.repeats)
            g = best["gradient_s"]
            plain = sharpness(model, X, y, v0=last).n_matvecs  # untimed: from the previous v1 alone
            rows.append({"mv": res.n_matvecs, "plain_mv": plain, "start": res.start, "gradient_s": g,
                         "residual": res.residuals[0].item() / abs(res.values[0].item()), "converged": res.converged,
                         **{k: best[k] / g for k in ("losses", "sharpness", "probes", "alignment", "small", "total")}})
            before, last = last, res.vectors
        results["phase"] = rows
    for r in results.values():
        if isinstance(r, dict):
            r.pop("vectors", None)
    return results, note


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[2000, 10000])
    ap.add_argument("--dim", type=int, default=3072)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument("--states", nargs="+", default=["eos", "catapult", "peak", "phase"],
                    choices=["eos", "catapult", "peak", "phase"])
    ap.add_argument("--phase", type=int, default=PHASE, help="measurements of the EoS phase")
    ap.add_argument("--small", action="store_true", help="N = 400, D = 96, width 32, 1 repeat, phase 2 (for the test)")
    args = ap.parse_args(argv)
    if args.small:
        args.sizes, args.dim, args.width, args.repeats, args.phase = [400], 96, 32, 1, 2
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", category=FutureWarning)  # torch.jit deprecation noise from vmap
    t0 = time.perf_counter()
    print(f"MLP {args.dim}-{args.width}-{args.width}-2 (ReLU), MSE, float32, CPU, 1 thread; 4 groups x 50; "
          f"cost in full-batch gradients (CPU time), min over {args.repeats} repeats; tol 1e-3")
    all_results = {}
    for n in args.sizes:
        res, note = run(n, args)
        all_results[n] = res
        print(f"\nN = {n}: {note}")
        for state, r in res.items():
            if state == "phase":
                continue
            print(f"  [{state}] gradient s {r['gradient_s']:.3f} | losses {r['losses']:.2f}  sharpness "
                  f"{r['sharpness']:.2f}  probes {r['probes']:.2f}  alignment {r['alignment']:.2f}  small "
                  f"{r['small']:.2f}  total {r['total']:.2f}")
            print(f"  [{state}] solve: path mv {r['path_mv']}  warm mv {r['warm_mv']}  cold mv {r['cold_mv']}  join mv "
                  f"{r['join_mv']} ({r['join_start']}) | cost path {r['path_cost']:.2f}  warm {r['warm_cost']:.2f}  cold "
                  f"{r['cold_cost']:.2f}  join {r['join_cost']:.2f}  path/cold {r['path_vs_cold']:.2f}  warm/cold "
                  f"{r['warm_vs_cold']:.2f}  join/cold {r['join_vs_cold']:.2f} | v0 residual {r['first_residual']:.3f}")
            print(f"  [{state}] trainer's choice: loss ratio {r['loss_ratio']:.2f} since the previous measurement "
                  f"-> {r['chosen']} start, {r['chosen_mv']} mv, chosen/cold {r['chosen_vs_cold']:.2f}")
            print(f"  [{state}] accuracy at tol 1e-3: gap {r['eig_gap']:.3g}  angle bound {r['v1_angle_bound']:.2e}  "
                  f"true sin {r['true_sin']:.2e} | cos2 bound {r['cos2_bound']:.2e}  true cos2 err "
                  f"{r['true_cos2_err']:.2e}")
            for tol, a in r["acc"].items():
                print(f"  [{state}]   tol {tol:.0e} float32: {a['mv']:>3} mv  angle bound {a['bound']:.2e}  true sin "
                      f"{a['sin']:.2e}  max cos2 bound {a['cos2_bound']:.2e}  true {a['cos2_err']:.2e}  relative: "
                      f"bound {a['cos2_rel_bound']:.2%}  true {a['cos2_rel_err']:.2%}")
        rows = res.get("phase", [])
        for i, r in enumerate(rows, 1):
            print(f"  [phase {i}] {r['mv']} mv ({r['start']}; {r['plain_mv']} from v1 alone; residual {r['residual']:.1e}"
                  f"{'' if r['converged'] else ' NOT CONVERGED'}) | losses {r['losses']:.2f}  "
                  f"sharpness {r['sharpness']:.2f}  probes {r['probes']:.2f}  alignment {r['alignment']:.2f}  "
                  f"small {r['small']:.2f}  total {r['total']:.2f}")
        if rows:
            totals = sorted(r["total"] for r in rows)
            mvs = [r["mv"] for r in rows]
            plain = [r["plain_mv"] for r in rows]
            print(f"  [phase] total: median {statistics.median(totals):.2f}  max {totals[-1]:.2f}  min {totals[0]:.2f} | "
                  f"products: mean {statistics.mean(mvs):.2f}, {mvs.count(3)} of {len(mvs)} solves at 3 "
                  f"(from v1 alone: mean {statistics.mean(plain):.2f}, {plain.count(3)} at 3)")
    print(f"\nwall time {time.perf_counter() - t0:.0f} s")
    return all_results


if __name__ == "__main__":
    main()
