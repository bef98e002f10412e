"""Figures of a study (``eosbranch report``): one function per figure, each taking loaded tables and
an output path and returning the path of the PNG it wrote.

The conventions every figure shares (colours per group, line styles per branch, time markers,
tags that tests read back, :class:`NothingToPlot`) are in figure_style.py; figure 3, the branch
effect, is in branch_effect_figure.py (importable from here, as are the conventions' public
names). The study they draw (:class:`StudyRun`) is in study.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from . import figure_style
from .branch_effect_figure import plot_branch_effect  # noqa: F401  (figure 3; the report calls it from here)
from .figure_style import (
    BLACK, GREY, T_EFF, T_STAR_STYLE, NothingToPlot, autoscale_visible, branch_role, branch_style, describe_branch,
    grid, label_ends, new_figure, shade_window, style_legend, tag, time_lines, window_patch, xlim_window,
)
from .figure_style import CYCLE, KNOWN_GROUPS, LIGHT_GREY, group_colors, tags  # noqa: F401  (importable from here)
from .study import StudyRun  # noqa: F401  (the figures' input; also importable from here)


SHARPNESS_LABELS = {"sharpness": "sharpness λ1(∇²L)", "preconditioned_sharpness": "preconditioned sharpness λ1(P⁻¹H)"}


def sharpness_metric(run: StudyRun, label: str) -> str:
    """The sharpness a branch's threshold applies to: Adam's preconditioned one where recorded."""
    m = run.lines[label]
    return "preconditioned_sharpness" if (m.metric == "preconditioned_sharpness").any() else "sharpness"


def zoom_range(run: StudyRun) -> tuple[float, float, str]:
    """The x range of figure 1's zoomed panel and its title: the comparison window with a little
    context, never before the run's first t_eff; when the window fills most of the run, its first
    quarter (where the branches part)."""
    lo, hi = run.window()
    first = min(float(m.t_eff.min()) for m in run.lines.values())
    last = max(float(m.t_eff.max()) for m in run.lines.values())
    span = max(hi - lo, 1e-12)
    if span > 0.5 * max(last - first, 1e-12):
        return max(first, lo - 0.02 * span), lo + 0.25 * span, "the first quarter of the window, zoomed in"
    return max(first, lo - 0.25 * span), hi + 0.05 * span, "the comparison window, zoomed in"


def plot_sharpness(run: StudyRun, path) -> Path:
    """Figure 1: sharpness per branch against t_eff; thresholds as horizontal lines, t* and t** as
    vertical lines, the comparison window shaded. Left the whole run, right the window zoomed in
    (where the branches part). Each branch is drawn on the sharpness its threshold applies to:
    Adam's preconditioned sharpness (scale ~1/((1−β1)η) times larger) gets a row of its own, so
    GD, SGD and momentum branches stay readable beside it."""
    present = [b for b in dict.fromkeys((run.parent, run.reference, *run.others))
               if len(run.curve(b, sharpness_metric(run, b)))]
    if not present:
        raise NothingToPlot("no sharpness was measured (measure.sharpness is off)")
    metrics = [k for k in SHARPNESS_LABELS if any(sharpness_metric(run, b) == k for b in present)]
    zoom = len(run.comparison) > 0
    fig = new_figure(14 if zoom else 10, 5.0 if len(metrics) == 1 else 8.4)
    grid = fig.subplots(len(metrics), 2 if zoom else 1, squeeze=False, width_ratios=[3, 2] if zoom else None)
    off_scale = []  # thresholds too high to draw
    for row, metric in zip(grid, metrics):
        labels = [b for b in present if sharpness_metric(run, b) == metric]
        top = max(float(np.nanmax(run.curve(b, metric).values)) for b in labels)
        shown = []  # thresholds drawn
        for k, ax in enumerate(row):
            for b in labels:
                s = run.curve(b, metric)
                line, = ax.plot(s.index, s.values, label=f"{metric.replace('_', ' ')}: {describe_branch(run, b)}",
                                marker="o" if len(s) < 40 else None, markersize=2.5,
                                **{"color": BLACK, **branch_style(run, b)})
                tag(line, branch=b, role=branch_role(run, b), metric=metric)
            for b in labels:
                thr = run.curve(b, "threshold")
                if thr.empty or (b == run.parent and run.reference != run.parent):
                    continue
                text = f"threshold of {b} = {float(thr.iloc[-1]):.4g}"
                if float(thr.min()) > 1.6 * top:  # e.g. an exit branch's 2/η, far above every sharpness
                    if k == 0:
                        off_scale.append(text + " (above the axis)")
                    continue
                shown.append(float(thr.max()))
                line, = ax.plot(thr.index, thr.values, color=GREY, linewidth=1.3, label=text,
                                linestyle="-" if b == run.reference else branch_style(run, b)["linestyle"])
                tag(line, branch=b, role=branch_role(run, b), metric="threshold")
            time_lines(run, ax)
            shade_window(run, ax, label=True)
            ax.set_xlabel(T_EFF)
            ax.grid(alpha=0.3)
        row[0].set_ylim(0, 1.08 * max([top, *shown]))
        row[0].set_ylabel(SHARPNESS_LABELS[metric])
        if run.others:
            label_ends(row[0], [(b, run.curve(b, metric)) for b in labels if b != run.parent])
        if zoom:
            x0, x1, title = zoom_range(run)
            row[1].set_xlim(x0, x1)
            autoscale_visible(row[1])
            row[1].set_title(title, fontsize=10)
    grid[0][0].set_title("whole run", fontsize=10)
    handles = {}
    for ax in grid.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    handles = list(handles.values()) + [Line2D([], [], color="none", label=t) for t in dict.fromkeys(off_scale)]
    fig.legend(handles=handles, loc="outside right center", fontsize=8, frameon=False)
    fig.suptitle(f"{run.name}: sharpness per branch (seed {run.seed})")
    return figure_style.save(fig, path)


def plot_group_losses(run: StudyRun, path, colors: dict[str, str]) -> Path:
    """Figure 2: each group's loss per branch (log scale) against t_eff, zoomed on the window."""
    groups = run.groups("loss")
    if not groups:
        raise NothingToPlot("no loss was recorded per group")
    ncols = min(3, len(groups))
    nrows = -(-len(groups) // ncols)
    fig = new_figure(3.6 * ncols + 2.6, 2.8 * nrows + 0.6)
    axes = grid(fig, len(groups), ncols, sharex=True)
    for ax, g in zip(axes.flat, groups):
        for b in run.lines:
            s = run.curve(b, "loss", g)
            if s.empty:
                continue
            st = {"color": colors[g], **branch_style(run, b)}
            line, = ax.plot(s.index, s.values, marker="o" if len(s) < 40 else None, markersize=2.5, **st)
            tag(line, group=g, branch=b, role=branch_role(run, b))  # the parent before the fork: grey
        shade_window(run, ax)
        time_lines(run, ax, label=False)
        xlim_window(run, ax)
        autoscale_visible(ax, log=True)
        ax.set_title(g, color=colors[g], fontweight="bold")
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("group loss ℓ_k (log)")
    for ax in axes.flat[len(groups) - ncols:len(groups)]:
        ax.set_xlabel(T_EFF)
        ax.xaxis.set_tick_params(labelbottom=True)
    handles = style_legend(run) + [Line2D([], [], color=BLACK, linestyle=T_STAR_STYLE, label="t*")] + window_patch(run)
    fig.legend(handles=handles, loc="outside right center", fontsize=8, frameon=False)
    fig.suptitle(f"{run.name}: group losses per branch (seed {run.seed})")
    return figure_style.save(fig, path)


ALIGNMENT_ROWS = [
    ("cos2_v1", "cos²θ_k = ⟨g_k, v1⟩² / ‖g_k‖²", False),
    ("curvature_influence", "C_k = ⟨g_k, v1⟩² (log)", True),
    ("grad_norm", "‖g_k‖ (log)", True),
]


def plot_alignment(run: StudyRun, path, colors: dict[str, str]) -> Path:
    """Figure 4: cos²θ_k, C_k and ‖g_k‖ per group (columns) and branch (line style), on the window."""
    groups = [g for g in run.groups("cos2_v1")]
    if not groups:
        raise NothingToPlot("no per-group probes were recorded (measure.probes off, or no groups)")
    fig = new_figure(2.9 * len(groups) + 2.6, 7.2)
    axes = fig.subplots(len(ALIGNMENT_ROWS), len(groups), squeeze=False, sharex=True, sharey="row")
    for j, g in enumerate(groups):
        for i, (metric, ylabel, log) in enumerate(ALIGNMENT_ROWS):
            ax = axes[i, j]
            for b in run.lines:
                s = run.curve(b, metric, g)
                if s.empty:
                    continue
                st = {"color": colors[g], **branch_style(run, b)}
                line, = ax.plot(s.index, s.values, marker="o" if len(s) < 40 else None, markersize=2.5, **st)
                tag(line, group=g, branch=b, role=branch_role(run, b))
            shade_window(run, ax)
            xlim_window(run, ax)
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(g, color=colors[g], fontweight="bold")
            if j == 0:
                ax.set_ylabel(ylabel, fontsize=9)
            if i == len(ALIGNMENT_ROWS) - 1:
                ax.set_xlabel(T_EFF, fontsize=9)
    for i, (metric, _, log) in enumerate(ALIGNMENT_ROWS):  # shared y per row: everything visible in the row
        autoscale_visible(axes[i], log=log, floor=0.0 if metric == "cos2_v1" else None)
    fig.legend(handles=style_legend(run) + window_patch(run),
               loc="outside right center", fontsize=8, frameon=False)
    fig.suptitle(f"{run.name}: alignment with the top eigenvector v1, curvature influence and gradient norm "
                 f"(seed {run.seed})")
    return figure_style.save(fig, path)


OPPOSING_SERIES = ("rise", "fall", "full", "random")


def plot_opposing(traces: list[dict], path, colors: dict[str, str]) -> Path:
    """Figure 5: an opposing pair's group losses against the full loss and a random subset of the
    same size, step by step over the detection window; left the losses, right their change since
    the window's first step (antiphase: the two groups move in opposite directions).

    Each trace: ``title``, ``names`` (rise and fall group names), ``frame`` (columns step, series
    in rise/fall/full/random, loss), ``note`` (one line of statistics)."""
    if not traces:
        raise NothingToPlot("no opposing pair was found for these runs")
    fig = new_figure(11, 3.6 * len(traces) + 0.9)
    rows = fig.subfigures(len(traces), 1, squeeze=False)[:, 0]
    handles = {}
    for sub, tr in zip(rows, traces):
        ax_abs, ax_rel = sub.subplots(1, 2)
        rise, fall = tr["names"]
        style = {
            "rise": (colors[rise], "-", f"{rise} (loss rose at the first step)"),
            "fall": (colors[fall], "-", f"{fall} (loss fell at the first step)"),
            "full": (BLACK, "-", "full training loss"),
            "random": (GREY, "--", f"random subset of the same size ({tr['size']} points)"),
        }
        f = tr["frame"]
        first = int(f.step.min())
        for key in OPPOSING_SERIES:
            s = f[f.series == key].sort_values("step")
            color, ls, label = style[key]
            for ax, y in ((ax_abs, s.loss.to_numpy()), (ax_rel, s.loss.to_numpy() - s.loss.iloc[0])):
                line, = ax.plot(s.step, y, color=color, linestyle=ls, linewidth=1.6, marker="o", markersize=2.5,
                                label=label)
                if key in ("rise", "fall"):
                    tag(line, group=rise if key == "rise" else fall)
            handles.setdefault(label, line)
        autoscale_visible(ax_abs, log=True)
        ax_abs.set_ylabel("mean loss (log)")
        ax_abs.set_title("group losses", fontsize=10)
        ax_rel.axhline(0, color=BLACK, linewidth=0.6)
        ax_rel.set_ylabel(f"loss − loss at step {first}")
        ax_rel.set_title(f"change since step {first}", fontsize=10)
        ax_rel.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        for ax in (ax_abs, ax_rel):
            ax.set_xlabel("steps")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        sub.suptitle(f"{tr['title']}\n{tr['note']}", fontsize=10)
    fig.legend(handles=list(handles.values()), loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    fig.suptitle("opposing signals: the pair's group losses against the full loss and a random subset")
    return figure_style.save(fig, path)


TIME_POINTS = ("at the fork (t*)", "mid-window", "window end")
TIME_POINTS_TRUNK = ("at t* (or the first measurement)", "midway", "last measurement")  # a run without branches
TIME_COLORS = ("#C6DBEF", "#6BAED6", "#08519C")  # one hue, light to dark: readable without colour vision


def curvature_steps(run: StudyRun, label: str) -> list[tuple[str, int, float]]:
    """(role, step, t_eff) of the measurements nearest to t_fork, the window's middle and its end
    (for a run without branches: t* or its first measurement, the middle, the last)."""
    m = run.lines[label]
    m = m[m.metric == "curvature_fraction"]
    if m.empty:
        return []
    pts = m.drop_duplicates("step")[["step", "t_eff"]].sort_values("step")
    if label == run.parent and run.reference != run.parent:
        return []
    lo, hi = run.window()
    if not len(run.comparison):
        lo = run.t_star if np.isfinite(run.t_star) else float(pts.t_eff.min())
        hi = float(pts.t_eff.max())
    out = []
    for role, t in zip(TIME_POINTS if len(run.comparison) else TIME_POINTS_TRUNK, (lo, (lo + hi) / 2, hi)):
        i = int(np.argmin(np.abs(pts.t_eff.to_numpy() - t)))
        out.append((role, int(pts.step.iloc[i]), float(pts.t_eff.iloc[i])))
    return out


def tensor_labels(names: list[str]) -> list[str]:
    """Readable names for parameter tensors in model order: ``1.weight`` -> ``layer 1 weights
    (1.weight)``; the modules holding parameters are numbered from 1, the last one is the output
    layer; the raw name stays in brackets so it can be matched with the tables' ``group``."""
    modules = list(dict.fromkeys(n.rpartition(".")[0] for n in names))
    kinds = {"weight": "weights", "bias": "biases"}
    out = []
    for n in names:
        module, _, kind = n.rpartition(".")
        i = modules.index(module)
        layer = "output layer" if i == len(modules) - 1 and len(modules) > 1 else f"layer {i + 1}"
        out.append(f"{layer} {kinds.get(kind, kind)} ({n})")
    return out


def plot_curvature_fraction(run: StudyRun, path) -> Path:
    """Figure 6: the fraction of curvature ‖v1[p]‖² per parameter tensor at the fork, mid-window and
    the window's end, as grouped bars, one panel per branch."""
    labels = [b for b in [run.reference, *run.others] if curvature_steps(run, b)]
    if not labels:
        raise NothingToPlot("no curvature_fraction was recorded (measure.curvature_fraction off, or no sharpness)")
    first = run.lines[labels[0]]
    tensors = list(dict.fromkeys(first.loc[first.metric == "curvature_fraction", "group"]))
    n = len(tensors)
    fig = new_figure(max(4.2 * len(labels) + 1.2, 8.0), 0.42 * n + 2.4)
    axes = fig.subplots(1, len(labels), squeeze=False, sharey=True, sharex=True)[0]
    y = np.arange(n)
    h = 0.8 / len(TIME_POINTS)
    for ax, b in zip(axes, labels):
        m = run.lines[b]
        m = m[m.metric == "curvature_fraction"]
        steps = curvature_steps(run, b)
        for k, (role, step, t) in enumerate(steps):
            v = m[m.step == step].set_index("group")["value"].reindex(tensors).to_numpy()
            ax.barh(y - 0.4 + h * (k + 0.5), v, height=h, color=TIME_COLORS[k], edgecolor="#333333",
                    linewidth=0.4, label=role)
        ax.set_yticks(y, tensor_labels(tensors))
        ax.set_xlabel("fraction of curvature ‖v1[p]‖²")
        ax.set_title(f"{describe_branch(run, b)}\nsteps " + " / ".join(str(s) for _, s, _ in steps), fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    axes[0].invert_yaxis()  # model order from the top (shared y: invert once)
    axes[0].set_ylabel("parameter tensor")
    roles = TIME_POINTS if len(run.comparison) else TIME_POINTS_TRUNK
    handles = [Patch(facecolor=c, edgecolor="#333333", label=r) for r, c in zip(roles, TIME_COLORS)]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    fig.suptitle(f"{run.name}: share of the top eigenvector per parameter tensor (seed {run.seed})")
    return figure_style.save(fig, path)
