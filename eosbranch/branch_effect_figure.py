"""Figure 3 of a report: the branch effect Δℓ_k per group and branch, with the reference's
S / threshold ratio under it (conventions: figure_style.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from . import figure_style
from .figure_style import BLACK, GREEN, GREY, NothingToPlot, new_figure, tag


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
    fig = new_figure(3.0 * len(groups) + 2.4, 2.6 * len(branches) + (1.4 if with_ratio else 0) + 1.1)
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
    return figure_style.save(fig, path)


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
