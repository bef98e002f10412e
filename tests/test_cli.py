"""The real CLI end to end on tiny specs (typer's CliRunner)."""

from pathlib import Path

import pandas as pd
import pytest

from typer.testing import CliRunner

import eosbranch
from conftest import write_spec
from eosbranch.cli import app

runner = CliRunner()


def test_train_prints_run_dir_last_and_load_reads_it(tmp_path, tiny_spec):
    spec = write_spec(tmp_path / "s.yaml", tiny_spec)
    res = runner.invoke(app, ["train", str(spec), "--out", str(tmp_path / "runs"), "--steps", "12", "--seed", "3"])
    assert res.exit_code == 0, res.output
    run_dir = Path(res.stdout.strip().splitlines()[-1])
    assert run_dir.parent == tmp_path / "runs"
    run = eosbranch.load(run_dir)
    assert run.spec.steps == 12 and run.spec.seed == 3
    assert run.metric("loss").index.max() == 12


def test_resume_extends_a_run(tmp_path, tiny_spec):
    spec = write_spec(tmp_path / "s.yaml", tiny_spec)
    res = runner.invoke(app, ["train", str(spec), "--out", str(tmp_path / "runs"), "--steps", "10"])
    run_dir = res.stdout.strip().splitlines()[-1]
    res = runner.invoke(app, ["train", "--resume", run_dir, "--steps", "20"])
    assert res.exit_code == 0, res.output
    assert eosbranch.load(run_dir).metric("loss").index.max() == 20


def test_usage_errors_are_one_line_exit_2(tmp_path):
    res = runner.invoke(app, ["train"])
    assert res.exit_code == 2 and "give a SPEC.yaml" in res.output
    res = runner.invoke(app, ["train", "--resume", str(tmp_path)])
    assert res.exit_code == 2 and "not a run directory" in res.output and "Traceback" not in res.output


def test_demo_runs_the_embedded_default(tmp_path):
    res = runner.invoke(app, ["demo", "--out", str(tmp_path), "--steps", "20"])
    assert res.exit_code == 0, res.output
    run = eosbranch.load(res.stdout.strip().splitlines()[-1])
    assert run.spec.name == "quick" and run.spec.data["classes"] == [3, 5]
    assert run.complete and "nothing to fork" in res.output  # 20 steps stop before t*


