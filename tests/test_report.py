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
from typer.testing import CliRunner

import eosbranch
from eosbranch import plots
from eosbranch.cli import app
from eosbranch.compare import branch_effect
from eosbranch.report import FIGURES, effect_bands, load_study_run, opposing_trace

from conftest import TINY

BRANCHES = {"branches": [{"name": "eos"}, {"name": "exit", "interventions": [{"kind": "lr", "factor": 0.1}]}]}


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def study(quick_run, tmp_path_factory):
    """A private copy of the session's quick run (other tests fork the original), forked at t* into
    eos and exit (lr x 0.1) for 60 steps, with its opposing pair found by the CLI."""
    runs = tmp_path_factory.mktemp("report_runs")
    run = eosbranch.load(shutil.copytree(quick_run.path, runs / quick_run.name))
    eosbranch.fork(run, at=("onset", 0), branches=BRANCHES, steps=60)
    res = CliRunner().invoke(app, ["opposing", str(run.path), "--step", "onset", "--top", "5", "--window", "6"])
    assert res.exit_code == 0, res.output
    return run


@pytest.fixture(scope="module")
def reported(study):
    """`eosbranch report RUN` through the CLI, keeping every figure object it saves."""
    drawn, save = {}, plots._save

    def keep(fig, path):
        drawn[path.name] = fig
        return save(fig, path)

    plots._save = keep
    try:
        res = CliRunner().invoke(app, ["report", str(study.path)])
    finally:
        plots._save = save
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
    assert set(df.branch) == {"exit"} and len(df) == 5
    t_star = df.t_star.iloc[0]
    step = int(study.events.query("event == 't_star'").step.iloc[0])
    assert f"| {t_star:.6g} (step {step}) | exit vs eos | {step} | not reached | {df.t_end.iloc[0]:.6g} |" in text
    for r in df.itertuples():
        assert r.effect == ("learns faster at EoS" if r.delta_at_end > 0 else "learns slower at EoS")
        assert f"| exit | {r.group} | {r.delta_at_end:+.3e} | {r.delta_mean:+.3e} | {r.effect} |" in text
    events = [eosbranch.load(p).events for p in study.path.parent.glob(f"{study.name}--*")]
    certs = [e[e.event.str.startswith("certificate")] for e in events]
    rows = [r for c in certs for r in c.itertuples()]
    if not rows:
        assert "No certificate events in these runs." in text
    for r in rows:
        detail = str(r.detail).replace("|", "\\|")
        assert f"| {r.run} | {r.branch} | {r.event} | {r.step} | {r.value:.6g} | {detail} |" in text


def test_figure_3_ends_at_the_delta_compare_reports(study):
    seed = load_study_run(study)
    bands = effect_bands([seed])
    df = eosbranch.compare(study)
    for r in df.itertuples():
        b = bands[(bands.branch == "exit") & (bands.group == r.group)]
        assert len(b) == 3000 and b.n_seeds.iloc[0] == 1
        assert b.x.iloc[0] == pytest.approx(r.t_fork) and b.x.iloc[-1] == pytest.approx(r.t_end)
        assert b["median"].iloc[-1] == pytest.approx(r.delta_at_end, abs=1e-15)
        assert b["median"].mean() == pytest.approx(r.delta_mean, abs=1e-15)
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
                gid = line.get_gid() or ""
                if gid.startswith("context:"):  # the parent before the fork, drawn grey behind the branches
                    assert to_hex(line.get_color()) == plots.LIGHT_GREY.lower()
                if gid.startswith("group:"):
                    g = gid.split(":", 1)[1]
                    assert to_hex(line.get_color()) == colors[g].lower(), (name, g)
                    seen.setdefault(g, set()).add(name)
    for g in ("inlier", "boundary", "input_outlier", "output_outlier"):
        assert {FIGURES[k][0] for k in (2, 3, 4)} <= seen[g], g
    assert FIGURES[5][0] in seen["opposing_rise"] and FIGURES[5][0] in seen["opposing_fall"]


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


def test_several_seeds_give_the_median_and_interquartile_band(tmp_path):
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
