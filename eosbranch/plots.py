"""Figures of a study (``eosbranch report``): one function per figure, each taking loaded tables and
an output path and returning the path of the PNG it wrote.

Conventions shared by every figure, so a reader learns them once:

- one colour per group, the same in every figure (:func:`group_colors`; Okabe–Ito, colour-blind
  safe; ``all`` is black);
- the EoS reference branch (the branch named ``eos``, else the parent; see ``compare``) solid, the
  other branches dashed / dash-dotted / dash-dot-dotted, the parent before the fork thin grey;
  dotted lines are reserved for the time markers t* (black) and t** (grey), never a branch;
- effective time t_eff = Σ η on the x axis wherever branches with different step sizes meet;
- legends outside the data area, constrained layout, no pyplot state (figures are built on the
  Agg canvas directly, so a notebook's backend is never touched);
- every line says what it shows in its gid (:func:`tag`: group, branch, role, metric or marker),
  so a test reads a figure's colours and styles per group and branch instead of guessing.

A figure that has nothing to show raises :class:`NothingToPlot` with the reason; the report lists
the reason instead of drawing an empty frame. The study they draw (:class:`StudyRun`) is in study.py.

Size: about 660 lines, six figures of one report that share the conventions above and ``_save``
(which tests replace to read figures back); a figure-per-module split is the next step if one grows.
"""

from __future__ import annotations

import io
import zlib
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, MaxNLocator, NullFormatter, NullLocator

from .errors import EosbranchError
from .store import write_output
from .study import StudyRun  # noqa: F401  (the figures' input; also importable from here)

# Okabe & Ito (2008), the colour-blind-safe qualitative palette; yellow is left out (unreadable on white).
BLACK, ORANGE, SKY_BLUE, GREEN = "#000000", "#E69F00", "#56B4E9", "#009E73"
BLUE, VERMILLION, PURPLE = "#0072B2", "#D55E00", "#CC79A7"
# Fixed colours for the group names eosbranch itself produces.
KNOWN_GROUPS = {
    "all": BLACK, "inlier": BLUE, "boundary": GREEN, "input_outlier": VERMILLION, "output_outlier": PURPLE,
    "opposing_rise": ORANGE, "opposing_fall": SKY_BLUE,
}
# Other names take the next free colour: Okabe–Ito first, then Paul Tol's "muted" (also colour-blind safe).
CYCLE = [BLUE, VERMILLION, GREEN, PURPLE, ORANGE, SKY_BLUE,
         "#332288", "#117733", "#882255", "#44AA99", "#999933", "#AA4499", "#88CCEE", "#DDCC77", "#CC6677"]
GREY, LIGHT_GREY = "#7F7F7F", "#BBBBBB"
OTHER_STYLES = ["--", "-.", (0, (6, 2, 1, 2, 1, 2))]  # never dotted: dots mark t* and t**
T_STAR_STYLE, T_STAR_STAR_STYLE = (0, (1, 2)), (0, (1, 1))
DPI = 110


class NothingToPlot(EosbranchError):
    """The tables hold nothing this figure could show (the message says what is missing)."""


def group_colors(names: Iterable[str]) -> dict[str, str]:
    """One colour per group name, deterministic and independent of the order of ``names``.

    Names eosbranch produces (``all``, the prototype roles, the opposing pair) have fixed colours;
    any other name takes the next colour of :data:`CYCLE` not taken by a fixed name of the same
    call, in sorted name order. Beyond the palette's size, colours repeat (chosen by a hash of the name). The report
    builds this mapping once, over every group of every run, and hands it to every figure.
    """
    names = sorted(set(names))
    out = {n: KNOWN_GROUPS[n] for n in names if n in KNOWN_GROUPS}
    free = [c for c in CYCLE if c not in out.values()]
    for n in names:
        if n in out:
            continue
        out[n] = free.pop(0) if free else CYCLE[zlib.crc32(n.encode()) % len(CYCLE)]
    return out


def tag(line, **fields: str) -> None:
    """Name what a drawn line shows (e.g. ``group=inlier``, ``branch=exit``, ``role=parent``) in its
    gid, ``key=value`` pairs joined by ``;``; :func:`tags` reads them back (tests check colours and
    line styles per group and branch through them)."""
    line.set_gid(";".join(f"{k}={v}" for k, v in fields.items()))


def tags(artist) -> dict[str, str]:
    """The fields :func:`tag` stored on ``artist`` ({} for an untagged artist)."""
    gid = artist.get_gid() or ""
    return dict(kv.split("=", 1) for kv in gid.split(";") if "=" in kv)


