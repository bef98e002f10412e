"""eosbranch report: every figure written and readable, summary numbers equal compare()'s, one colour
per group in every figure, the CLI, seeds with an inter-quartile band, reduced reports."""

import copy
import json
import shutil
import struct

import numpy as np
import pytest
import yaml
from matplotlib.colors import to_hex
from matplotlib.text import Text
from typer.testing import CliRunner

import eosbranch
from eosbranch import figure_style, plots
from eosbranch.cli import app
from eosbranch.compare import branch_effect, branches_of
from eosbranch.report import FIGURES, effect_bands, load_study_run, opposing_trace

from conftest import TINY

BRANCHES = {"branches": [{"name": "eos"}, {"name": "exit", "interventions": [{"kind": "lr", "factor": 0.1}]}]}
# The study adds a mild exit (lr x 0.95: threshold 17.5 against S(t*) = 16.9, still sharpening), which
# reaches its own threshold within the 60 steps: figure 1 then has a t** line and a third line style.
STUDY_BRANCHES = {"branches": [*BRANCHES["branches"], {"name": "mild", "interventions": [{"kind": "lr", "factor": 0.95}]}]}


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def study(quick_run, tmp_path_factory):
    """A private copy of the session's quick run (other tests fork the original), forked at t* into
    eos, exit (lr x 0.1) and mild (lr x 0.95) for 60 steps, with its opposing pair found by the CLI."""
    runs = tmp_path_factory.mktemp("report_runs")
    run = eosbranch.load(shutil.copytree(quick_run.path, runs / quick_run.name))
    eosbranch.fork(run, at=("onset", 0), branches=STUDY_BRANCHES, steps=60)
    res = CliRunner().invoke(app, ["opposing", str(run.path), "--step", "onset", "--top", "5", "--window", "6"])
    assert res.exit_code == 0, res.output
    return run


@pytest.fixture(scope="module")
def reported(study):
    """`eosbranch report RUN` through the CLI, keeping every figure object it saves."""
    drawn, save = {}, figure_style.save

    def keep(fig, path):
        drawn[path.name] = fig
        return save(fig, path)

    figure_style.save = keep
    try:
        res = CliRunner().invoke(app, ["report", str(study.path)])
    finally:
        figure_style.save = save
    assert res.exit_code == 0, res.output
    return study.path / "report" / "summary.md", res, drawn


def test_every_figure_is_a_readable_png(study, reported):
    reported, res, _ = reported
    for file, _ in FIGURES.values():
        path = reported.parent / file
        assert path.is_file(), f"{file} missing"
        w, h = png_size(path)
        assert 600 <= w <= 2600 and 300 <= h <= 2000, (file, w, h)
        assert 15_000 < path.stat().st_size < 400_000, (file, path.stat().st_size)
    text = reported.read_text()
    for k, (file, _) in FIGURES.items():
        assert f"{k}. [`{file}`]({file})" in text


def test_summary_holds_the_numbers_compare_returns(study, reported):
    text = reported[0].read_text()
    df = eosbranch.compare(study)
    assert set(df.branch) == {"exit", "mild"} and len(df) == 10
    t_star = df.t_star.iloc[0]
    step = int(study.events.query("event == 't_star'").step.iloc[0])
    exit_, mild = df[df.branch == "exit"].iloc[0], df[df.branch == "mild"].iloc[0]
    assert f"| {t_star:.6g} (step {step}) | exit vs eos | {step} | not reached | {exit_.t_end:.6g} |" in text
    assert np.isfinite(mild.t_star_star) and mild.t_end == mild.t_star_star
    assert f"| {t_star:.6g} (step {step}) | mild vs eos | {step} | {mild.t_star_star:.6g} | {mild.t_end:.6g} |" in text
    for r in df.itertuples():
        assert r.delta_at_end != 0
        assert r.source == "every_step"  # full-batch GD: every group's loss at every step
        assert r.effect == ("learns faster at EoS" if r.delta_central_mean > 0 else "learns slower at EoS")
        sign = "+" if r.delta_at_end > 0 else "-"
        row = f"| {r.branch} | {r.group} | {sign}{abs(r.delta_at_end):.3e} | {r.delta_mean:+.3e} | "
        assert row in text and f"{r.effect}{'' if r.valid else ' (invalid window)'} |" in text.split(row)[1].splitlines()[0]
    events = [eosbranch.load(p).events for p in study.path.parent.glob(f"{study.name}--*")]
    certs = [e[e.event.str.startswith("certificate")] for e in events]
    rows = [r for c in certs for r in c.itertuples()]
    kinds = {r.event for r in rows}
    assert {"certificate_null", "certificate_fork_state"} <= kinds, kinds  # the eos branch is the null control
    assert "## Integrity certificate" in text and "No certificate events" not in text
    assert all(r.value == 0.0 for r in rows if r.event in ("certificate_null", "certificate_fork_state"))
    for r in rows:
        detail = str(r.detail).replace("|", "\\|")
        assert f"| {r.run} | {r.branch} | {r.event} | {r.step} | {r.value:.6g} | {detail} |" in text


