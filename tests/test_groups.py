"""Group kinds against answers known by hand: a 2-D data set whose prototype taxonomy can be read
off a sketch, closed-form displacements, and numpy recomputations of the geometry."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from eosbranch import catalog
from eosbranch.data import load_data
from eosbranch.errors import SpecError
from eosbranch.groups import GROUP_KINDS, PROTOTYPE_ROLES, describe, load_group_spec, resolve

# ------------------------------------------------------------------------- the hand-made 2-D set
#
# Class 0 sits on the line x = -2 at heights 0, 0.5, -1, 2, -3, plus one point b0 = (-0.1, 1.5)
# near x = 0; class 1 is the mirror image (x -> -x). The class centroids are (∓1.683, 0), so:
#   * boundary: b0 / b1. Under `knn` (k = 2, on L2-normalised inputs, i.e. by angle) b0's two
#     nearest neighbours are b1 and (-2, 2): a 50/50 mix, every other point has a pure
#     neighbourhood. Under `centroid` b0 is the class-0 point nearest to class 1's centroid.
#   * inlier pool by distance to the own centroid (same |dx| for all, |dy| = 0, .5, 1, 2, 3):
#     inlier (-2, 0), output-outlier source (-2, .5), input-outlier source (-2, -1).
#   * base set left: (-2, 2), (-2, -3) and mirrors -> mu0 = (-2, -.5), mu1 = (2, -.5),
#     v_diff = (4, 0).
CLASS0 = [(-2.0, 0.0), (-2.0, 0.5), (-2.0, -1.0), (-2.0, 2.0), (-2.0, -3.0), (-0.1, 1.5)]
ORDER = [3, 10, 0, 7, 5, 1, 11, 8, 2, 4, 9, 6]  # rows shuffled so positions cannot be assumed


def hand_data():
    pts = CLASS0 + [(-x, y) for x, y in CLASS0]
    labels = [0] * 6 + [1] * 6
    X = torch.tensor([pts[i] for i in ORDER], dtype=torch.float64)
    y = torch.tensor([labels[i] for i in ORDER])
    return X, y


def rows(r, name):
    return {tuple(p) for p in r.X[r.groups[name]].tolist()}


def proto(**kw):
    return {"kind": "prototypes", "per_class": 1, "alpha": 0.5, "knn_k": 2, **kw}


@pytest.mark.parametrize("rule", ["knn", "centroid"])
def test_prototype_taxonomy_by_hand(rule):
    X, y = hand_data()
    r = resolve(proto(boundary_rule=rule), X, y)
    assert list(r.groups) == list(PROTOTYPE_ROLES)
    assert rows(r, "inlier") == {(-2, 0), (2, 0)}
    assert rows(r, "boundary") == {(-0.1, 1.5), (0.1, 1.5)}
    assert rows(r, "output_outlier") == {(-2, 0.5), (2, 0.5)}
    # coherent: class 0 moves by -alpha * v_diff = (-2, 0), class 1 by +(2, 0)
    assert rows(r, "input_outlier") == {(-4, -1), (4, -1)}
    torch.testing.assert_close(r.info["mu"], torch.tensor([[-2.0, -0.5], [2.0, -0.5]], dtype=torch.float64))
    torch.testing.assert_close(r.info["v_diff"], torch.tensor([4.0, 0.0], dtype=torch.float64))
    # labels: flipped only for the output-outliers
    lab = {tuple(p): int(c) for p, c in zip(r.X.tolist(), r.y)}
    assert lab[(-2, 0.5)] == 1 and lab[(2, 0.5)] == 0
    assert lab[(-2, 0)] == 0 and lab[(-0.1, 1.5)] == 0 and lab[(-4, -1)] == 0 and lab[(4, -1)] == 1
    # the base set comes first, the four groups are appended; everything trains
    assert len(r.X) == 12 and {tuple(p) for p in r.X[:4].tolist()} == {(-2, 2), (-2, -3), (2, 2), (2, -3)}
    assert torch.equal(r.train, torch.arange(12))
    # origin: each row comes from the input row of the same source point
    src = X[r.info["origin"]]
    keep = r.y == y[r.info["origin"]]  # all but the label-flipped rows
    assert keep.sum() == 10
    assert torch.equal(src[r.groups["inlier"]], r.X[r.groups["inlier"]])
    # centroid distance of the flipped (-2, .5), now class 1: to mu1 = (2, -.5)
    i = next(k for k, p in enumerate(r.X.tolist()) if p == [-2.0, 0.5])
    assert r.info["centroid_distance"][i].item() == pytest.approx(np.hypot(4, 1))
    mu = r.info["mu"].numpy()
    np.testing.assert_allclose(r.info["centroid_distance"].numpy(), np.linalg.norm(r.X.numpy() - mu[r.y.numpy()], axis=1))


def test_boundary_rules_differ_where_they_should():
    # q = (1, 0) is a class-0 point inside class 1's angular cluster: nearest to class 1's
    # centroid (so `centroid` picks it), but its neighbours are all class 1 (so `knn` does not).
    X, y = hand_data()
    X, y = torch.cat([X, torch.tensor([[1.0, 0.0]], dtype=torch.float64)]), torch.cat([y, torch.tensor([0])])
    knn = resolve(proto(boundary_rule="knn"), X, y)
    cen = resolve(proto(boundary_rule="centroid"), X, y)
    assert rows(knn, "boundary") == {(-0.1, 1.5), (0.1, 1.5)}
    assert rows(cen, "boundary") == {(1.0, 0.0), (0.1, 1.5)}
    for r, left0 in ((knn, [(-2, 2), (-2, -3), (1, 0)]), (cen, [(-2, 2), (-2, -3), (-0.1, 1.5)])):
        assert rows(r, "inlier") == {(-2, 0), (2, 0)}  # the same slices either way
        v = np.array([2.0, -0.5]) - np.mean(left0, axis=0)  # mu1 - mu0 of the base set, by hand
        np.testing.assert_allclose(r.info["v_diff"].numpy(), v)
        moved = {tuple(np.round(p, 12)) for p in [np.array([-2, -1]) - 0.5 * v, np.array([2, -1]) + 0.5 * v]}
        assert {tuple(np.round(p, 12)) for p in r.X[r.groups["input_outlier"]].numpy()} == moved


def test_random_orthogonal_by_hand():
    # In 2-D the only unit vectors orthogonal to v_diff = (4, 0) are (0, ±1): the input-outliers
    # move by (0, ±alpha * 4) = (0, ±2) from their sources (-2, -1) and (2, -1).
    X, y = hand_data()
    r = resolve(proto(direction="random_orthogonal"), X, y)
    pts = sorted(r.X[r.groups["input_outlier"]].tolist())
    assert pts[0][0] == -2 and pts[1][0] == 2 and {abs(p[1] + 1) for p in pts} == {2.0}


@pytest.fixture(scope="module")
def synth():
    ds = load_data({"kind": "prototypes", "dim": 16, "n_per_class": 60, "seed": 0})
    return ds.X, ds.y


def _base_vdiff(r, X0, y0):
    """v_diff from the input points that were not used as sources, recomputed with numpy."""
    used = np.concatenate([r.info["origin"][r.groups[g]].numpy() for g in PROTOTYPE_ROLES])
    base = np.setdiff1d(np.arange(len(X0)), used)
    Xb, yb = X0.numpy()[base], y0.numpy()[base]
    return Xb[yb == 1].mean(0) - Xb[yb == 0].mean(0)


def test_random_orthogonal_control(synth):
    X, y = synth
    alpha = 3.0
    spec = {"kind": "prototypes", "per_class": 5, "alpha": alpha, "seed": 7}
    coh = resolve({**spec, "direction": "coherent"}, X, y)
    rnd = resolve({**spec, "direction": "random_orthogonal"}, X, y)
    v = _base_vdiff(rnd, X, y)
    np.testing.assert_allclose(rnd.info["v_diff"].numpy(), v, atol=1e-12)
    for r in (coh, rnd):
        g = r.groups["input_outlier"]
        disp = (r.X[g] - X[r.info["origin"][g]]).numpy()
        np.testing.assert_allclose(np.linalg.norm(disp, axis=1), alpha * np.linalg.norm(v), rtol=1e-9)
    g = rnd.groups["input_outlier"]
    disp = (rnd.X[g] - X[rnd.info["origin"][g]]).numpy()
    assert np.abs(disp @ v / np.linalg.norm(v)).max() < 1e-6  # orthogonal to v_diff
    assert np.linalg.matrix_rank(disp) == len(disp)  # one direction per point, not one shared
    # same sources and everything else identical to the coherent construction
    for name in ("inlier", "boundary", "output_outlier"):
        assert torch.equal(rnd.X[rnd.groups[name]], coh.X[coh.groups[name]])
    # seeded: same seed, same points; another seed, other directions
    again = resolve({**spec, "direction": "random_orthogonal"}, X, y)
    other = resolve({**spec, "direction": "random_orthogonal", "seed": 8}, X, y)
    assert torch.equal(again.X, rnd.X) and not torch.equal(other.X, rnd.X)


def test_heldout_groups_are_not_trained(synth):
    X, y = synth
    r = resolve({"kind": "prototypes", "per_class": 4, "mode": "heldout"}, X, y)
    assert len(r.X) == len(X) and len(r.train) == len(X) - 32
    held = torch.cat(list(r.groups.values()))
    assert not set(held.tolist()) & set(r.train.tolist())
    assert sorted(held.tolist() + r.train.tolist()) == list(range(len(X)))


def test_nonflat_inputs_are_reshaped_back(synth):
    X, y = synth
    spec = {"kind": "prototypes", "per_class": 4, "direction": "random_orthogonal"}
    flat = resolve(spec, X, y)
    img = resolve(spec, X.reshape(len(X), 1, 4, 4).float(), y)
    assert img.X.shape == (len(X), 1, 4, 4) and img.X.dtype == torch.float32
    torch.testing.assert_close(img.X.flatten(1), flat.X.float())
    assert all(torch.equal(img.groups[k], flat.groups[k]) for k in flat.groups)


def test_earlier_groups_keep_their_points(synth):
    X, y = synth
    r = resolve([{"kind": "indices", "name": "first", "indices": [0, 1, 2, 60]}, {"kind": "prototypes", "per_class": 4}], X, y)
    assert r.info["origin"][r.groups["first"]].tolist() == [0, 1, 2, 60]
    assert torch.equal(r.X[r.groups["first"]], X[[0, 1, 2, 60]])
    for name in PROTOTYPE_ROLES:  # sources never come from an earlier group
        assert not set(r.info["origin"][r.groups[name]].tolist()) & {0, 1, 2, 60}


def test_class_indices_random_opposing(synth):
    X, y = synth
    spec = [
        {"kind": "class", "label": 1},
        {"kind": "indices", "name": "few", "indices": [5, 3, 3]},
        {"kind": "random", "name": "r", "size_like": "few", "exclude": ["class_1"], "seed": 1},
        {"kind": "opposing", "indices_rise": [7], "indices_fall": [8, 9]},
    ]
    r = resolve(spec, X, y)
    assert r.groups["class_1"].tolist() == torch.nonzero(y == 1).flatten().tolist()
    assert r.groups["few"].tolist() == [3, 5]
    assert len(r.groups["r"]) == 2 and (y[r.groups["r"]] == 0).all()
    assert torch.equal(resolve(spec, X, y).groups["r"], r.groups["r"])
    assert not torch.equal(resolve([*spec[:2], {**spec[2], "seed": 2}], X, y).groups["r"], r.groups["r"])
    assert r.groups["opposing_rise"].tolist() == [7] and r.groups["opposing_fall"].tolist() == [8, 9]
    assert torch.equal(r.X, X) and torch.equal(r.train, torch.arange(len(X)))


# ---------------------------------------------------------------------------------------- errors

@pytest.fixture(scope="module")
def digits():
    ds = load_data({"kind": "digits", "classes": [3, 5]})
    return ds.X, ds.y


@pytest.mark.parametrize("spec, needles", [
    ({"kind": "prototype"}, ["groups.kind", "did you mean 'prototypes'"]),
    ({"kind": "prototypes", "per_clas": 3}, ["groups.per_clas", "did you mean 'per_class'"]),
    ({"kind": "prototypes", "alpha": -1}, ["groups.alpha", "greater than or equal to 0"]),
    ({"kind": "prototypes", "direction": "sideways"}, ["groups.direction"]),
    ({"kind": "prototypes", "per_class": 50}, ["groups.per_class", "class 0", "only 182"]),
    ({"kind": "prototypes", "knn_k": 1000}, ["groups.knn_k", "364"]),
    ([{"kind": "class", "label": 0, "name": "a"}, {"kind": "class", "label": 1, "name": "a"}],
     ["groups[1].name", "duplicate group name 'a'"]),
    ([{"kind": "indices", "name": "inlier", "indices": [0]}, {"kind": "prototypes", "per_class": 2}],
     ["groups[1].names.inlier", "duplicate group name 'inlier'"]),
    (["classes", {"kind": "prototypes", "per_class": 2}], ["groups[1].per_class", "list prototypes first"]),
    ({"kind": "class", "label": 4}, ["groups.label", "no point has label 4"]),
    ({"kind": "indices", "name": "i", "indices": [0, 365]}, ["groups.indices", "365", "out of range"]),
    ({"kind": "random", "size": 3, "size_like": "x"}, ["size_like"]),
    ({"kind": "random", "size_like": "nope"}, ["groups.size_like", "'nope'"]),
    ({"kind": "random", "size": 3, "exclude": ["nope"]}, ["groups.exclude", "'nope'"]),
    ({"kind": "random", "size": 366}, ["groups.size", "365"]),
    ({"kind": "opposing", "indices_rise": [1, 2], "indices_fall": [2]}, ["groups.indices_fall", "index 2"]),
    ({"kind": "opposing", "indices_rise": [1]}, ["groups.indices_fall", "missing"]),
    ("no_such_entry", ["no groups entry named 'no_such_entry'", "prototypes"]),
])
def test_errors_are_one_line_and_name_the_field(digits, spec, needles):
    X, y = digits
    with pytest.raises(SpecError) as e:
        resolve(spec, X, y)
    msg = str(e.value)
    assert "\n" not in msg and all(n in msg for n in needles), msg


def test_two_class_kind_on_three_classes():
    ds = load_data({"kind": "digits", "classes": [3, 5, 8], "n_per_class": 40})
    with pytest.raises(SpecError, match=r"groups\.kind: prototypes needs two-class data .*3 classes"):
        resolve({"kind": "prototypes", "per_class": 2}, ds.X, ds.y)
    r = resolve({"kind": "class", "label": 2}, ds.X, ds.y)  # kinds that do not need two classes work
    assert len(r.groups["class_2"]) == 40 and r.info["mu"].shape == (3, 64) and "v_diff" not in r.info


def test_catalog_error_names_the_file(digits, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- kind: class\n  lable: 0\n")
    with pytest.raises(SpecError, match=r"bad.yaml: groups\[0\]\.lable: unknown field"):
        resolve(str(bad), *digits)


# ------------------------------------------------------------------------------ spec forms, catalog

def test_load_group_spec_forms_fill_defaults():
    one = load_group_spec({"kind": "random", "size": 4})
    assert one == [{"kind": "random", "name": "random", "size": 4, "size_like": None, "exclude": [], "seed": 0}]
    assert load_group_spec([{"kind": "random", "size": 4}]) == one
    assert load_group_spec(None) == []
    proto = load_group_spec("prototypes")
    assert proto[0]["alpha"] == 3.0 and proto[0]["names"]["boundary"] == "boundary"
    both = load_group_spec(["classes", {"kind": "random", "size": 4}])
    assert [d["kind"] for d in both] == ["class", "class", "random"]
    assert load_group_spec(one) == one  # idempotent: a stored resolved spec reloads unchanged


N3, N5 = (int((load_digits().target == c).sum()) for c in (3, 5))  # 183, 182
PROTO = {"inlier": (6, 6), "boundary": (6, 6), "input_outlier": (6, 6), "output_outlier": (6, 6)}
CATALOG = {  # entry -> {group: (class_0 count, class_1 count)}; None = any split of the size
    "prototypes": PROTO,
    "prototypes_random": PROTO,
    "classes": {"class_0": (N3, 0), "class_1": (0, N5)},
    "random_control": {"random_control": 12},
    "opposing": {"opposing_rise": 5, "opposing_fall": 5},
}


def test_every_catalog_entry_is_tested():
    assert set(catalog.names("groups")) == set(CATALOG)


@pytest.mark.parametrize("name", sorted(CATALOG))
def test_catalog_entry_resolves_on_digits(digits, name):
    X, y = digits
    r = resolve(name, X, y)
    want = CATALOG[name]
    assert list(r.groups) == list(want)
    for g, w in want.items():
        counts = (int((r.y[r.groups[g]] == 0).sum()), int((r.y[r.groups[g]] == 1).sum()))
        assert (sum(counts) == w) if isinstance(w, int) else (counts == w), (g, counts)
    assert len(r.X) == len(X) and len(r.train) == len(X)
    assert all(set(d["kind"] for d in load_group_spec(name)) <= set(GROUP_KINDS) for _ in [0])


# -------------------------------------------------------------------------------------- describe

def test_describe_against_direct_computation(digits):
    X, y = digits
    alpha = 3.0
    r = resolve(["prototypes_random", {"kind": "random", "size": 10, "exclude": list(PROTOTYPE_ROLES)}], X, y)
    df = describe(r)
    assert list(df.columns) == ["group", "size", "class_0", "class_1", "median_centroid_distance", "distance_ratio"]
    assert list(df.group) == [*PROTOTYPE_ROLES, "random"]
    Xn, yn = r.X.numpy(), r.y.numpy()
    in_groups = np.concatenate([r.groups[g].numpy() for g in PROTOTYPE_ROLES])
    base = np.setdiff1d(np.arange(len(Xn)), in_groups)
    mu = np.stack([Xn[base][yn[base] == c].mean(0) for c in (0, 1)])
    dist = np.linalg.norm(Xn - mu[yn], axis=1)
    for _, row in df.iterrows():
        idx = r.groups[row.group].numpy()
        assert row["size"] == len(idx)
        assert (row.class_0, row.class_1) == ((yn[idx] == 0).sum(), (yn[idx] == 1).sum())
        assert row.median_centroid_distance == pytest.approx(np.median(dist[idx]), rel=1e-12)
    # distance_ratio: the random-orthogonal points vs the coherent construction of the same sources
    g = r.groups["input_outlier"].numpy()
    src = X.numpy()[r.info["origin"].numpy()[g]]
    sign = np.where(yn[g] == 1, 1.0, -1.0)[:, None]
    coherent = src + sign * alpha * (mu[1] - mu[0])
    ratio = np.linalg.norm(Xn[g] - mu[yn[g]], axis=1) / np.linalg.norm(coherent - mu[yn[g]], axis=1)
    got = df.set_index("group").distance_ratio
    assert got["input_outlier"] == pytest.approx(np.median(ratio), rel=1e-12)
    assert got.drop("input_outlier").isna().all()


def test_groups_show_reads_a_run_spec_or_a_group_file_on_a_spec_data():
    from typer.testing import CliRunner

    from eosbranch.cli import app

    runner = CliRunner()
    wide = {"COLUMNS": "200"}  # the whole table on one line per group
    quick = str(catalog.example_path("quick"))
    own = runner.invoke(app, ["groups", "show", quick], env=wide)
    assert own.exit_code == 0, own.output
    assert all(g in own.output for g in PROTOTYPE_ROLES)
    # A catalog group file has no data: shown on the demo's data by default, or on --data's.
    via_file = runner.invoke(app, ["groups", "show", str(catalog.entry_path("groups", "prototypes_random"))], env=wide)
    assert via_file.exit_code == 0, via_file.output
    assert "on the data of quick.yaml" in via_file.output
    row = next(line for line in via_file.output.splitlines() if "input_outlier" in line)
    assert [c.strip() for c in row.strip("│ ").split("│")][1:4] == ["12", "6", "6"]
    assert row.rstrip(" │").split("│")[-1].strip() != "-"  # its distance ratio to the coherent construction
    classes = runner.invoke(app, ["groups", "show", str(catalog.entry_path("groups", "classes")), "--data", quick], env=wide)
    assert classes.exit_code == 0 and "class_1" in classes.output, classes.output
    both = runner.invoke(app, ["groups", "show", quick, "--data", quick])
    assert both.exit_code != 0 and "--data is for a group file" in both.output


def test_token_groups_select_pairs_by_operand_and_mix_with_other_kinds():
    from eosbranch.data import load_data

    ds = load_data({"kind": "modular", "p": 7, "train_fraction": 0.5})
    res = resolve([{"kind": "token", "position": 0, "value": 3}, {"kind": "token", "position": 1, "value": 0, "name": "b0"},
                   {"kind": "class", "label": 2}, {"kind": "random", "size_like": "b0", "seed": 1}], ds)
    assert torch.equal(res.groups["token0_3"], torch.nonzero(ds.X[:, 0] == 3).flatten())
    assert torch.equal(res.groups["b0"], torch.nonzero(ds.X[:, 1] == 0).flatten())
    assert torch.equal(res.groups["class_2"], torch.nonzero(ds.y == 2).flatten())
    assert len(res.groups["random"]) == len(res.groups["b0"])
    with pytest.raises(SpecError, match="position"):
        resolve({"kind": "token", "position": 2, "value": 0}, ds)
    with pytest.raises(SpecError, match="no point has token 9"):
        resolve({"kind": "token", "position": 0, "value": 9}, ds)