def _role(run: StudyRun, label: str) -> str:
    if label == run.reference:
        return "reference"
    return "parent" if label == run.parent else "other"


def _style(run: StudyRun, label: str) -> dict:
    if label == run.reference:
        return {"linestyle": "-", "linewidth": 1.9}
    if label == run.parent:
        return {"linestyle": "-", "linewidth": 1.0, "color": LIGHT_GREY}
    return {"linestyle": OTHER_STYLES[run.others.index(label) % len(OTHER_STYLES)], "linewidth": 1.6}


def _describe(run: StudyRun, label: str) -> str:
    if label == run.reference:
        return f"{label} (EoS reference)" if run.others else label
    if label == run.parent:
        return f"{label} (parent, before the fork)"
    return label


def _style_legend(run: StudyRun) -> list[Line2D]:
    """Black proxies for the branches' line styles (colours belong to groups)."""
    labels = dict.fromkeys([run.reference, *run.others, run.parent])
    return [Line2D([], [], label=_describe(run, b), **{"color": BLACK, **_style(run, b)}) for b in labels]


def _window_patch(run: StudyRun) -> list[Patch]:
    return [Patch(color=GREY, alpha=0.13, label="comparison window")] if len(run.comparison) else []


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    buf = io.BytesIO()
    fig.savefig(buf, dpi=DPI, format=path.suffix.lstrip(".") or "png")
    write_output(path, buf.getvalue())  # atomic; refuses a planted symlink
    return path


def _xlim_window(run: StudyRun, ax) -> None:
    """Zoom on the comparison window (a quarter of its length of context before the fork)."""
    if not len(run.comparison):
        return
    lo, hi = run.window()
    span = max(hi - lo, 1e-12)
    first = min(float(m.t_eff.min()) for m in run.lines.values())  # never before the run's start
    ax.set_xlim(max(first, lo - 0.25 * span), hi + 0.05 * span)


def _shade_window(run: StudyRun, ax, label: bool = False) -> Optional[Patch]:
    c = run.comparison
    patch = None
    for b in run.others:
        rows = c[c.branch == b]
        if rows.empty:
            continue
        r = rows.iloc[0]
        reached = np.isfinite(r.t_star_star)
        text = (f"window [t*, t**] of {b}" if reached else f"window [t*, end of {b}] (t** not reached)")
        patch = ax.axvspan(r.t_fork, r.t_end, color=GREY, alpha=0.13, linewidth=0, label=text if label else None)
        tag(patch, marker="window", branch=b)
    return patch


def _time_lines(run: StudyRun, ax, label: bool = True) -> None:
    if np.isfinite(run.t_star):
        line = ax.axvline(run.t_star, color=BLACK, linestyle=T_STAR_STYLE, linewidth=1.2,
                          label=f"t* = {run.t_star:.4g}" if label else None)
        tag(line, marker="t_star")
    c = run.comparison
    for b in run.others:
        rows = c[c.branch == b]
        if len(rows) and np.isfinite(rows.t_star_star.iloc[0]):
            line = ax.axvline(rows.t_star_star.iloc[0], color=GREY, linestyle=T_STAR_STAR_STYLE, linewidth=1.4,
                              label=f"t** of {b} = {rows.t_star_star.iloc[0]:.4g}" if label else None)
            tag(line, marker="t_star_star", branch=b)


