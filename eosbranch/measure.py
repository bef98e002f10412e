"""What the trainer records at a measurement step (the schedule is ``spec.measure``).

Whole-data quantities go in ``metrics`` with ``group = "all"``:

- ``accuracy`` (classification), ``test_loss`` / ``test_accuracy`` where the data has a test
  split, and the full-data ``loss`` for minibatch optimizers (full-batch ones record it every step);
- curvature (``measure.sharpness``): ``sharpness`` = lambda_1 of the Hessian of the mean training
  loss (on a fixed, seeded subset if ``measure.subset``), ``sharpness_2`` ... for ``top_k`` > 1,
  ``threshold`` of the optimizer in force, ``eig_residual`` (max ||Hv - lambda v|| / |lambda| over
  the returned pairs) and ``eig_matvecs``; the error bounds of :mod:`eosbranch.eigen_error`:
  ``eig_gap`` (estimated lambda_1 - lambda_2, from the solver's Ritz values; absent where the
  basis held fewer than three vectors), ``v1_angle_bound`` (bound on sin of the angle between the
  recorded v1 and the true top eigenvector: 2 x residual / gap, 1 where no gap is known) and, per group, ``cos2_v1_error_bound`` (bound on |error| of that
  group's ``cos2_v1`` implied by ``v1_angle_bound``). For preconditioned optimizers (Adam) also
  ``preconditioned_sharpness`` = lambda_1(P^-1 H), the quantity its threshold applies to.
- the ``t_star`` event: the first measurement at or after ``measure.warmup`` whose (preconditioned)
  sharpness reaches the threshold.
- with groups, the probes of :mod:`eosbranch.probes` per group (``loss, accuracy, grad_norm,
  cos2_v1, curvature_influence, sharpness_coupling, rayleigh``), all against the *global* v1;
- ``curvature_fraction`` per parameter tensor (``group`` = the tensor's name),
  ``weight_projection`` <theta_t - theta_ref, v1_ref> from the reference step (``measure.reference``,
  default t*) on, and ``spearman_alignment_distance`` (Spearman rho of per-example
  cos2(grad l_i, v1) with the centroid distance ||x_i - mu_{y_i}||);
- ``examples.parquet`` rows (``measure.examples``: every example, only group members, or none).

Each solve is warm-started from the previous measurement's eigenvectors (kept in the training
state and its checkpoints), moved along their path by the change since the measurement before
(``warm_vectors``: ``eosbranch.curvature.warm_start.extrapolated_start``), so measurements are
cheap and resume bit for bit; where the training loss has grown more than ``LOSS_JUMP`` (2) times
since that measurement (a catapult under way, when those vectors are stale and a warm start can
cost more than a cold one), it starts cold from the gradient instead and records a ``cold_start``
event (``eosbranch.curvature.warm_start``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch

from .curvature import (
    LOSS_JUMP, extrapolated_start, flatten, hessian_matvec, path_ratio, preconditioned_matvec, stale_warm_start,
    top_eigenpairs,
)
from .eigen_error import angle_bound, cos2_error_bound
from .mechanism import TRACK_KEY, sigma_squared, v1_group_curvature
from .probes import (
    KEYS, PROBES, Context, curvature_fraction, group_probes, per_example_alignment, spearman, weight_projection,
)

if TYPE_CHECKING:
    from .experiment import Experiment
    from .loop import Trainer

# The training loss at the previous measurement (in the state's ``measured``, so checkpoints,
# resumes and forks make the same warm/cold choice).
LOSS_KEY = "loss_at_measurement"
# [t_eff of the measurement that found st.prev_eig_vectors (None: none), t_eff of st.eig_vectors']:
# how far the next warm start is extrapolated along the vectors' path (``warm_vectors``).
EIG_T_KEY = "eig_t_eff"


@torch.no_grad()
def _loss_accuracy(exp, X, y, train=False):
    out = exp.model(X)
    loss = (exp.objective(exp.loss_fn(out, y, reduction="none")) if train else exp.loss_fn(out, y)).item()
    acc = (out.argmax(1) == y).double().mean().item() if exp.data.task == "classification" else None
    return loss, acc


def curvature_subset(exp: "Experiment") -> Optional[torch.Tensor]:
    """The fixed subset for curvature: a pure function of the seed, never redrawn."""
    size = exp.spec.measure.subset
    n = exp.train_X.shape[0]
    if size is None or size >= n:
        return None
    g = torch.Generator().manual_seed(exp.spec.seed * 7919 + 17)
    return torch.randperm(n, generator=g)[:size].sort().values.to(exp.device)


def _shared_loss_accuracy(exp, H):
    """The training loss and accuracy from the Hessian operator's cached forward pass over the
    training points (an MLP chain in one chunk, no subset), else by a forward pass of their own."""
    fwd = None if H is None else H.shared_forward()
    if fwd is None:
        return _loss_accuracy(exp, exp.train_X, exp.train_y, train=True)
    loss = exp.objective(fwd.losses).item()
    acc = None
    if exp.data.task == "classification":
        acc = (fwd.f.detach().argmax(1) == exp.train_y).double().mean().item()
    return loss, acc


def measure(tr: "Trainer") -> None:
    exp = tr.exp
    # One operator for the whole measurement: its forward pass (built once) also gives the loss,
    # the accuracy and the probes' per-example passes (benchmarks/measurement.py counts the cost).
    H = training_hessian(exp, record=True) if exp.spec.measure.sharpness else None
    loss, acc = _shared_loss_accuracy(exp, H)
    if exp.optimizer.batch_size is not None:
        tr.record("all", "loss", loss)
    if acc is not None:
        tr.record("all", "accuracy", acc)
    if exp.data.X_test is not None and len(exp.data.X_test):
        test_loss, test_acc = _loss_accuracy(exp, exp.data.X_test, exp.data.y_test)
        tr.record("all", "test_loss", test_loss)
        if test_acc is not None:
            tr.record("all", "test_accuracy", test_acc)
    angle = measure_curvature(tr, H, loss) if exp.spec.measure.sharpness else None
    measure_probes(tr, angle, H)


def training_hessian(exp: "Experiment", record: bool = False):
    """The Hessian of the training loss as a matvec (on the fixed curvature subset, if any; with a
    reweighting branch's weights, if any); ``record``: keep its products' tangents for the
    measurement's probes (``hessian_matvec``)."""
    ms = exp.spec.measure
    return hessian_matvec(exp.model, exp.loss_fn, (exp.train_X, exp.train_y), chunk_size=ms.chunk_size,
                          subset=curvature_subset(exp), weights=exp.train_weight, record=record)


def cold_start(st, loss: float) -> bool:
    """Whether this measurement's solve starts cold although the state holds vectors: the training
    ``loss`` is above LOSS_JUMP times the one at the previous measurement (``stale_warm_start``)."""
    return st.eig_vectors is not None and stale_warm_start(loss, st.measured.get(LOSS_KEY))


def warm_vectors(st, k: int):
    """The warm start of a top-``k`` solve at ``st.t_eff``: the state's first ``k`` vectors (a block
    of k, not of every vector it keeps), extrapolated along their path from the measurement before
    (``extrapolated_start``; as they are where the state holds no earlier ones). None: no vectors."""
    if st.eig_vectors is None:
        return None
    last = st.eig_vectors[:, :k]
    if st.prev_eig_vectors is None:  # kept only with both times (measure_curvature)
        return last
    times = st.measured[EIG_T_KEY]
    return extrapolated_start(last, st.prev_eig_vectors[:, :k], path_ratio(st.t_eff, times[1], times[0]))


def solve_curvature(exp: "Experiment", st, k: int = 1, v0=None, preconditioned: bool = True, H=None,
                    cold: bool = False):
    """``(res, pres)``: the top-``k`` eigenpairs of the training Hessian at the current parameters,
    warm-started from ``v0`` (default: ``warm_vectors``; ``cold``: none, the operator's gradient
    hint instead), and, for a preconditioned optimizer with a state (Adam after its first step),
    the top pair of P^-1 H (else None). ``H``: that Hessian's operator if the caller made it
    (``training_hessian``). The state is not changed."""
    ms = exp.spec.measure
    H = training_hessian(exp) if H is None else H
    dim = sum(p.numel() for p in exp.params)
    if v0 is None and not cold:
        v0 = warm_vectors(st, k)
    res = top_eigenpairs(H, dim, k=k, tol=ms.tol, v0=v0, max_matvecs=ms.max_matvecs)
    pres = None
    if preconditioned and exp.optimizer.preconditioned and st.opt_state:
        diag = flatten(exp.optimizer.preconditioner(st.opt_state))
        pres = top_eigenpairs(preconditioned_matvec(H, diag), dim, k=1, tol=ms.tol,
                              v0=None if cold else st.precond_vectors, max_matvecs=ms.max_matvecs)
    return res, pres


def solve_sharpness(exp: "Experiment", st, v0=None, preconditioned: bool = True) -> dict:
    """``sharpness``, unit ``v1`` and ``compared`` (what the optimizer's threshold applies to:
    lambda_1(P^-1 H) for Adam) at the current parameters, without touching the state."""
    res, pres = solve_curvature(exp, st, 1, v0, preconditioned)
    sharp = res.values[0].item()
    return {"sharpness": sharp, "v1": res.vectors[:, 0].detach(),
            "compared": sharp if pres is None else pres.values[0].item()}


def effective_step_v1(exp: "Experiment", st, v1: torch.Tensor) -> float:
    """A preconditioned optimizer's step size along the unit v1: eta * v1^T P^-1 v1, P the
    diagonal preconditioner in force (Adam: sqrt(v_hat) + eps). A step -eta P^-1 g moves
    along v1 by -eta_eff <g, v1> when g is parallel to v1; GD's is eta itself."""
    diag = flatten(exp.optimizer.preconditioner(st.opt_state)).to(torch.float64)
    v = v1.detach().reshape(-1).to(torch.float64)
    return st.lr * float((v * v / diag).sum() / (v @ v))


def measure_curvature(tr: "Trainer", H=None, loss: float | None = None) -> float:
    """Records the curvature rows; returns ``v1_angle_bound`` for the probes along this v1.
    ``H``: the training Hessian's operator at this step, if made already; ``loss``: the training
    loss at this step, which decides a cold start (``cold_start``)."""
    exp, st, ms = tr.exp, tr.st, tr.exp.spec.measure
    if ms.mechanism:
        # sigma^2 along the previous v1, over the steps tracked since it was found (eosbranch.mechanism).
        sigma2 = sigma_squared(st, ms.oscillation_window)
        st.measured.pop("oscillation_variance", None)
        if sigma2 is not None:
            tr.record("all", "oscillation_variance", sigma2)
            st.measured["oscillation_variance"] = sigma2
        st.measured[TRACK_KEY] = []  # the next window is tracked along the new v1
    cold = loss is not None and cold_start(st, loss)
    if cold:
        prev = st.measured[LOSS_KEY]
        tr.event("cold_start", loss, f"training loss {loss:.6g} > {LOSS_JUMP:g} x {prev:.6g} at the previous "
                                     "measurement: its eigenvectors are stale, the solve starts from the gradient")
    res, pres = solve_curvature(exp, st, k=ms.top_k, H=H, cold=cold)
    if loss is not None:
        st.measured[LOSS_KEY] = loss
    # The vectors before these, for the next warm start's extrapolation: none after a cold start
    # (the last ones were stale) or where the state does not say when its vectors were found.
    times = st.measured.get(EIG_T_KEY)
    keep = not cold and st.eig_vectors is not None and times is not None
    st.prev_eig_vectors = st.eig_vectors if keep else None
    st.measured[EIG_T_KEY] = [times[1] if keep else None, st.t_eff]
    st.eig_vectors = res.vectors.detach()
    values = res.values.tolist()
    for i, value in enumerate(values):
        tr.record("all", "sharpness" if i == 0 else f"sharpness_{i + 1}", value)
    rel = (res.residuals / res.values.abs().clamp_min(1e-30)).max().item()
    tr.record("all", "eig_residual", rel)
    tr.record("all", "eig_matvecs", res.n_matvecs)
    gap = res.gaps[0].item()
    angle = angle_bound(res.residuals[0].item(), gap, res.values[0].item(), torch.finfo(res.vectors.dtype).eps)
    if gap == gap:  # NaN: the basis held no second Ritz value (then the angle bound is 1)
        tr.record("all", "eig_gap", gap)
    tr.record("all", "v1_angle_bound", angle)
    threshold = exp.optimizer.threshold(st.lr)
    tr.record("all", "threshold", threshold)
    compared = values[0]
    if pres is not None:
        compared = pres.values[0].item()
        tr.record("all", "preconditioned_sharpness", compared)
        st.precond_vectors = pres.vectors.detach()
        tr.record("all", "effective_step_v1", effective_step_v1(exp, st, res.vectors[:, 0]))
    st.measured["sharpness"], st.measured["compared"] = values[0], compared
    if "t_star" not in st.measured and st.step >= ms.warmup and compared >= threshold:
        st.measured["t_star"] = st.step
        tr.event("t_star", compared, f"sharpness {compared:.6g} >= threshold {threshold:.6g}")
    fork = st.measured.get("fork_step")
    if fork is not None and "t_star_star" not in st.measured and st.step > fork and compared >= threshold:
        # t** (DESIGN §2): the branch's own sharpness reaches its own threshold after the fork.
        # This is the first measurement at or past it; compare interpolates the crossing.
        st.measured["t_star_star"] = st.step
        tr.event("t_star_star", compared, f"sharpness {compared:.6g} >= threshold {threshold:.6g} "
                                          f"(first measurement after the fork at {fork})")
    return angle


def centroid_distance(exp: "Experiment") -> Optional[torch.Tensor]:
    """d_i = ||x_i - mu_{y_i}|| in the flattened input space (from the groups' geometry if any)."""
    d = exp.group_info.get("centroid_distance")
    if d is not None:
        return d.to(torch.float64)
    if exp.data.task != "classification":
        return None
    X, y = exp.data.X.flatten(1).double().cpu(), exp.data.y.cpu()
    mu = torch.stack([X[y == c].mean(0) if (y == c).any() else torch.zeros(X.shape[1], dtype=X.dtype)
                      for c in range(exp.data.num_outputs)])
    return (X - mu[y]).norm(dim=1)


def measure_probes(tr: "Trainer", angle: Optional[float] = None, H=None) -> None:
    """The probe rows along the state's v1; ``angle`` (its ``v1_angle_bound``, None where v1 was
    not solved at this step) adds ``cos2_v1_error_bound`` next to each group's ``cos2_v1``.
    ``H``: the training Hessian's operator at this step, whose cached forward pass the per-example
    passes read where it covers the same points."""
    exp, st, ms = tr.exp, tr.st, tr.exp.spec.measure
    v1 = None if st.eig_vectors is None else st.eig_vectors[:, 0]
    named = [(n, p) for n, p in exp.model.named_parameters() if p.requires_grad]
    if v1 is not None and ms.curvature_fraction:
        for name, frac in curvature_fraction(v1, named):
            tr.record(name, "curvature_fraction", frac)
    if v1 is not None:
        _weight_projection(tr, v1)
    want_examples = ms.examples == "all" or (ms.examples == "groups" and exp.groups)
    if not ((ms.probes and exp.groups) or (ms.alignment and v1 is not None) or want_examples or ms.extra_probes):
        return
    # The Hessian behind v1 is the training loss's; held-out groups (mode: heldout) are measured on
    # the same footing as the rest, so the context sees every point of data.X.
    ctx = Context(exp.model, exp.loss_fn, exp.data.X, exp.data.y, exp.groups, v1, chunk_size=ms.chunk_size,
                  hessian_subset=_hessian_rows(exp), weights=exp.sample_weight, operator=H)
    if ms.probes and exp.groups:
        # Full-batch runs have every group's loss and accuracy at every step (eosbranch.step_losses).
        every_step = exp.optimizer.batch_size is None
        for group, metric, value in group_probes(ctx):
            if not (every_step and metric in ("loss", "accuracy")):
                tr.record(group, metric, value)
            if metric == "cos2_v1" and angle is not None:
                tr.record(group, "cos2_v1_error_bound", cos2_error_bound(value, angle))
    if ms.mechanism and exp.groups and v1 is not None:
        _mechanism_rows(tr, ctx)
    for section in ms.extra_probes:  # registered probes named in the spec (validated there)
        params = dict(section)
        entry = PROBES.entry(params.pop("kind"), where="measure.extra_probes")
        # Validated again only to turn spec.yaml's JSON values back into the model's types (tuples).
        for group, metric, value in entry.fn(ctx, **entry.params.model_validate(params).model_dump()):
            tr.record(str(group), str(metric), float(value))
    align = per_example_alignment(ctx).cpu() if (ms.alignment and v1 is not None) else None
    dist = centroid_distance(exp)
    if align is not None and dist is not None:
        tr.record("all", "spearman_alignment_distance", spearman(align, dist))
    if want_examples:
        _example_rows(tr, ctx, align, dist)


def _mechanism_rows(tr: "Trainer", ctx) -> None:
    """v1_group_curvature per group and, with sigma^2 of this step, the oscillation cost and drift
    rate (eosbranch.mechanism)."""
    curv = v1_group_curvature(ctx)
    sigma2 = tr.st.measured.get("oscillation_variance")
    coupling = ctx.cache.get(KEYS["sharpness_coupling"])  # Q_k, if the group probes computed it
    for name, value in curv.items():
        tr.record(name, "v1_group_curvature", value)
        if sigma2 is not None:
            tr.record(name, "oscillation_cost", 0.5 * sigma2 * value)
            if coupling is not None:
                tr.record(name, "drift_rate", 0.5 * sigma2 * coupling[name])


def _hessian_rows(exp: "Experiment") -> Optional[torch.Tensor]:
    """Rows of data.X the Hessian (and so v1) was computed on; None = all of them."""
    sub = curvature_subset(exp)
    if exp.train_index is None:
        return sub
    return exp.train_index if sub is None else exp.train_index[sub]


def _weight_projection(tr: "Trainer", v1: torch.Tensor) -> None:
    st, ms = tr.st, tr.exp.spec.measure
    if st.reference is None:
        ref_step = ms.reference if ms.reference is not None else st.measured.get("t_star")
        if ref_step is None or st.step != ref_step:
            return
        st.reference = {"step": st.step, "theta": flatten([p.detach() for p in tr.exp.params]).clone(),
                        "v1": v1.detach().clone()}
    ref = st.reference
    tr.record("all", "weight_projection", weight_projection(tr.exp.params, ref["theta"], ref["v1"]))


def _example_rows(tr: "Trainer", ctx, align, dist) -> None:
    exp, st = tr.exp, tr.st
    n = exp.data.X.shape[0]
    member = ["none"] * n
    for name, idx in exp.groups.items():  # an example in several groups is listed under the first
        for i in idx.tolist():
            if member[i] == "none":
                member[i] = name
    rows = range(n) if exp.spec.measure.examples == "all" else sorted(
        {i for idx in exp.groups.values() for i in idx.tolist()})
    loss = ctx.per_example_loss.double().cpu()
    nan = torch.full((n,), float("nan"), dtype=torch.float64)
    # loss_change = l_i(t) - l_i(t-1) from the previous full-batch step's losses, which cover the
    # training points only: NaN for held-out points and under minibatch training (no such step).
    change = nan.clone()
    prev = st.prev_example_losses
    trained = torch.arange(n) if exp.train_index is None else exp.train_index.cpu()
    if prev is not None and prev.shape[0] == trained.numel():
        change[trained] = loss[trained] - prev.double().cpu().reshape(-1)
    columns = [c.tolist() for c in (loss, change, nan if align is None else align.double(),
                                    nan if dist is None else dist.double())]
    # One conversion per column, not per element: N can be tens of thousands.
    tr.examples.extend((st.step, i, member[i], *(col[i] for col in columns)) for i in rows)
