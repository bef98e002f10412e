"""Property-based tests over invalid spec, group and branch YAML (issue 8).

Hypothesis builds invalid files (wrong types, unknown and misspelt fields, out-of-range values,
wrong nesting, documents that are not mappings, unparseable YAML), the real CLI reads them, and
every one must end with exit code 2, exactly one ``error:`` line on stderr naming the field (or the
file, when the YAML cannot be read), no traceback, and no run directory left behind. Examples are
derandomized (the same cases on every machine) and capped, so the suite stays fast.
"""

from __future__ import annotations

import copy
import string
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import eosbranch
from conftest import TINY
from eosbranch.cli import app
from eosbranch.data import DATASETS
from eosbranch.errors import SpecError
from eosbranch.fork import load_branches
from eosbranch.groups import GROUP_KINDS
from eosbranch.interventions import INTERVENTIONS
from eosbranch.loss import LOSSES
from eosbranch.models import MODELS
from eosbranch.optimizer import OPTIMIZERS

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# ------------------------------------------------------------------------------------- the oracle

def check_cli_rejects(args_for, text, fragment: str | None, *, binary: bool = False):
    """Write ``text`` to a file, run the CLI, assert the one-line refusal; returns the error line.
    ``args_for(path, out)`` gives the command line; ``fragment``: what the line must name (None:
    the file itself)."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        f, out = tmp / "bad.yaml", tmp / "runs"
        f.write_bytes(text if binary else text.encode())
        res = CliRunner().invoke(app, [str(a) for a in args_for(f, out)])
        assert res.exit_code == 2, (res.exit_code, res.output, repr(res.exception), text)
        assert "Traceback" not in res.output
        assert res.stdout == "", res.stdout
        err_lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert len(err_lines) == 1 and err_lines[0].startswith("error: "), (res.stderr, text)
        line = err_lines[0]
        assert (fragment or str(f)) in line, (fragment or str(f), line, text)
        assert not out.exists() or list(out.iterdir()) == [], list(out.iterdir())  # no partial run
        return line


def train_args(f, out):
    return ["train", f, "--out", out]


def show_args(f, out):
    return ["groups", "show", f]


def dump(doc) -> str:
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)


# ----------------------------------------------------------------------------- value strategies

WORDS = st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=12)
LETTERS = st.text(string.ascii_letters, min_size=1, max_size=10).filter(
    lambda s: s.lower() not in {"inf", "infinity", "nan", "e", "true", "false", "yes", "no", "on", "off", "null"})
CONTAINERS = st.one_of(st.lists(st.integers(-5, 5), min_size=1, max_size=3),
                       st.dictionaries(WORDS, st.integers(), min_size=1, max_size=2))
FRACTIONAL = st.floats(-1e6, 1e6, allow_nan=False).filter(lambda x: x != int(x))
NOT_A_NUMBER = st.one_of(LETTERS, CONTAINERS)
NOT_AN_INT = st.one_of(NOT_A_NUMBER, FRACTIONAL)


def unknown(allowed) -> st.SearchStrategy:
    return WORDS.filter(lambda s: s not in set(allowed))


def below(limit, *, strict=False):
    """Ints below ``limit`` (``<= limit`` when not strict... as an out-of-range value)."""
    return st.integers(-10**6, limit - (1 if strict else 0))


POSITIVE_INT_BAD = st.one_of(st.integers(-10**6, 0), NOT_AN_INT)
NONNEG_INT_BAD = st.one_of(st.integers(-10**6, -1), NOT_AN_INT)
POSITIVE_FLOAT_BAD = st.one_of(st.floats(-1e6, 0), st.sampled_from([float("inf"), float("nan")]), NOT_A_NUMBER)
SEED_BAD = st.one_of(st.integers(-10**9, -1), st.integers(2**32, 2**70), NOT_AN_INT)
BAD_NAME = st.one_of(
    st.text(min_size=1, max_size=20).filter(lambda s: not (s[:1].isascii() and s[:1].isalnum())),
    st.text(string.ascii_letters + "/\\ :*?", min_size=2, max_size=20).filter(
        lambda s: s[:1].isalnum() and any(c in s for c in "/\\ :*?")),
    st.text(string.ascii_letters, min_size=65, max_size=80),
    st.integers(), CONTAINERS,
)
DIGIT = st.integers(0, 9)
BAD_CLASSES = st.one_of(
    st.tuples(DIGIT, st.integers(-10**6, 10**6).filter(lambda c: not 0 <= c <= 9)).map(list),
    DIGIT.map(lambda c: [c, c]),
    DIGIT.map(lambda c: [c]),
    NOT_A_NUMBER.filter(lambda v: not isinstance(v, list)),
)
BAD_WINDOW = st.one_of(
    st.tuples(st.integers(0, 100), st.integers(-100, 0), st.integers(1, 5)).map(lambda t: [t[0], t[0] + t[1], t[2]]),
    st.tuples(st.integers(0, 100), st.integers(1, 100), st.integers(-5, 0)).map(lambda t: [t[0], t[0] + t[1], t[2]]),
    st.tuples(st.integers(-100, -1), st.integers(1, 100), st.integers(1, 5)).map(lambda t: [t[0], t[0] + t[1], t[2]]),
    st.lists(st.integers(0, 9), max_size=2),
).map(lambda w: [w])

# (path in the spec, invalid values, what the error line must name)
FIELDS = [
    (("name",), BAD_NAME, "name"),
    (("seed",), SEED_BAD, "seed"),
    (("steps",), NONNEG_INT_BAD, "steps"),
    (("device",), unknown(["auto", "cpu", "cuda"]), "device"),
    (("dtype",), unknown(["float32", "float64"]), "dtype"),
    (("loss",), unknown(LOSSES), "loss"),
    (("optimizer", "lr"), POSITIVE_FLOAT_BAD, "optimizer.lr"),
    (("optimizer", "kind"), unknown(OPTIMIZERS), "optimizer.kind"),
    (("optimizer", "batch_size"), POSITIVE_INT_BAD, "optimizer.batch_size"),
    (("model", "kind"), unknown(MODELS), "model.kind"),
    (("model", "width"), POSITIVE_INT_BAD, "model.width"),
    (("model", "depth"), NONNEG_INT_BAD, "model.depth"),
    (("model", "init_scale"), POSITIVE_FLOAT_BAD, "model.init_scale"),
    (("model", "activation"), unknown(["relu", "tanh", "gelu", "elu", "softplus", "linear", "identity",
                                       "leaky_relu", "silu", "sigmoid"]), "model.activation"),
    (("data", "kind"), unknown(DATASETS), "data.kind"),
    (("data", "classes"), BAD_CLASSES, "data.classes"),
    (("data", "n_per_class"), st.one_of(POSITIVE_INT_BAD, st.integers(184, 10**6)), "data.n_per_class"),
    (("data", "test_fraction"), st.one_of(st.floats(-1e3, -1e-9), st.floats(1.0, 1e3), NOT_A_NUMBER),
     "data.test_fraction"),
    (("data", "seed"), SEED_BAD, "data.seed"),
    (("measure", "every"), st.one_of(st.integers(-10**6, 0), NOT_AN_INT), "measure.every"),
    (("measure", "top_k"), st.one_of(st.integers(-10, 0), st.integers(65, 10**6), NOT_AN_INT), "measure.top_k"),
    (("measure", "tol"), st.one_of(st.floats(-1e3, 0), st.floats(1, 1e3), NOT_A_NUMBER), "measure.tol"),
    (("measure", "warmup"), NONNEG_INT_BAD, "measure.warmup"),
    (("measure", "examples"), unknown(["all", "groups", "off"]), "measure.examples"),
    (("measure", "windows"), BAD_WINDOW, "measure.windows"),
    (("checkpoint", "every"), st.one_of(st.integers(-10**6, 0), NOT_AN_INT), "checkpoint.every"),
    (("checkpoint", "at"), st.lists(st.integers(-10**6, -1), min_size=1, max_size=3), "checkpoint.at"),
]

ALLOWED = {  # the fields each location of the (resolved) tiny spec accepts
    (): {"name", "seed", "device", "dtype", "data", "groups", "model", "loss", "optimizer", "steps", "measure",
         "checkpoint"},
    ("measure",): {"every", "windows", "warmup", "sharpness", "top_k", "tol", "max_matvecs", "subset",
                   "chunk_size", "probes", "alignment", "curvature_fraction", "examples", "reference"},
    ("checkpoint",): {"every", "at"},
    ("model",): {"kind", "width", "depth", "activation", "init_scale", "bias"},
    ("optimizer",): {"kind", "lr", "batch_size"},
    ("data",): {"kind", "classes", "n_per_class", "test_fraction", "seed"},
}


def base() -> dict:
    return copy.deepcopy(TINY)


def put(doc, path, value):
    node = doc
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return doc


@st.composite
def wrong_value(draw):
    path, values, fragment = draw(st.sampled_from(FIELDS))
    return dump(put(base(), path, draw(values))), fragment


def near_misses(word: str) -> st.SearchStrategy:
    """One edit away: a deleted, doubled, swapped or replaced character."""
    n = len(word)
    ops = [st.integers(0, n - 1).map(lambda i: word[:i] + word[i + 1:]),
           st.integers(0, n - 1).map(lambda i: word[:i] + word[i] + word[i:]),
           st.tuples(st.integers(0, n - 1), st.sampled_from(string.ascii_lowercase + "_")).map(
               lambda t: word[:t[0]] + t[1] + word[t[0] + 1:])]
    if n > 1:
        ops.append(st.integers(0, n - 2).map(lambda i: word[:i] + word[i + 1] + word[i] + word[i + 2:]))
    return st.one_of(ops)


@st.composite
def unknown_or_misspelt_field(draw):
    where = draw(st.sampled_from(sorted(ALLOWED)))
    doc = base()
    node = doc
    for k in where:
        node = node[k]
    if draw(st.booleans()):  # misspell a field that is there
        key = draw(st.sampled_from(sorted(k for k in node if k != "kind")))
        bad = draw(near_misses(key).filter(lambda s: s and s not in ALLOWED[where]))
        node[bad] = node.pop(key)
    else:  # add an unknown one (any printable text, including non-ASCII)
        bad = draw(st.one_of(
            st.from_regex(r"\A[a-z][a-z0-9_]{0,12}\Z"),
            st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp", "Zs")), min_size=1, max_size=8),
        ).filter(lambda s: s not in ALLOWED[where] and s != "kind" and not s.startswith(("!", "&", "*"))))
        node[bad] = draw(st.one_of(st.integers(), WORDS, st.none()))
    return dump(doc), bad


NESTING = [
    # (mutation, fragment)
    (lambda d: d.update(lr=0.05), "lr"),
    (lambda d: d.update(width=16), "width"),
    (lambda d: d.update(every=10), "every"),
    (lambda d: d.update(classes=[3, 5]), "classes"),
    (lambda d: d.update(kind="mlp"), "kind"),
    (lambda d: d["model"].update(steps=10), "model.steps"),
    (lambda d: d["optimizer"].update(seed=1), "optimizer.seed"),
    (lambda d: d["measure"].update(name="x"), "measure.name"),
    (lambda d: d["checkpoint"].update(dtype="float64"), "checkpoint.dtype"),
    (lambda d: d["model"].update(measure={"every": 5}), "model.measure"),
    (lambda d: d["data"].update(model={"kind": "mlp"}), "data.model"),
    (lambda d: d.update(measure=[1, 2]), "measure"),
    (lambda d: d.update(checkpoint=5), "checkpoint"),
    (lambda d: d.update(model=["mlp"]), "model"),
    (lambda d: d.update(optimizer=0.1), "optimizer"),
    (lambda d: d.update(data={"classes": [3, 5]}), "data"),
    (lambda d: d.update(model={"model": {"kind": "mlp"}}), "model"),
    (lambda d: d.update(spec=d.copy()), "spec"),
]


@st.composite
def wrong_nesting(draw):
    mutate, fragment = draw(st.sampled_from(NESTING))
    doc = base()
    mutate(doc)
    return dump(doc), fragment


NOT_MAPPINGS = st.one_of(st.none(), st.integers(), st.floats(allow_nan=False), st.booleans(), LETTERS,
                         st.lists(st.integers(), max_size=3), st.just([copy.deepcopy(TINY)]))

BREAKERS = ["[", "{", "]", "}", ": : :", "\t- x", "'unterminated", '"unterminated', "key: [1, 2\n", "- a\nb: c",
            "&a [*b]", "*undefined", "!!binary 3", "%YAML 9.9\n---", "? [a\n", "a: b: c", "@", "`"]


@st.composite
def garbage_yaml(draw):
    text = draw(st.text(max_size=15)) + draw(st.sampled_from(BREAKERS)) + draw(st.text(max_size=15))
    try:
        yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    except Exception as err:  # anything else would be a surprise worth seeing
        raise AssertionError(f"safe_load raised {type(err).__name__} on {text!r}")
    from hypothesis import assume

    assume(False)


# ------------------------------------------------------------------------------------- spec tests

@SETTINGS
@given(wrong_value())
def test_wrong_types_and_out_of_range_values(case):
    text, fragment = case
    check_cli_rejects(train_args, text, fragment)


@SETTINGS
@given(unknown_or_misspelt_field())
def test_unknown_and_misspelt_fields(case):
    text, key = case
    line = check_cli_rejects(train_args, text, None)
    assert key in line or repr(key) in line, (key, line)
    assert "unknown field" in line or "'kind'" in line, line


@SETTINGS
@given(wrong_nesting())
def test_wrong_nesting(case):
    text, fragment = case
    check_cli_rejects(train_args, text, fragment)


@SETTINGS
@given(NOT_MAPPINGS)
def test_documents_that_are_not_mappings(doc):
    line = check_cli_rejects(train_args, dump(doc), None)
    assert "expected a mapping" in line, line


@SETTINGS
@given(garbage_yaml())
def test_unparseable_yaml(text):
    line = check_cli_rejects(train_args, text, None)
    assert "not valid YAML" in line, line


@SETTINGS
@given(st.binary(min_size=1, max_size=40).filter(lambda b: not _is_utf8(b)))
def test_binary_garbage(data):
    line = check_cli_rejects(train_args, data, None, binary=True)
    assert "not valid YAML" in line, line


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode()
        return True
    except UnicodeDecodeError:
        return False


@pytest.mark.parametrize("text", ["[" * 3000 + "]" * 3000, "a: " + "{b: " * 3000 + "1" + "}" * 3000, ""])
def test_pathological_documents(text):
    check_cli_rejects(train_args, text, None)


# ------------------------------------------------------------------------------------ group specs

GROUP_CASES = [
    # (strategy of an invalid groups section, the name the line must contain)
    (unknown(GROUP_KINDS).map(lambda k: {"kind": k}), "kind"),
    (POSITIVE_INT_BAD.map(lambda v: {"kind": "prototypes", "per_class": v}), "per_class"),
    (st.integers(50, 10**5).map(lambda v: {"kind": "prototypes", "per_class": v}), "per_class"),
    (st.one_of(st.floats(-1e6, -1e-6), st.just(float("inf")), NOT_A_NUMBER).map(
        lambda v: {"kind": "prototypes", "per_class": 2, "alpha": v}), "alpha"),
    (unknown(["coherent", "random_orthogonal"]).map(lambda v: {"kind": "prototypes", "direction": v}), "direction"),
    (unknown(["knn", "centroid"]).map(lambda v: {"kind": "prototypes", "boundary_rule": v}), "boundary_rule"),
    (st.one_of(st.integers(-100, 0), st.integers(80, 10**5)).map(
        lambda v: {"kind": "prototypes", "per_class": 2, "knn_k": v}), "knn_k"),
    (unknown(["train", "heldout"]).map(lambda v: {"kind": "prototypes", "mode": v}), "mode"),
    (SEED_BAD.map(lambda v: {"kind": "prototypes", "per_class": 2, "seed": v}), "seed"),
    (st.one_of(CONTAINERS, st.integers()).map(lambda v: {"kind": "prototypes", "names": {"inlier": v}}), "inlier"),
    (st.one_of(st.integers(-10**6, -1), st.integers(2, 10**6), NOT_AN_INT).map(
        lambda v: {"kind": "class", "label": v}), "label"),
    (st.just({"kind": "class"}), "label"),
    (st.one_of(st.just([]), st.lists(st.integers(80, 10**6), min_size=1, max_size=3),
               st.lists(st.integers(-10**6, -1), min_size=1, max_size=3), NOT_A_NUMBER.filter(
                   lambda v: not isinstance(v, list))).map(
        lambda v: {"kind": "indices", "name": "g", "indices": v}), "indices"),
    (st.one_of(st.integers(-10, 0), st.integers(81, 10**6)).map(lambda v: {"kind": "random", "size": v}), "size"),
    (WORDS.map(lambda v: {"kind": "random", "size_like": v}), "size_like"),
    (WORDS.map(lambda v: {"kind": "random", "size": 3, "exclude": [v]}), "exclude"),
    (st.just({"kind": "random"}), "size"),
    (st.sampled_from(["indices_rise", "indices_fall"]).map(
        lambda k: {"kind": "opposing", "indices_rise": [1], "indices_fall": [2], k: []}), "indices_"),
    (st.integers(0, 79).map(lambda i: {"kind": "opposing", "indices_rise": [i], "indices_fall": [i]}), "indices_fall"),
    (st.one_of(st.integers(), st.lists(st.integers(), min_size=1, max_size=2)), "groups"),
    (unknown(["classes", "opposing", "prototypes", "prototypes_random", "random_control"]), "groups"),
    (st.just([{"kind": "class", "label": 0}, {"kind": "class", "label": 0}]), "name"),
]


@st.composite
def bad_groups(draw):
    section, fragment = draw(st.sampled_from(GROUP_CASES))
    groups = draw(section)
    if fragment not in ("groups", "name") and draw(st.booleans()):  # also inside a list, after a valid entry
        groups = [{"kind": "class", "label": 1, "name": "ones"}, groups]
    return dump({**base(), "groups": groups}), fragment


@SETTINGS
@given(bad_groups(), st.sampled_from(["show", "train"]))
def test_invalid_group_specs(case, command):
    text, fragment = case
    line = check_cli_rejects(show_args if command == "show" else train_args, text, fragment)
    assert "groups" in line or "catalog" in line, line


def test_group_spec_unknown_field_is_named():
    text = dump({**base(), "groups": {"kind": "prototypes", "per_clas": 2}})
    line = check_cli_rejects(show_args, text, "per_clas")
    assert "did you mean 'per_class'" in line


# ------------------------------------------------------------------------------- branch specs

BRANCH_CASES = [
    (BAD_NAME.map(lambda n: {"name": n}), "name"),
    (st.just({"interventions": []}), "name"),
    (st.from_regex(r"\A[a-z]{1,8}\Z").filter(lambda k: k not in ("name", "interventions")).map(
        lambda k: {"name": "b", k: 1}), None),
    (NOT_A_NUMBER.filter(lambda v: not isinstance(v, list)).map(lambda v: {"name": "b", "interventions": v}),
     "interventions"),
    (unknown(INTERVENTIONS).map(lambda k: {"name": "b", "interventions": [{"kind": k}]}), "kind"),
    (st.just({"name": "b", "interventions": [{"factor": 0.1}]}), "kind"),
    (POSITIVE_FLOAT_BAD.map(lambda v: {"name": "b", "interventions": [{"kind": "lr", "factor": v}]}), "factor"),
    (POSITIVE_FLOAT_BAD.map(lambda v: {"name": "b", "interventions": [{"kind": "lr", "value": v}]}), "value"),
    (st.sampled_from([{}, {"factor": 0.1, "value": 0.1}, {"factor": 0.1, "stable_margin": 0.5}]).map(
        lambda p: {"name": "b", "interventions": [{"kind": "lr", **p}]}), "exactly one"),
    (st.from_regex(r"\A[a-z]{1,8}\Z").filter(lambda k: k not in ("kind", "factor", "value", "stable_margin")).map(
        lambda k: {"name": "b", "interventions": [{"kind": "lr", "factor": 0.1, k: 1}]}), None),
    (st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,10}\Z").map(lambda n: {"branches": [{"name": n}, {"name": n}]}),
     "unique"),
    (st.one_of(st.integers(), st.lists(st.integers(), min_size=1, max_size=2), st.none()), None),
]


def one(**section):
    return {"name": "b", "interventions": [section]}


NONNEG_FLOAT_BAD = st.one_of(st.floats(-1e6, -1e-9), st.sampled_from([float("inf"), float("nan")]), NOT_A_NUMBER)
NOT_A_STRING = st.one_of(st.integers(), st.floats(allow_nan=False), CONTAINERS)
# Every intervention kind of the catalog: wrong values and missing fields are named, nested
# sections (loss_switch.to, optimizer_switch.to) included.
BRANCH_CASES += [
    (NONNEG_FLOAT_BAD.map(lambda v: one(kind="reweight", group="inlier", weight=v)), "interventions[0].weight"),
    (st.just(one(kind="reweight", group="inlier")), "interventions[0].weight"),
    (NOT_A_STRING.map(lambda v: one(kind="reweight", group=v, weight=1.0)), "interventions[0].group"),
    (NONNEG_INT_BAD.map(lambda v: one(kind="label_flip", group="inlier", to=v)), "interventions[0].to"),
    (st.just(one(kind="label_flip")), "interventions[0].group"),
    (st.one_of(st.floats(-1e6, 1.0), st.sampled_from([float("inf"), float("nan")]), NOT_A_NUMBER).map(
        lambda v: one(kind="enter_eos", margin=v)), "interventions[0].margin"),
    (NONNEG_FLOAT_BAD.map(lambda v: one(kind="random_direction", alpha=v)), "interventions[0].alpha"),
    (SEED_BAD.map(lambda v: one(kind="random_direction", seed=v)), "interventions[0].seed"),
    (POSITIVE_INT_BAD.map(lambda v: one(kind="gradient_surgery", refresh_every=v)), "interventions[0].refresh_every"),
    (unknown(LOSSES).map(lambda v: one(kind="loss_switch", to=v)), "interventions[0].to.kind"),
    (st.just(one(kind="loss_switch")), "interventions[0].to"),
    (unknown(OPTIMIZERS).map(lambda v: one(kind="optimizer_switch", to={"kind": v, "lr": 0.1}, state="fresh")),
     "interventions[0].to.kind"),
    (POSITIVE_FLOAT_BAD.map(lambda v: one(kind="optimizer_switch", to={"kind": "adam", "lr": v}, state="fresh")),
     "interventions[0].to.lr"),
    (unknown(["fresh", "carried"]).map(lambda v: one(kind="optimizer_switch", to={"kind": "gd", "lr": 0.1}, state=v)),
     "interventions[0].state"),
    (st.tuples(st.sampled_from(sorted(INTERVENTIONS)), st.from_regex(r"\A[a-z]{1,8}\Z")).filter(
        lambda t: t[1] not in INTERVENTIONS[t[0]].params.model_fields and t[1] != "kind").map(
        lambda t: one(kind=t[0], **{t[1]: 1})), "unknown field"),
]


@st.composite
def bad_branches(draw):
    doc, fragment = draw(st.sampled_from(BRANCH_CASES))
    doc = draw(doc)
    if isinstance(doc, dict) and "branches" not in doc and draw(st.booleans()):
        doc = {"branches": [{"name": "ok"}, doc]}  # also as the second of several
    return dump(doc), fragment


@settings(SETTINGS, max_examples=200)
@given(bad_branches())
def test_invalid_branch_files_load_branches(case):
    text, fragment = case
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "branches.yaml"
        f.write_text(text)
        with pytest.raises(SpecError) as info:
            load_branches(str(f))
    msg = str(info.value)
    assert "\n" not in msg and (fragment or "branches.yaml") in msg, (msg, text)


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    return eosbranch.train(base(), tmp_path_factory.mktemp("parent"))


@settings(SETTINGS, max_examples=50)
@given(bad_branches())
def test_invalid_branch_files_through_the_fork_cli(parent, case):
    text, fragment = case
    siblings = set(parent.path.parent.iterdir())
    check_cli_rejects(lambda f, out: ["fork", "--run", parent.path, "--at", "step", 15, "--branches", f,
                                      "--steps", 3], text, fragment)
    assert set(parent.path.parent.iterdir()) == siblings  # no branch directory created