T_EFF = "effective time t_eff = Σ η"


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
    fig = _new_figure(14 if zoom else 10, 5.0 if len(metrics) == 1 else 8.4)
    grid = fig.subplots(len(metrics), 2 if zoom else 1, squeeze=False, width_ratios=[3, 2] if zoom else None)
    off_scale = []  # thresholds too high to draw
    for row, metric in zip(grid, metrics):
        labels = [b for b in present if sharpness_metric(run, b) == metric]
        top = max(float(np.nanmax(run.curve(b, metric).values)) for b in labels)
        shown = []  # thresholds drawn
        for k, ax in enumerate(row):
            for b in labels:
                s = run.curve(b, metric)
                line, = ax.plot(s.index, s.values, label=f"{metric.replace('_', ' ')}: {_describe(run, b)}",
                                marker="o" if len(s) < 40 else None, markersize=2.5,
                                **{"color": BLACK, **_style(run, b)})
                tag(line, branch=b, role=_role(run, b), metric=metric)
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
                                linestyle="-" if b == run.reference else _style(run, b)["linestyle"])
                tag(line, branch=b, role=_role(run, b), metric="threshold")
            _time_lines(run, ax)
            _shade_window(run, ax, label=True)
            ax.set_xlabel(T_EFF)
            ax.grid(alpha=0.3)
        row[0].set_ylim(0, 1.08 * max([top, *shown]))
        row[0].set_ylabel(SHARPNESS_LABELS[metric])
        if run.others:
            _label_ends(row[0], [(b, run.curve(b, metric)) for b in labels if b != run.parent])
        if zoom:
            x0, x1, title = zoom_range(run)
            row[1].set_xlim(x0, x1)
            _autoscale_visible(row[1])
            row[1].set_title(title, fontsize=10)
    grid[0][0].set_title("whole run", fontsize=10)
    handles = {}
    for ax in grid.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    handles = list(handles.values()) + [Line2D([], [], color="none", label=t) for t in dict.fromkeys(off_scale)]
    fig.legend(handles=handles, loc="outside right center", fontsize=8, frameon=False)
    fig.suptitle(f"{run.name}: sharpness per branch (seed {run.seed})")
    return _save(fig, path)


def _label_ends(ax, curves: list[tuple[str, pd.Series]], gap: float = 0.06) -> None:
    """Name each branch at the end of its line (branches below their threshold follow the same
    gradient-flow curve on t_eff, so a dotted line can hide under a dashed one; the name at each
    line's end still tells them apart). Names are spread at least ``gap`` of the axis height apart."""
    lo, hi = ax.get_ylim()
    xlo, xhi = ax.get_xlim()
    ends = sorted(((float(s.index[-1]), (float(s.iloc[-1]) - lo) / (hi - lo), b) for b, s in curves if len(s)),
                  key=lambda e: e[1])
    placed = []
    for x, y, b in ends:
        y = min(max(y, 0.03), 0.97)
        if placed and y - placed[-1][1] < gap:
            y = placed[-1][1] + gap
        placed.append((x, y, b))
    over = placed[-1][1] - 0.97 if placed else 0.0
    for x, y, b in placed:
        text = ax.annotate(b, xy=(x - 0.006 * (xhi - xlo), y - max(over, 0.0)), xycoords=("data", "axes fraction"),
                           ha="right", va="center", fontsize=8,
                           bbox={"boxstyle": "square,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.85})
        tag(text, branch=b, marker="end_label")


def _grid(fig: Figure, n: int, ncols: int, **kw):
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return axes


def plot_group_losses(run: StudyRun, path, colors: dict[str, str]) -> Path:
    """Figure 2: each group's loss per branch (log scale) against t_eff, zoomed on the window."""
    groups = run.groups("loss")
    if not groups:
        raise NothingToPlot("no loss was recorded per group")
    ncols = min(3, len(groups))
    nrows = -(-len(groups) // ncols)
    fig = _new_figure(3.6 * ncols + 2.6, 2.8 * nrows + 0.6)
    axes = _grid(fig, len(groups), ncols, sharex=True)
    for ax, g in zip(axes.flat, groups):
        for b in run.lines:
            s = run.curve(b, "loss", g)
            if s.empty:
                continue
            st = {"color": colors[g], **_style(run, b)}
            line, = ax.plot(s.index, s.values, marker="o" if len(s) < 40 else None, markersize=2.5, **st)
            tag(line, group=g, branch=b, role=_role(run, b))  # the parent before the fork: grey
        _shade_window(run, ax)
        _time_lines(run, ax, label=False)
        _xlim_window(run, ax)
        _autoscale_visible(ax, log=True)
        ax.set_title(g, color=colors[g], fontweight="bold")
        ax.grid(alpha=0.3)
    for ax in axes[:, 0]:
        ax.set_ylabel("group loss ℓ_k (log)")
    for ax in axes.flat[len(groups) - ncols:len(groups)]:
        ax.set_xlabel(T_EFF)
        ax.xaxis.set_tick_params(labelbottom=True)
    handles = _style_legend(run) + [Line2D([], [], color=BLACK, linestyle=T_STAR_STYLE, label="t*")] + _window_patch(run)
    fig.legend(handles=handles, loc="outside right center", fontsize=8, frameon=False)
    fig.suptitle(f"{run.name}: group losses per branch (seed {run.seed})")
    return _save(fig, path)


def _autoscale_visible(axes, log: bool = False, floor: Optional[float] = None) -> None:
    """Fit y to the data inside each axis's x limits (matplotlib scales to all data), jointly over
    ``axes`` (one axis or a row sharing y); ``floor``: a lower limit to keep (e.g. 0 for cos²)."""
    axes = list(axes) if isinstance(axes, (list, tuple, np.ndarray)) else [axes]
    ys = []
    for ax in axes:
        lo, hi = ax.get_xlim()
        for line in ax.get_lines():
            if line.get_transform() != ax.transData:  # axvline / axhline: y in axes coordinates
                continue
            x, y = (np.asarray(a, float) for a in line.get_data())
            if x.size < 1 or y.size != x.size:
                continue
            keep = (x >= lo) & (x <= hi) & np.isfinite(y)
            if log:
                keep &= y > 0
            ys.append(y[keep])
    ys = np.concatenate(ys) if ys else np.array([])
    if not ys.size:
        return
    if log:
        llo, lhi = np.log(ys.min()), np.log(ys.max())
        pad = max(0.08 * (lhi - llo), 0.002)
        lo, hi = np.exp(llo - pad), np.exp(lhi + pad)
        for ax in axes:
            ax.set_yscale("log")
            ax.set_ylim(lo, hi)
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))  # 0.28, not 2.8×10⁻¹
            ax.yaxis.set_minor_formatter(NullFormatter())
            if hi / lo < 10:  # under a decade log ticks are sparse or crowded: place a few evenly spaced ones
                ticks = [t for t in MaxNLocator(5).tick_values(lo, hi) if lo <= t <= hi]
                digits = next((d for d in range(3, 8) if len({f"{t:.{d}g}" for t in ticks}) == len(ticks)), 8)
                ax.yaxis.set_major_locator(FixedLocator(ticks))
                ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _, d=digits: f"{v:.{d}g}"))
                ax.yaxis.set_minor_locator(NullLocator())
            elif hi / lo < 1000:  # two or three decades: label 1, 2, 5 of each
                ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    else:
        pad = 0.06 * (ys.max() - ys.min() or abs(ys.max()) or 1.0)
        lo = ys.min() - pad if floor is None else min(floor, ys.min() - pad)
        for ax in axes:
            ax.set_ylim(lo, ys.max() + pad)