def test_figure_3_ends_at_the_delta_compare_reports(study):
    seed = load_study_run(study)
    bands = effect_bands([seed])
    df = eosbranch.compare(study)
    for r in df.itertuples():
        b = bands[(bands.branch == r.branch) & (bands.group == r.group)]
        assert len(b) == 3000 and b.n_seeds.iloc[0] == 1
        assert b.x.iloc[0] == pytest.approx(r.t_fork) and b.x.iloc[-1] == pytest.approx(r.t_end)
        assert b["median"].iloc[-1] == pytest.approx(r.delta_at_end, abs=1e-15)
        # compare's delta_mean is the exact mean of the piecewise-linear Δ; the grid's trapezoid approaches it.
        assert np.trapezoid(b["median"], b.x) / (r.t_end - r.t_fork) == pytest.approx(r.delta_mean, rel=1e-3, abs=1e-9)
        assert b["central"].iloc[-1] == pytest.approx(r.delta_central_at_end, rel=1e-9, abs=1e-15)
        assert (b.q25 == b["median"]).all() and (b.q75 == b["median"]).all()  # one seed: no band


def test_group_colors_are_deterministic_distinct_and_fixed_for_known_names():
    names = ["zeta", "inlier", "all", "alpha", "output_outlier", "mid"]
    a, b = plots.group_colors(names), plots.group_colors(reversed(names))
    assert a == b
    assert len(set(a.values())) == len(names)
    assert a["all"] == "#000000" and a["inlier"] == plots.KNOWN_GROUPS["inlier"]
    assert plots.group_colors(["inlier"])["inlier"] == a["inlier"]
    assert not {a["alpha"], a["mid"], a["zeta"]} & {a["inlier"], a["output_outlier"], a["all"]}
    many = plots.group_colors(f"g{i}" for i in range(40))  # beyond the palette: colours repeat, never fail
    assert len(many) == 40 and set(many.values()) <= set(plots.CYCLE)


def test_a_group_has_the_same_colour_in_every_figure(study, reported):
    drawn = reported[2]
    assert set(drawn) == {file for file, _ in FIGURES.values()}
    seed = load_study_run(study)
    trace, _ = opposing_trace(study, seed)
    colors = plots.group_colors(set(seed.groups("loss")) | set(trace["names"]))
    seen = {}
    for name, fig in drawn.items():
        for ax in fig.axes:
            for line in ax.get_lines():
                t = plots.tags(line)
                if "group" not in t:
                    continue
                if t.get("role") == "parent":  # the parent before the fork, drawn grey behind the branches
                    assert to_hex(line.get_color()) == plots.LIGHT_GREY.lower()
                else:
                    g = t["group"]
                    assert to_hex(line.get_color()) == colors[g].lower(), (name, g)
                    seen.setdefault(g, set()).add(name)
    for g in ("inlier", "boundary", "input_outlier", "output_outlier"):
        assert {FIGURES[k][0] for k in (2, 3, 4)} <= seen[g], g
    assert FIGURES[5][0] in seen["opposing_rise"] and FIGURES[5][0] in seen["opposing_fall"]


