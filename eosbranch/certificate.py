"""Integrity certificates: evidence that branches differ in exactly the controlled way.

1. ``certificate_null``: a branch without interventions equals its parent over every overlapping
   step (every metric and example row, and the parameters at common checkpoints); the value is
   the largest absolute difference and must be 0.0.
2. ``certificate_fork_state``: at the fork, before any change applies, all branches forked at the
   same step share the exact parameters (sha256) and the per-group gradient norms and cos2_v1
   (``fork_state`` events, recorded by every branch); the value is the largest spread.
3. ``certificate_perturbation_*``: for a data perturbation, the perturbed group's cos2_v1 before
   and after, the percentile of the after-value in the distribution of cos2 between v1 and a
   uniformly random unit vector of the same dimension (Beta(1/2, (d-1)/2), exactly), and the
   group's median centroid distance before and after.
4. ``certificate_surgery``: for gradient surgery, the largest cos2 of the edited gradient with v1
   over all steps (must be <= 1e-6).

Certificates are ``events`` rows of the branch runs (``value``, ``detail``); :func:`certify`
writes them after a fork and :func:`certificates` reads them back as one table.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import TYPE_CHECKING, Callable, Iterable

import numpy as np
import pandas as pd
import torch

from . import tables
from .experiment import Experiment
from .lineage import branches_of
from .measure import centroid_distance, solve_sharpness
from .probes import Context, group_probes
from .state import TrainState
from .step import forward_backward

if TYPE_CHECKING:
    from .run import Run

COLUMNS = ["branch", "check", "value", "verdict", "detail"]
SURGERY_LIMIT = 1e-6


def _params_sha256(params: Iterable[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for p in params:
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def fork_snapshot(exp: Experiment, st: TrainState, curvature: Callable[[], dict]) -> dict:
    """The replayed state at the fork, before any intervention: the training loss (as the
    parent recorded it, for the replay check), the parameters' sha256, and per group (and "all")
    the gradient norm and cos2 with v1 at this step (``curvature()``: the fork's, see
    :class:`eosbranch.branch.ForkPoint`)."""
    probe = dataclasses.replace(st, cursor=dict(st.cursor))  # the step's batch, without advancing
    loss, _, grads, _, _ = forward_backward(exp, probe)
    g = torch.cat([x.reshape(-1) for x in grads])
    v1 = curvature()["v1"] if exp.spec.measure.sharpness else None
    rows = [("loss/all", loss.item()), ("grad_norm/all", g.norm().item())]
    if v1 is not None:
        rows.append(("cos2_v1/all", ((g @ v1) ** 2 / (g @ g).clamp_min(1e-300)).item()))
    if exp.groups:
        ctx = Context(exp.model, exp.loss_fn, exp.data.X, exp.data.y, exp.groups, v1,
                      chunk_size=exp.spec.measure.chunk_size)
        wanted = ("grad_norm", "cos2_v1") if v1 is not None else ("grad_norm",)
        rows += [(f"{metric}/{group}", value) for group, metric, value in group_probes(ctx, ("loss", *wanted))
                 if metric in wanted]
    return {"loss": loss.item(), "rows": rows, "params_sha256": _params_sha256(exp.params)}


def random_cos2_percentile(value: float, dim: int) -> float:
    """Percentile of ``value`` among cos2(v, z) for z uniform on the unit sphere of R^dim:
    cos2 ~ Beta(1/2, (dim - 1)/2)."""
    from scipy.stats import beta

    return float(100.0 * beta.cdf(value, 0.5, (dim - 1) / 2.0))


def perturbation_certificate(before: Experiment, after: Experiment, st: TrainState, group: str,
                             v_before: torch.Tensor) -> list[tuple]:
    """Certificate (3) of a data perturbation of ``group`` (``before`` -> ``after``; ``v_before``:
    v1 at the fork before the change) as event rows ``(event, value, detail)``."""

    def measure_group(exp, v1):
        ctx = Context(exp.model, exp.loss_fn, exp.data.X, exp.data.y, {group: exp.groups[group]}, v1,
                      chunk_size=exp.spec.measure.chunk_size)
        cos2 = dict(((m, v) for _, m, v in group_probes(ctx, ("loss", "cos2_v1"))))["cos2_v1"]
        d = centroid_distance(exp)
        # np.median: the mean of the two middle values for an even count (torch's median takes the lower)
        dist = float("nan") if d is None else float(np.median(d[exp.groups[group].cpu()].numpy()))
        return cos2, dist

    cos_before, dist_before = measure_group(before, v_before)
    v_after = solve_sharpness(after, st, v0=v_before[:, None], preconditioned=False)["v1"]  # of the perturbed loss
    cos_after, dist_after = measure_group(after, v_after)
    dim = v_after.numel()
    pct_before, pct_after = random_cos2_percentile(cos_before, dim), random_cos2_percentile(cos_after, dim)
    return [
        ("certificate_perturbation_cos2_before", cos_before,
         f"{group}: cos2(g_k, v1) before the change; percentile {pct_before:.1f} among random unit vectors (d={dim})"),
        ("certificate_perturbation_cos2_after", cos_after,
         f"{group}: cos2(g_k, v1) after the change (v1 of the changed loss); "
         f"percentile {pct_after:.1f} among random unit vectors (d={dim})"),
        ("certificate_perturbation_percentile", pct_after,
         f"{group}: percentile of cos2 after among cos2(v1, z), z uniform on the sphere (d={dim})"),
        ("certificate_perturbation_distance_before", dist_before, f"{group}: median centroid distance before"),
        ("certificate_perturbation_distance_after", dist_after, f"{group}: median centroid distance after"),
    ]


def null_difference(parent: "Run", branch: "Run") -> tuple[float, str]:
    """Largest |branch - parent| over the overlapping metric and example rows and the parameters
    at common checkpoint steps (NaN equals NaN)."""
    worst, counts = 0.0, []
    for name, keys in (("metrics", ["step", "group", "metric"]), ("examples", ["step", "index"])):
        b, p = branch.store.read_table(name), parent.store.read_table(name)
        if b.empty:
            continue
        cols = [c for c in tables.COLUMNS[name] if c not in ("run", "branch", "seed", *keys)
                and pd.api.types.is_numeric_dtype(b[c])]
        m = b.merge(p, on=keys, suffixes=("", "_p"))
        for c in cols:
            x, y = m[c].to_numpy(float), m[f"{c}_p"].to_numpy(float)
            both_nan = np.isnan(x) & np.isnan(y)
            d = np.where(both_nan, 0.0, np.abs(x - y))
            if d.size:
                worst = max(worst, float(np.nan_to_num(d, nan=np.inf).max()))
        counts.append(f"{len(m)} {name} rows")
    common = sorted(set(parent.checkpoints) & set(branch.checkpoints))
    for s in common:
        a, b = parent.checkpoint(s)["model"], branch.checkpoint(s)["model"]
        for k in a:
            worst = max(worst, float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0)
    counts.append(f"parameters at steps {common}")
    return worst, "max |branch - parent| over " + ", ".join(counts)


def _write_events(run: "Run", rows: list[tuple]) -> None:
    """Replace the named certificate events of a finished run with ``rows`` (event, value, detail)."""
    ev = run.store.read_table("events")
    names = {r[0] for r in rows}
    keep = ev[~ev.event.isin(names)]
    step, t_eff = int(run.spec.steps), float("nan")
    loss = run.metrics.query("metric in ('loss', 'batch_loss') and group == 'all'")
    if len(loss):
        t_eff = float(loss.t_eff.max())
    new = tables.frame("events", [(n, step, t_eff, float(v), d) for n, v, d in rows], run.name,
                       run.lineage.get("branch") or "trunk", run.spec.seed)
    table = pd.concat([keep, new], ignore_index=True) if len(keep) else new
    run.store.write_table("events", table)
    run.store.rewrite_tail("events", table)  # a table rebuilt from the segments keeps these rows


def certify(parent: "Run", branches: list["Run"]) -> pd.DataFrame:
    """Compute certificates 1, 2 and 4 for ``branches`` and their siblings at the same fork step,
    store them as events, and return every certificate of those branches as a table."""
    fork_steps = {b.lineage["fork_step"] for b in branches}
    siblings = [b for b in branches_of(parent) if b.lineage.get("fork_step") in fork_steps]
    for s in fork_steps:
        group = [b for b in siblings if b.lineage["fork_step"] == s]
        states = {b.name: b.events for b in group}
        values = pd.concat([ev[ev.event == "fork_state"].assign(run=name) for name, ev in states.items()])
        spread = values.groupby("detail").value.agg(lambda v: float(v.max() - v.min())) if len(values) else pd.Series()
        shas = {ev[ev.event == "fork_params"].detail.iloc[0] for ev in states.values() if (ev.event == "fork_params").any()}
        same = len(shas) == 1
        value = (float(spread.max()) if len(spread) else 0.0) if same else float("inf")
        detail = (f"{len(group)} branches at step {s}: parameters {'identical (sha256)' if same else 'DIFFER'}; "
                  f"max spread of {', '.join(sorted({d.split('/')[0] for d in spread.index}))} over "
                  f"{spread.index.nunique()} (metric, group) pairs")
        for b in group:
            _write_events(b, [("certificate_fork_state", value, detail)])
    for b in branches:
        rows = []
        if not b.lineage.get("branch_spec", {}).get("interventions"):
            rows.append(("certificate_null", *null_difference(parent, b)))
        surgery = b.metrics.query("metric == 'surgery_cos2'")
        if len(surgery):
            rows.append(("certificate_surgery", float(surgery.value.max()),
                         f"max cos2(edited gradient, v1) over {len(surgery)} steps (limit {SURGERY_LIMIT:g})"))
        if rows:
            _write_events(b, rows)
    return certificates(parent, fork_steps)


def _verdict(check: str, value: float) -> str:
    if check in ("certificate_null", "certificate_fork_state"):
        return "pass" if value == 0.0 else "FAIL"
    if check == "certificate_surgery":
        return "pass" if value <= SURGERY_LIMIT else "FAIL"
    return "info"


def certificates(parent: "Run", fork_steps=None) -> pd.DataFrame:
    """Every certificate stored in the branches of ``parent`` (optionally of some fork steps)."""
    rows = []
    for b in branches_of(parent):
        if fork_steps is not None and b.lineage.get("fork_step") not in fork_steps:
            continue
        ev = b.events
        for r in ev[ev.event.str.startswith("certificate")].itertuples():
            rows.append((b.lineage["branch"], r.event.removeprefix("certificate_"), r.value,
                         _verdict(r.event, r.value), r.detail))
    return pd.DataFrame(rows, columns=COLUMNS)