def plot_branch_effect(bands: pd.DataFrame, path, colors: dict[str, str], reference: str = "eos",
                       relative: bool = False, ratios: Optional[pd.DataFrame] = None,
                       validity: Optional[dict] = None, band: float = 0.10) -> Path:
    """Figure 3: Δℓ_k = ℓ_k(branch) − ℓ_k(EoS) per group on t_eff, the median across seeds with its
    inter-quartile band (one line for one seed); Δ > 0 reads "faster at EoS". One panel per branch
    (row) and group (column), each with its own y axis symmetric about 0: a group whose Δ is 1e-3
    stays as visible as one whose Δ is 0.1 (the tick labels give the scale).

    The every-step Δ is drawn thin and light (at the EoS it zigzags with the period-two
    oscillation), the central Δ (consecutive steps averaged) bold over it. A branch whose window is
    invalid in some seed (``validity``: branch -> (n_valid, n_seeds, reasons), from compare) has
    its panels greyed and says so; where the reference's S / threshold leaves ±``band`` the time
    is shaded grey, and a last row draws that ratio (``ratios``: branch, seed, x, ratio) with the
    band.

    ``bands``: columns branch, group, x, median, q25, q75, n_seeds (see ``report.effect_bands``),
    optionally ``central``. ``relative``: x is time since each seed's fork (several seeds), else
    absolute t_eff."""
    if bands.empty:
        raise NothingToPlot("no branches to compare (fork the run first)")
    branches = list(dict.fromkeys(bands.branch))
    groups = sorted(set(bands.group) - {"all"}) + (["all"] if "all" in set(bands.group) else [])
    n_seeds = int(bands.n_seeds.max())
    validity = validity or {}
    with_ratio = ratios is not None and len(ratios) > 0
    n_rows = len(branches) + (1 if with_ratio else 0)
    fig = _new_figure(3.0 * len(groups) + 2.4, 2.6 * len(branches) + (1.4 if with_ratio else 0) + 1.1)
    grid = fig.subplots(n_rows, len(groups), squeeze=False,
                        gridspec_kw={"height_ratios": [1.0] * len(branches) + ([0.6] if with_ratio else [])})
    axes = grid[:len(branches)]
    for row, b in zip(axes, branches):
        d = bands[bands.branch == b]
        n_valid, n_all, reasons = validity.get(b, (1, 1, []))
        off = _off_threshold_spans(ratios, b, band) if with_ratio and n_all == 1 else []
        for ax, g in zip(row, groups):
            r = d[d.group == g]
            top = 0.0
            if n_valid < n_all:
                ax.set_facecolor("#EDEDED")
            for lo, hi in off:
                ax.axvspan(lo, hi, color=GREY, alpha=0.22, linewidth=0)
            if len(r):
                central = "central" in r.columns and r["central"].notna().any()
                line, = ax.plot(r.x, r["median"], color=colors[g], linewidth=0.6 if central else 1.8,
                                alpha=0.4 if central else 1.0, label=g)
                tag(line, group=g, branch=b, metric="delta")
                top = float(np.nanmax(np.abs(r["median"])))
                if central:
                    cline, = ax.plot(r.x, r["central"], color=colors[g], linewidth=1.8 if g != "all" else 1.2)
                    tag(cline, group=g, branch=b, metric="delta_central")
                if int(r.n_seeds.iloc[0]) > 1:
                    ax.fill_between(r.x, r.q25, r.q75, color=colors[g], alpha=0.18, linewidth=0)
                    top = max(top, float(np.nanmax(np.abs(r[["q25", "q75"]].to_numpy()))))
            top = top or 1.0
            ax.axhline(0, color=BLACK, linewidth=0.8)
            ax.set_ylim(-1.45 * top, 1.45 * top)  # symmetric, own scale, free bands at top and bottom for the notes
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
            ax.text(0.02, 0.975, "↑ Δ > 0: faster at EoS", transform=ax.transAxes, va="top", ha="left", fontsize=7,
                    color="#333333")
            ax.text(0.02, 0.025, "↓ Δ < 0: slower at EoS", transform=ax.transAxes, va="bottom", ha="left", fontsize=7,
                    color="#333333")
            invalid = " · invalid window" if n_valid < n_all else ""
            ax.set_title((g if len(branches) == 1 else f"{g} ({b})") + invalid, color=colors[g], fontweight="bold",
                         fontsize=9)
            ax.set_xlim(float(d.x.min()), float(d.x.max()))
            ax.xaxis.set_major_locator(MaxNLocator(4))
            ax.grid(alpha=0.3)
        row[0].set_ylabel(f"Δℓ_k = ℓ_k({b}) − ℓ_k({reference})", fontsize=9)
    if with_ratio:
        _plot_reference_ratio(grid[-1], ratios, branches, band, reference)
        for ax in grid[-1]:
            ax.set_xlim(float(bands.x.min()), float(bands.x.max()))
    for ax in grid[-1]:
        ax.set_xlabel("t_eff − t_fork (Σ η)" if relative else "t_eff = Σ η", fontsize=9)
    handles = [Line2D([], [], color=colors[g], linewidth=1.8, label=g) for g in groups]
    if "central" in bands.columns:
        handles.append(Line2D([], [], color=GREY, linewidth=0.6, alpha=0.6, label="every step"))
        handles.append(Line2D([], [], color=GREY, linewidth=1.8, label="central (2-step mean)"))
    if with_ratio:
        handles.append(Patch(color=GREY, alpha=0.22, label=f"reference off ±{band:.0%}\nof its threshold"))
    if n_seeds > 1:
        handles.append(Patch(color=GREY, alpha=0.3, label=f"inter-quartile range\nacross {n_seeds} seeds"))
    fig.legend(handles=handles, loc="outside right center", fontsize=8, frameon=False, title="group")
    seeds = f", median of {n_seeds} seeds" if n_seeds > 1 else ""
    notes = []
    for b in branches:
        n_valid, n_all, reasons = validity.get(b, (1, 1, []))
        if n_valid < n_all:
            why = reasons[0].split(";")[0] if n_all == 1 and reasons else f"{n_all - n_valid} of {n_all} seeds"
            notes.append(f"{b}: invalid window (grey), {why}")
    fig.suptitle(f"branch effect Δℓ_k per group (Δ > 0: loss lower at EoS{seeds}); each panel has its own y scale"
                 + "".join(f"\n{n}" for n in notes), fontsize=10 if notes else None)
    return _save(fig, path)