# --------------------------------------------------------------------------- readable at a glance
def _texts(fig) -> list:
    """(where, Text) for every visible, non-empty text matplotlib draws in ``fig``: titles and
    suptitles (subfigures too), axis labels, offset texts, tick labels inside the view, free texts,
    legend entries and titles."""
    out = []

    def add(where, t):
        if isinstance(t, Text) and t.get_visible() and t.get_text().strip():
            out.append((where, t))

    def figures(f):
        yield f
        for sub in f.subfigs:
            yield from figures(sub)

    for f in figures(fig):
        add("suptitle", getattr(f, "_suptitle", None))
        for leg in f.legends:
            add("legend title", leg.get_title())
            for t in leg.get_texts():
                add("legend", t)
    for i, ax in enumerate(fig.axes):
        if not ax.get_visible():
            continue
        for t in (ax.title, ax._left_title, ax._right_title):
            add(f"ax{i} title", t)
        for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            add(f"ax{i} {name}label", axis.label)
            add(f"ax{i} {name}offset", axis.get_offset_text())
            scale = axis.get_transform()  # compare positions as drawn (log axes: in log space)
            lo, hi = sorted(scale.transform(np.asarray(axis.get_view_interval(), float)))
            tol = 1e-9 * (hi - lo)
            for locs, ticks in ((axis.get_majorticklocs(), axis.get_major_ticks),
                                (axis.get_minorticklocs(), axis.get_minor_ticks)):
                for tick, loc in zip(ticks(len(locs)), locs):
                    pos = scale.transform(np.asarray([loc], float))[0] if loc > 0 or axis.get_scale() != "log" else -np.inf
                    if lo - tol <= pos <= hi + tol:  # matplotlib draws only the ticks inside the view
                        add(f"ax{i} {name}tick", tick.label1)
        for t in ax.texts:
            add(f"ax{i} text", t)
        if ax.get_legend() is not None:
            for t in ax.get_legend().get_texts():
                add(f"ax{i} legend", t)
    return out


def _overlap(a, b, px: float = 0.5) -> bool:
    return min(a.x1, b.x1) - max(a.x0, b.x0) > px and min(a.y1, b.y1) - max(a.y0, b.y0) > px


def readability_problems(fig) -> list[str]:
    """What makes ``fig`` hard to read, measured on the rendered figure: overlapping texts, texts or
    legends cut by the figure's edge, a legend over a data area, an axis with tick labels and no
    axis label in its row (y) or column (x)."""
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    edge = fig.bbox.padded(1)
    texts = [(w, t, t.get_window_extent(r)) for w, t in _texts(fig)]
    out = [f"{w} {t.get_text()!r} is cut by the figure's edge" for w, t, b in texts
           if not (edge.containsx(b.x0) and edge.containsx(b.x1) and edge.containsy(b.y0) and edge.containsy(b.y1))]
    for i, (wa, ta, ba) in enumerate(texts):
        for wb, tb, bb in texts[i + 1:]:
            if _overlap(ba, bb):
                out.append(f"{wa} {ta.get_text()!r} overlaps {wb} {tb.get_text()!r}")
    axes = [ax for ax in fig.axes if ax.get_visible()]
    boxes = {ax: ax.get_window_extent(r) for ax in axes}
    legends = list(fig.legends) + [sub_leg for sub in fig.subfigs for sub_leg in sub.legends]
    legends += [ax.get_legend() for ax in axes if ax.get_legend() is not None]
    for leg in legends:
        lb = leg.get_window_extent(r)
        out += [f"a legend covers the data area of {ax.get_title()!r}" for ax in axes if _overlap(lb, boxes[ax])]
        if not (edge.containsx(lb.x0) and edge.containsx(lb.x1) and edge.containsy(lb.y0) and edge.containsy(lb.y1)):
            out.append("a legend is cut by the figure's edge")
    shown = {w.split()[0] + " " + w.split()[1][0] for w, _ in _texts(fig) if "tick" in w}  # e.g. "ax3 y"
    for i, ax in enumerate(fig.axes):
        if not ax.get_visible():
            continue
        b = boxes[ax]
        row = [a for a in axes if abs(boxes[a].y0 - b.y0) < 2 and abs(boxes[a].y1 - b.y1) < 2]
        col = [a for a in axes if abs(boxes[a].x0 - b.x0) < 2 and abs(boxes[a].x1 - b.x1) < 2]
        if f"ax{i} x" in shown and not any(a.get_xlabel().strip() for a in col):
            out.append(f"{ax.get_title()!r}: x tick labels and no x axis label in its column")
        if f"ax{i} y" in shown and not any(a.get_ylabel().strip() for a in row):
            out.append(f"{ax.get_title()!r}: y tick labels and no y axis label in its row")
    return out


