"""Spec validation: one line naming the file, the field path and what is allowed; exit code 2."""

import pytest
from typer.testing import CliRunner

from conftest import write_spec
from eosbranch.cli import app
from eosbranch.errors import SpecError
from eosbranch.spec import load_spec, parse_spec

BAD = [
    # (mutation, fragments the message must contain)
    (lambda s: s.update(stepz=10), ["stepz", "unknown field", "did you mean 'steps'"]),
    (lambda s: s["optimizer"].update(lr=-0.1), ["optimizer.lr", "greater than 0"]),
    (lambda s: s["optimizer"].update(lrr=0.1), ["optimizer.lrr", "unknown field", "allowed:"]),
    (lambda s: s["data"].update(classes=[3, 12]), ["data.classes", "12"]),
    (lambda s: s["model"].update(kind="mlpp"), ["model.kind", "unknown model 'mlpp'", "did you mean 'mlp'"]),
    (lambda s: s["model"].update(activation="sigmoid"), ["model.activation", "relu"]),
    (lambda s: s.update(steps="many"), ["steps", "integer"]),
    (lambda s: s.update(device="tpu"), ["device", "'auto', 'cpu' or 'cuda'"]),
    (lambda s: s["measure"].update(evry=3), ["measure.evry", "unknown field", "every"]),
    (lambda s: s.pop("optimizer"), ["optimizer", "required"]),
    (lambda s: s["checkpoint"].update(every=0), ["checkpoint.every", "greater than 0"]),
]


@pytest.mark.parametrize("mutate,fragments", BAD)
def test_bad_spec_message_names_file_and_field(tmp_path, tiny_spec, mutate, fragments):
    mutate(tiny_spec)
    path = write_spec(tmp_path / "bad.yaml", tiny_spec)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(str(path))
    for frag in fragments:
        assert frag in msg, (frag, msg)


@pytest.mark.parametrize("mutate,fragments", BAD[:4])
def test_cli_bad_spec_exit_2_one_line_no_traceback(tmp_path, tiny_spec, mutate, fragments):
    mutate(tiny_spec)
    path = write_spec(tmp_path / "bad.yaml", tiny_spec)
    res = CliRunner().invoke(app, ["train", str(path), "--out", str(tmp_path / "runs")])
    assert res.exit_code == 2
    assert "Traceback" not in res.output
    assert fragments[0] in res.output
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("data: [1, 2\nmodel: x")
    with pytest.raises(SpecError, match="broken.yaml: line .* not valid YAML"):
        load_spec(bad)
    with pytest.raises(SpecError, match="no such file"):
        load_spec(tmp_path / "nope.yaml")


def test_spec_is_fully_resolved(tiny_spec):
    spec = parse_spec(tiny_spec)
    assert spec.model["activation"] == "relu" and spec.model["init_scale"] == 1.0
    assert spec.loss == {"kind": "mse", "half": False}
    assert spec.optimizer["batch_size"] is None
    # Round trip: the resolved spec is itself a valid spec with the same digest.
    import yaml

    again = parse_spec(yaml.safe_load(spec.to_yaml()))
    assert again.digest() == spec.digest()


def test_digest_ignores_steps_only(tiny_spec):
    a = parse_spec(tiny_spec)
    assert parse_spec({**tiny_spec, "steps": 99}).digest() == a.digest()
    assert parse_spec({**tiny_spec, "seed": 1}).digest() != a.digest()


def test_measure_and_checkpoint_schedules(tiny_spec):
    spec = parse_spec({**tiny_spec, "measure": {"every": 10, "windows": [[15, 20, 2]]},
                       "checkpoint": {"every": None, "at": [7, 3]}})
    assert [t for t in range(30) if spec.measure.due(t)] == [0, 10, 15, 17, 19, 20]
    assert [t for t in range(31) if spec.checkpoint.due(t, 30)] == [0, 3, 7, 30]
    with pytest.raises(SpecError, match="measure.windows"):
        parse_spec({**tiny_spec, "measure": {"windows": [[20, 10, 1]]}})


def test_groups_are_resolved_and_stored(tiny_spec):
    # A catalog name is expanded into its entries, defaults filled, so spec.yaml says what ran.
    spec = parse_spec({**tiny_spec, "groups": "prototypes"})
    (entry,) = spec.groups
    assert entry["kind"] == "prototypes" and entry["alpha"] == 3.0 and entry["direction"] == "coherent"
    inline = [{"kind": "class", "name": "threes", "label": 0}]
    assert parse_spec({**tiny_spec, "groups": inline}).groups == inline
    with pytest.raises(SpecError, match="groups.*unknown group kind 'clas'"):
        parse_spec({**tiny_spec, "groups": [{"kind": "clas", "label": 0}]})


def test_unquoted_off_means_off():
    from eosbranch.spec import parse_spec
    from conftest import TINY

    spec = parse_spec({**TINY, "measure": {"every": 10, "examples": False}})  # YAML `examples: off`
    assert spec.measure.examples == "off"