def _off_threshold_spans(ratios: pd.DataFrame, branch: str, band: float) -> list[tuple[float, float]]:
    """Time spans (between measurement midpoints) where the reference's S / threshold is off
    ±``band`` of 1: those parts of the window do not compare against a reference at the EoS."""
    r = ratios[ratios.branch == branch].sort_values("x")
    x, v = r.x.to_numpy(float), r.ratio.to_numpy(float)
    if len(x) == 0:
        return []
    mid = np.concatenate([[x[0]], 0.5 * (x[1:] + x[:-1]), [x[-1]]])
    return [(mid[i], mid[i + 1]) for i in range(len(x)) if abs(v[i] - 1) > band]


def _plot_reference_ratio(row, ratios: pd.DataFrame, branches: list, band: float, reference: str) -> None:
    """The last row of figure 3: the reference's S / threshold over each branch's window, one line
    per seed, with the ±band the window validity reads."""
    for i, ax in enumerate(row):
        ax.axhspan(1 - band, 1 + band, color=GREEN, alpha=0.15, linewidth=0)
        ax.axhline(1.0, color=BLACK, linewidth=0.8)
        for (b, seed), r in ratios.groupby(["branch", "seed"], sort=False):
            line, = ax.plot(r.x, r.ratio, color=GREY, linewidth=0.9, marker=".", markersize=2)
            tag(line, branch=str(b), seed=str(seed), metric="reference_ratio")
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.grid(alpha=0.3)
        if i == 0:
            ax.set_ylabel(f"S / threshold\n({reference}, ±{band:.0%} band)", fontsize=8)


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
    fig = _new_figure(2.9 * len(groups) + 2.6, 7.2)
    axes = fig.subplots(len(ALIGNMENT_ROWS), len(groups), squeeze=False, sharex=True, sharey="row")
    for j, g in enumerate(groups):
        for i, (metric, ylabel, log) in enumerate(ALIGNMENT_ROWS):
            ax = axes[i, j]
            for b in run.lines:
                s = run.curve(b, metric, g)
                if s.empty:
                    continue
                st = {"color": colors[g], **_style(run, b)}
                line, = ax.plot(s.index, s.values, marker="o" if len(s) < 40 else None, markersize=2.5, **st)
                tag(line, group=g, branch=b, role=_role(run, b))
            _shade_window(run, ax)
            _xlim_window(run, ax)
            ax.grid(alpha=0.3)
            if i == 0:
                ax.set_title(g, color=colors[g], fontweight="bold")
            if j == 0:
                ax.set_ylabel(ylabel, fontsize=9)
            if i == len(ALIGNMENT_ROWS) - 1:
                ax.set_xlabel(T_EFF, fontsize=9)
    for i, (metric, _, log) in enumerate(ALIGNMENT_ROWS):  # shared y per row: everything visible in the row
        _autoscale_visible(axes[i], log=log, floor=0.0 if metric == "cos2_v1" else None)
    fig.legend(handles=_style_legend(run) + _window_patch(run),
               loc="outside right center", fontsize=8, frameon=False)
    fig.suptitle(f"{run.name}: alignment with the top eigenvector v1, curvature influence and gradient norm "
                 f"(seed {run.seed})")
    return _save(fig, path)