def test_readability_check_finds_what_it_looks_for():
    """The oracle of the next test, on figures made unreadable on purpose."""
    fig = figure_style.new_figure(4, 3)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], label="a line")
    ax.set_xlabel("x")
    assert any("no y axis label" in p for p in readability_problems(fig))
    ax.set_ylabel("y")
    assert readability_problems(fig) == []
    ax.text(0.5, 0.5, "one", transform=ax.transAxes)
    ax.text(0.5, 0.5, "two", transform=ax.transAxes)
    assert any("'one' overlaps" in p and "'two'" in p for p in readability_problems(fig))
    fig = figure_style.new_figure(4, 3)
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], label="a line")
    ax.set_xlabel("x")
    ax.set_ylabel("y")
    ax.legend(loc="center")
    assert any("legend covers the data area" in p for p in readability_problems(fig))


def test_every_figure_is_readable_at_a_glance(reported):
    drawn = reported[2]
    problems = {name: readability_problems(fig) for name, fig in drawn.items()}
    assert problems == {name: [] for name in drawn}


def test_eos_branch_solid_other_branches_dashed(study, reported):
    """Figures 1, 2 and 4: every line of the EoS reference (eos) solid, of exit and mild a dashed or
    dotted style (one per branch, the same in every figure), the parent before the fork thin grey."""
    drawn = reported[2]
    styles = {}
    for file in (FIGURES[1][0], FIGURES[2][0], FIGURES[4][0]):
        found = set()
        for ax in drawn[file].axes:
            for line in ax.get_lines():
                t = plots.tags(line)
                if "branch" not in t or t.get("metric") == "threshold" or "marker" in t:
                    continue
                found.add(t["branch"])
                ls = line.get_linestyle()
                if t["branch"] == "eos":
                    assert ls == "-" and t["role"] == "reference", (file, t)
                elif t["branch"] == study.lineage.get("branch", "trunk"):
                    assert t["role"] == "parent" and to_hex(line.get_color()) == plots.LIGHT_GREY.lower()
                else:
                    assert ls in ("--", ":", "-."), (file, t, ls)
                    styles.setdefault(t["branch"], set()).add(ls)
        assert {"eos", "exit", "mild"} <= found, (file, found)
    assert all(len(v) == 1 for v in styles.values()) and styles["exit"] != styles["mild"], styles


def _crossing(t, value, threshold, after):
    """First t > after with value >= threshold, linearly interpolated (DESIGN §2, t**)."""
    prev = None
    for ti, v, thr in zip(t, value, threshold):
        if ti <= after:
            continue
        if v >= thr:
            if prev is None:
                return ti
            (tp, fp), f = prev, v - thr
            return tp + (ti - tp) * (-fp) / (f - fp)
        prev = (ti, v - thr)
    return float("nan")