def test_short_end_to_end_train_fork_compare_report(tmp_path, tiny_spec):
    """The default suite's end-to-end run (the whole demo is in the slow suite): every command of
    the workflow, through the real CLI, on a tiny spec."""
    tiny_spec.update(steps=20, groups="classes", measure={"every": 5, "sharpness": True})
    spec = write_spec(tmp_path / "s.yaml", tiny_spec)
    res = runner.invoke(app, ["train", str(spec), "--out", str(tmp_path / "runs")])
    assert res.exit_code == 0, res.output
    run_dir = res.stdout.strip().splitlines()[-1]
    res = runner.invoke(app, ["fork", "--run", run_dir, "--at", "step", "10", "--branches", "exit_eos", "--steps", "10"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["compare", run_dir])
    assert res.exit_code == 0, res.output
    cmp = pd.read_parquet(Path(run_dir) / "comparison.parquet")
    assert {"class_0", "class_1"} <= set(cmp.group)
    res = runner.invoke(app, ["report", run_dir])
    assert res.exit_code == 0, res.output
    assert list(Path(run_dir).rglob("summary.md"))
    res = runner.invoke(app, ["runs", "--out", str(tmp_path / "runs")])
    assert res.exit_code == 0 and "exit_eos" in res.stdout


@pytest.mark.slow
def test_full_demo_trains_forks_and_compares(tmp_path):
    res = runner.invoke(app, ["demo", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    run = eosbranch.load(res.stdout.strip().splitlines()[-1])
    names = sorted(p.name.split("--")[1].split("-at")[0] for p in tmp_path.glob(f"{run.name}--*"))
    assert names == ["eos", "exit_half"]
    cmp = pd.read_parquet(run.path / "comparison.parquet")
    assert set(cmp.group) == {"all", "inlier", "boundary", "input_outlier", "output_outlier"}


def test_runs_lists_runs(tmp_path, tiny_spec):
    eosbranch.train(tiny_spec, tmp_path)
    res = runner.invoke(app, ["runs", "--out", str(tmp_path)])
    assert res.exit_code == 0 and "tiny-s0-" in res.stdout and "30/30" in res.stdout


def test_cli_reference_and_completion_are_current():
    """cli/ is generated from the typer app (`make cli-docs`): it must match the app as it is."""
    from eosbranch.cli import reference

    root = Path(__file__).resolve().parents[1] / "cli"
    files = reference()
    assert {"README.md", "completion/eosbranch.bash", "completion/eosbranch.zsh", "completion/eosbranch.fish"} <= set(files)
    for name, text in files.items():
        assert (root / name).is_file() and (root / name).read_text() == text, f"cli/{name} is stale: run `make cli-docs`"
    assert "## `eosbranch fork`" in files["README.md"] and "--until" in files["README.md"]
    assert "_EOSBRANCH_COMPLETE" in files["completion/eosbranch.bash"]


# ------------------------------------------------------------------------------- README is true
README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(lang: str, text: str) -> list[str]:
    import re

    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def test_readme_commands_exist_with_the_options_they_use():
    """Every `.venv/bin/eosbranch ...` line of the README names a command of the app and only
    options that command has; every examples/ or groups/ file it names exists."""
    import shlex

    import typer

    root = README.parent
    cli = typer.main.get_command(app)
    lines = [ln.split("#")[0].strip() for b in _blocks("bash", README.read_text()) for ln in b.splitlines()]
    lines = [ln for ln in lines if ln.startswith(".venv/bin/eosbranch ")]
    assert len(lines) >= 10, lines
    for ln in lines:
        words = shlex.split(ln)[1:]
        cmd = cli.commands.get(words[0])
        assert cmd is not None, f"README: no command {words[0]!r} in: {ln}"
        rest = words[1:]
        if hasattr(cmd, "commands"):  # a group (`groups show`)
            cmd = cmd.commands[rest[0]]
            rest = rest[1:]
        names = {o for p in cmd.params for o in p.opts}
        for w in rest:
            if w.startswith("--"):
                assert w.split("=")[0] in names, f"README: {words[0]} has no option {w} (has {sorted(names)})"
            elif w.startswith(("examples/", "groups/")):
                assert (root / w).exists(), f"README names {w}, which does not exist"


@pytest.fixture
def restored_registries():
    """Registries as they were: the README's snippets register kinds that other tests must not see."""
    from eosbranch.data import DATASETS
    from eosbranch.groups import GROUP_KINDS
    from eosbranch.interventions import INTERVENTIONS
    from eosbranch.probes import PROBES

    saved = [(r, dict(r)) for r in (DATASETS, GROUP_KINDS, INTERVENTIONS, PROBES)]
    yield
    for registry, before in saved:
        registry.clear()
        registry.update(before)


def test_readme_extension_snippets_register_and_work(restored_registries):
    """The README's "Extending" code runs as printed, and its group kind does what it says."""
    import numpy as np
    import torch

    from eosbranch.data import DATASETS, load_data
    from eosbranch.groups import GROUP_KINDS, resolve
    from eosbranch.interventions import INTERVENTIONS

    section = README.read_text().split("## Extending", 1)[1]
    blocks = _blocks("python", section)
    assert len(blocks) == 4
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
    from eosbranch.probes import PROBES

    assert {"mine" in DATASETS, "halve_inputs" in INTERVENTIONS, "farthest" in GROUP_KINDS,
            "top_loss_share" in PROBES} == {True}
    assert "groups: [prototypes, {kind: farthest, size: 12}]" in section
    data = load_data({"kind": "digits", "classes": [3, 5]})
    res = resolve(["prototypes", {"kind": "farthest", "size": 12}], data)
    assert set(res.groups) == {"inlier", "boundary", "input_outlier", "output_outlier", "far"}
    X = res.X[res.train].flatten(1).double().numpy()
    d = np.linalg.norm(X - X.mean(0), axis=1)
    expect = np.sort(res.train.numpy()[np.argsort(-d)[:12]])
    assert torch.equal(res.groups["far"], torch.as_tensor(expect))
    # the coherent input-outliers are moved 3 v_diff away from the data: the farthest points
    assert set(expect) & set(res.groups["input_outlier"].tolist())
    # the probe, named in a spec as the README says, against its definition on the run's own data
    assert "extra_probes: [{kind: top_loss_share, fraction: 0.05}]" in section
    import tempfile

    import eosbranch
    from eosbranch.train import build

    spec = {"name": "probe", "data": {"kind": "digits", "classes": [3, 5], "n_per_class": 40}, "device": "cpu",
            "model": {"kind": "mlp", "width": 8, "depth": 1}, "loss": "mse", "optimizer": {"kind": "gd", "lr": 0.05},
            "steps": 10, "measure": {"every": 10, "sharpness": False,
                                     "extra_probes": [{"kind": "top_loss_share", "fraction": 0.05}]}}
    with tempfile.TemporaryDirectory() as tmp:
        run = eosbranch.train(spec, out=tmp)
        got = run.metrics.query("metric == 'top_loss_share'").set_index("step").value
        exp = build(run.spec)  # the model at step 0: its initialisation depends on the seed only
    with torch.no_grad():
        per = exp.loss_fn(exp.model(exp.train_X), exp.train_y, reduction="none").double().numpy()
    top = np.sort(per)[::-1][:max(1, int(0.05 * per.size))]
    assert sorted(got.index) == [0, 10]
    assert got[0] == pytest.approx(top.sum() / per.sum(), rel=1e-5)


def test_readme_says_where_each_module_lives():
    """"Where each concept lives" names existing files, and every module of the package."""
    import re

    root = README.parent
    table = README.read_text().split("## Where each concept lives", 1)[1].split("\n## ", 1)[0]
    named = set(re.findall(r"`(eosbranch/(?:\w+/)?\w+\.py)`", table))
    assert named and all((root / n).is_file() for n in named), sorted(n for n in named if not (root / n).is_file())
    modules = {p.relative_to(root).as_posix() for p in (root / "eosbranch").rglob("*.py")
               if not p.name.startswith("__")}
    assert modules <= named, f"README's 'Where each concept lives' lacks a row for {sorted(modules - named)}"


def test_readme_intervention_changes_a_new_experiment_only(restored_registries):
    """The README's intervention, built from a branch spec's entry as a fork builds it: the group's
    inputs are halved in the experiment it returns, everything else and the original untouched."""
    import torch

    from eosbranch.experiment import build
    from eosbranch.interventions import INTERVENTIONS
    from eosbranch.spec import parse_spec

    section = README.read_text().split("## Extending", 1)[1]
    exec(compile(_blocks("python", section)[1], "README.md", "exec"), {})
    spec = parse_spec({"name": "iv", "data": {"kind": "digits", "classes": [3, 5], "n_per_class": 40},
                       "device": "cpu", "model": {"kind": "mlp", "width": 8, "depth": 1}, "loss": "mse",
                       "optimizer": {"kind": "gd", "lr": 0.05}, "steps": 2, "groups": ["prototypes"]})
    exp = build(spec)
    before = exp.data.X.clone()
    entry, params = INTERVENTIONS.parse({"kind": "halve_inputs", "group": "inlier"}, "interventions[0]")
    new = entry.fn(params).configure(exp)
    rows = exp.groups["inlier"]
    assert torch.equal(exp.data.X, before)  # the original experiment is not changed
    assert torch.equal(new.data.X[rows], before[rows] * 0.5)
    others = torch.ones(len(before), dtype=torch.bool)
    others[rows] = False
    assert torch.equal(new.data.X[others], before[others])
    assert torch.equal(new.train_X[rows], exp.train_X[rows] * 0.5)  # no stale cached view
