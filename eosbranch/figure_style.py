"""The conventions every figure of a report shares, so a reader learns them once (the figures are
in plots.py and branch_effect_figure.py):

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
the reason instead of drawing an empty frame. Figures are written by :func:`save`, which they call
through this module (``figure_style.save``), so a test that replaces it reads every figure back.
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

from .atomic_file import write_output
from .errors import EosbranchError
from .study import StudyRun

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


def branch_role(run: StudyRun, label: str) -> str:
    if label == run.reference:
        return "reference"
    return "parent" if label == run.parent else "other"


def branch_style(run: StudyRun, label: str) -> dict:
    if label == run.reference:
        return {"linestyle": "-", "linewidth": 1.9}
    if label == run.parent:
        return {"linestyle": "-", "linewidth": 1.0, "color": LIGHT_GREY}
    return {"linestyle": OTHER_STYLES[run.others.index(label) % len(OTHER_STYLES)], "linewidth": 1.6}


def describe_branch(run: StudyRun, label: str) -> str:
    if label == run.reference:
        return f"{label} (EoS reference)" if run.others else label
    if label == run.parent:
        return f"{label} (parent, before the fork)"
    return label


def style_legend(run: StudyRun) -> list[Line2D]:
    """Black proxies for the branches' line styles (colours belong to groups)."""
    labels = dict.fromkeys([run.reference, *run.others, run.parent])
    return [Line2D([], [], label=describe_branch(run, b), **{"color": BLACK, **branch_style(run, b)}) for b in labels]


def window_patch(run: StudyRun) -> list[Patch]:
    return [Patch(color=GREY, alpha=0.13, label="comparison window")] if len(run.comparison) else []


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Figure, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)

    buf = io.BytesIO()
    fig.savefig(buf, dpi=DPI, format=path.suffix.lstrip(".") or "png")
    write_output(path, buf.getvalue())  # atomic; refuses a planted symlink
    return path


def xlim_window(run: StudyRun, ax) -> None:
    """Zoom on the comparison window (a quarter of its length of context before the fork)."""
    if not len(run.comparison):
        return
    lo, hi = run.window()
    span = max(hi - lo, 1e-12)
    first = min(float(m.t_eff.min()) for m in run.lines.values())  # never before the run's start
    ax.set_xlim(max(first, lo - 0.25 * span), hi + 0.05 * span)


def shade_window(run: StudyRun, ax, label: bool = False) -> Optional[Patch]:
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


def time_lines(run: StudyRun, ax, label: bool = True) -> None:
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


def label_ends(ax, curves: list[tuple[str, pd.Series]], gap: float = 0.06) -> None:
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


def grid(fig: Figure, n: int, ncols: int, **kw):
    ncols = min(ncols, n)
    nrows = -(-n // ncols)
    axes = fig.subplots(nrows, ncols, squeeze=False, **kw)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return axes


def autoscale_visible(axes, log: bool = False, floor: Optional[float] = None) -> None:
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