def test_figure_1_draws_thresholds_onset_and_the_window(study, reported):
    fig = reported[2][FIGURES[1][0]]
    ax = fig.axes[0]
    lines = [(plots.tags(line), line) for line in ax.get_lines()]
    t_star = float(study.events.query("event == 't_star'").t_eff.iloc[0])
    (marked,) = [line for t, line in lines if t.get("marker") == "t_star"]
    np.testing.assert_allclose(marked.get_xdata(), t_star)
    # thresholds as horizontal lines: 2/eta of the reference, 2/(0.95 eta) of mild (exit's 2/(0.1 eta)
    # is far above every sharpness and named in the legend instead)
    lr = study.spec.optimizer["lr"]
    thr = {t["branch"]: line for t, line in lines if t.get("metric") == "threshold"}
    assert set(np.round(thr["eos"].get_ydata(), 9)) == {round(2 / lr, 9)}
    assert set(np.round(thr["mild"].get_ydata(), 9)) == {round(2 / (0.95 * lr), 9)}
    assert "exit" not in thr
    assert any("threshold of exit = 166.7 (above the axis)" in t.get_text() for t in fig.legends[0].get_texts())
    # t** of mild where its own sharpness crosses its own threshold
    mild = next(b for b in branches_of(study) if b.lineage["branch"] == "mild")
    m = mild.metrics
    s = m[m.metric == "sharpness"].sort_values("t_eff")
    th = m[m.metric == "threshold"].sort_values("t_eff")
    tss = _crossing(s.t_eff, s.value, th.value, after=s.t_eff.min())
    assert np.isfinite(tss)
    (tss_line,) = [line for t, line in lines if t.get("marker") == "t_star_star"]
    assert plots.tags(tss_line)["branch"] == "mild"
    np.testing.assert_allclose(tss_line.get_xdata(), tss, rtol=1e-9)
    # the window shaded from the fork to t** (mild) or the branch's end (exit)
    spans = {plots.tags(p)["branch"]: p for p in ax.patches if plots.tags(p).get("marker") == "window"}
    x0, x1 = spans["mild"].get_x(), spans["mild"].get_x() + spans["mild"].get_width()
    assert (x0, x1) == (pytest.approx(t_star), pytest.approx(tss, rel=1e-9))
    ends = {b.lineage["branch"]: b.metrics.t_eff.max() for b in branches_of(study)}
    assert spans["exit"].get_x() == pytest.approx(t_star)  # exit never reaches 2/(0.1 eta): to the common end
    assert spans["exit"].get_x() + spans["exit"].get_width() == pytest.approx(min(ends["exit"], ends["eos"]))
    assert "effective time" in ax.get_xlabel() and "sharpness" in ax.get_ylabel()
    # each branch named at its line's end (a dotted line may hide under a dashed one)
    names = {plots.tags(t)["branch"]: t for t in ax.texts if plots.tags(t).get("marker") == "end_label"}
    assert set(names) == {"eos", "exit", "mild"} and all(t.get_text() == b for b, t in names.items())
    for b, t in names.items():
        assert t.xy[0] == pytest.approx(ends[b], abs=0.01 * ax.get_xlim()[1])


def test_figures_2_to_4_log_scales_and_annotations(study, reported):
    drawn = reported[2]
    fig2 = drawn[FIGURES[2][0]]
    assert all(ax.get_yscale() == "log" for ax in fig2.axes if ax.get_visible())
    fig4 = drawn[FIGURES[4][0]]
    scales = {ax.get_ylabel(): ax.get_yscale() for ax in fig4.axes if ax.get_ylabel()}
    assert [scales[k] for k in sorted(scales)] and scales[plots.ALIGNMENT_ROWS[0][1]] == "linear"
    assert scales[plots.ALIGNMENT_ROWS[1][1]] == scales[plots.ALIGNMENT_ROWS[2][1]] == "log"
    fig3 = drawn[FIGURES[3][0]]
    ratio_axes = [ax for ax in fig3.axes if any(plots.tags(line).get("metric") == "reference_ratio"
                                                for line in ax.get_lines())]
    delta_axes = [ax for ax in fig3.axes if ax not in ratio_axes]
    for ax in delta_axes:
        notes = {t.get_text() for t in ax.texts}
        assert notes == {"↑ Δ > 0: faster at EoS", "↓ Δ < 0: slower at EoS"}
        assert ax.get_ylim()[0] < 0 < ax.get_ylim()[1]
        kinds = {plots.tags(line).get("metric") for line in ax.get_lines()}
        assert {"delta", "delta_central"} <= kinds  # every step (thin) and the central curve (bold)
    # The last row: the reference's S / threshold over the window with the ±10 % band.
    groups = {plots.tags(line)["group"] for ax in delta_axes for line in ax.get_lines() if plots.tags(line)}
    assert len(ratio_axes) == len(groups)
    df = eosbranch.compare(study)
    # exit never reaches its t** (invalid window): its panels are greyed and titled so; mild is valid.
    assert not df[df.branch == "exit"].valid.any() and df[df.branch == "mild"].valid.all()
    for ax in delta_axes:
        branch = {plots.tags(line)["branch"] for line in ax.get_lines() if plots.tags(line)}.pop()
        grey = to_hex(ax.get_facecolor()) != "#ffffff"
        assert grey == (branch == "exit") and ("invalid window" in ax.get_title()) == (branch == "exit")
    assert "exit: invalid window (grey), t** not reached" in fig3.get_suptitle()