OPPOSING_SERIES = ("rise", "fall", "full", "random")


def plot_opposing(traces: list[dict], path, colors: dict[str, str]) -> Path:
    """Figure 5: an opposing pair's group losses against the full loss and a random subset of the
    same size, step by step over the detection window; left the losses, right their change since
    the window's first step (antiphase: the two groups move in opposite directions).

    Each trace: ``title``, ``names`` (rise and fall group names), ``frame`` (columns step, series
    in rise/fall/full/random, loss), ``note`` (one line of statistics)."""
    if not traces:
        raise NothingToPlot("no opposing pair was found for these runs")
    fig = _new_figure(11, 3.6 * len(traces) + 0.9)
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
        _autoscale_visible(ax_abs, log=True)
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
    return _save(fig, path)


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
    fig = _new_figure(max(4.2 * len(labels) + 1.2, 8.0), 0.42 * n + 2.4)
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
        ax.set_title(f"{_describe(run, b)}\nsteps " + " / ".join(str(s) for _, s, _ in steps), fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    axes[0].invert_yaxis()  # model order from the top (shared y: invert once)
    axes[0].set_ylabel("parameter tensor")
    roles = TIME_POINTS if len(run.comparison) else TIME_POINTS_TRUNK
    handles = [Patch(facecolor=c, edgecolor="#333333", label=r) for r, c in zip(roles, TIME_COLORS)]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    fig.suptitle(f"{run.name}: share of the top eigenvector per parameter tensor (seed {run.seed})")
    return _save(fig, path)