def test_opposing_trace_replays_the_recorded_full_loss(study):
    seed = load_study_run(study)
    trace, note = opposing_trace(study, seed)
    pair = yaml.safe_load((study.path / "opposing_groups.yaml").read_text())[0]
    assert trace["size"] == len(pair["indices_rise"]) == 5 and trace["window"] == 6
    f = trace["frame"]
    full = f[f.series == "full"].set_index("step").loss
    recorded = study.metric("loss")
    for step in full.index:
        assert full[step] == pytest.approx(recorded[step], rel=1e-5)
    assert set(f.series) == {"rise", "fall", "full", "random"} and "alternation" in note


def test_cli_report_prints_the_summary_path_last(study, reported, tmp_path):
    summary, res, _ = reported
    assert res.stdout.strip().splitlines()[-1] == str(summary)
    assert "figure 1: " in res.stderr  # progress goes to stderr, the result to stdout
    res = CliRunner().invoke(app, ["report", str(tmp_path / "missing")])
    assert res.exit_code == 2 and "not a run directory" in res.output


def tiny(seed_dir, **measure):
    spec = copy.deepcopy(TINY)
    spec["measure"].update(measure)
    path = seed_dir / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_a_run_without_branches_gets_a_reduced_report(tmp_path):
    run = eosbranch.train(tiny(tmp_path), tmp_path / "runs")  # no sharpness, no groups, no branches
    out = tmp_path / "out"
    (out).mkdir()
    (out / FIGURES[3][0]).write_bytes(b"stale")  # a figure from an earlier report must not survive
    summary = eosbranch.report(run, out=out)
    text = summary.read_text()
    assert "No branches to compare: fork the run first" in text
    assert png_size(out / FIGURES[2][0])[0] >= 600
    for k in (1, 3, 4, 5, 6):
        assert not (out / FIGURES[k][0]).exists()
        assert f"{k}. skipped: " in text
    assert "no sharpness was measured" in text and "has no opposing pair" in text


def test_several_seeds_give_the_median_and_interquartile_band(tmp_path, monkeypatch):
    spec = copy.deepcopy(TINY)
    spec.update({"groups": "prototypes", "steps": 25,  # group losses only: no curvature, fast
                 "measure": {"every": 5, "sharpness": False, "alignment": False, "curvature_fraction": False},
                 "checkpoint": {"every": 10}, "optimizer": {"kind": "gd", "lr": 0.3}})
    spec["data"]["n_per_class"] = 60
    spec["model"].update({"width": 32, "depth": 2, "activation": "tanh", "init_scale": 0.3})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    runs = [eosbranch.train(path, tmp_path / "runs", seed=s) for s in (0, 1)]
    for r in runs:
        eosbranch.fork(r, at=("step", 10), branches=BRANCHES, steps=15)
    drawn, save = {}, figure_style.save
    monkeypatch.setattr(figure_style, "save", lambda fig, path: drawn.setdefault(path.name, fig) and save(fig, path))
    summary = eosbranch.report(runs)
    assert summary == runs[0].path / "report" / "summary.md"
    text = summary.read_text()
    assert "| branch | group | seed 0 | seed 1 |" in text
    seeds = [load_study_run(r) for r in runs]
    bands = effect_bands(seeds)
    for g in ("inlier", "input_outlier", "all"):
        per_seed = []
        for s in seeds:
            c = eosbranch.compare(runs[seeds.index(s)])
            row = c[(c.branch == "exit") & (c.group == g)].iloc[0]
            assert f"{row.delta_at_end:+.3e}" in text
            lb = s.curve("exit", "loss", g)
            lr = s.curve("eos", "loss", g)
            span = min(float(x.t_end.iloc[0] - x.t_fork.iloc[0]) for x in (q.comparison for q in seeds))
            per_seed.append(branch_effect(lb.index, lb.values, lr.index, lr.values, row.t_fork, row.t_fork + span, 3000))
        b = bands[(bands.branch == "exit") & (bands.group == g)]
        lo, hi = np.minimum(*per_seed), np.maximum(*per_seed)
        assert b.n_seeds.iloc[0] == 2 and b.x.iloc[0] == 0.0
        np.testing.assert_allclose(b["median"], (per_seed[0] + per_seed[1]) / 2, atol=1e-15)
        np.testing.assert_allclose(b.q25, lo + 0.25 * (hi - lo), atol=1e-15)
        np.testing.assert_allclose(b.q75, lo + 0.75 * (hi - lo), atol=1e-15)
        assert np.ptp(per_seed[0] - per_seed[1]) > 0  # the seeds differ: the band has width
    w, h = png_size(summary.parent / FIGURES[3][0])
    assert w >= 600 and h >= 300
    # figure 3 draws each group's band in the group's colour, says what the band is, stays readable
    fig3 = drawn[FIGURES[3][0]]
    colors = plots.group_colors(bands.group)
    fills = [c for ax in fig3.axes for c in ax.collections if c.get_paths()]  # one panel per group
    assert sorted(to_hex(c.get_facecolor()[0]) for c in fills) == sorted(colors[g].lower() for g in set(bands.group))
    assert any("inter-quartile range" in t.get_text() for t in fig3.legends[0].get_texts())
    assert "median of 2 seeds" in fig3.get_suptitle()
    assert readability_problems(fig3) == []
    # A sweep directory names the same seeds (sweep.json as `eosbranch sweep` writes it): same report.
    (tmp_path / "runs" / "sweep.json").write_text(json.dumps({"runs": [
        {"seed": r.spec.seed, "run": r.name, "branches": [], "status": "done", "stage": None, "error": None}
        for r in runs]}))
    res = CliRunner().invoke(app, ["report", str(tmp_path / "runs")])
    assert res.exit_code == 0, res.output
    swept = tmp_path / "runs" / "report" / "summary.md"
    assert res.stdout.strip().splitlines()[-1] == str(swept)
    assert swept.read_text().split("## Integrity")[0].split("## Branch effect")[1] == \
        text.split("## Integrity")[0].split("## Branch effect")[1]


@pytest.mark.parametrize("plant", ["report", "summary.md", "fig2_group_losses.png"])
def test_report_refuses_planted_symlinks_and_writes_nothing_outside(tmp_path, plant):
    """Issue 17: RUN/report, summary.md or a figure planted as a symlink to elsewhere: one line,
    exit 2, nothing written at the link's target."""
    from typer.testing import CliRunner
    from eosbranch.cli import app

    run = eosbranch.train(tiny(tmp_path), tmp_path / "runs")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim").write_text("keep")
    report_dir = run.path / "report"
    if plant == "report":
        report_dir.symlink_to(outside)
    else:
        report_dir.mkdir()
        (report_dir / plant).symlink_to(outside / "victim")
    res = CliRunner().invoke(app, ["report", str(run.path)])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    (error,) = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert "symlink" in error and plant in error
    assert sorted(p.name for p in outside.iterdir()) == ["victim"] and (outside / "victim").read_text() == "keep"
    assert not list(report_dir.parent.rglob("*.tmp"))
