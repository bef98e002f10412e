"""Data loaders against independent oracles: sklearn's arrays, raw CIFAR bytes, numpy's chebval,
and the closed-form construction of the opposing-signal data."""

from __future__ import annotations

import math
import os
import pickle
import shlex

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from eosbranch.data import DATASETS, Dataset, load_data
from eosbranch.errors import EosbranchError, SpecError

try:  # tests/ is on sys.path under pytest's default (rootdir-less) import mode
    from cifar_fixture import write_tiny_cifar
except ImportError:  # pragma: no cover - if tests/ becomes a package
    from tests.cifar_fixture import write_tiny_cifar


def test_all_kinds_registered():
    assert set(DATASETS) == {"digits", "prototypes", "cifar10", "chebyshev", "linear_opposing", "tensors", "modular"}


# ----------------------------------------------------------------------------------- digits

@pytest.fixture(scope="module")
def sk():
    return load_digits()


def test_digits_shapes_range_and_label_order(sk):
    ds = load_data({"kind": "digits", "classes": [5, 3]})
    mask = np.isin(sk.target, [3, 5])
    assert ds.X.shape == (mask.sum(), 64) and ds.X.dtype == torch.float64
    assert ds.input_shape == (64,) and ds.task == "classification" and ds.num_outputs == 2
    assert ds.X.min() >= 0 and ds.X.max() == 1.0  # /16: the brightest pixel (16) maps to exactly 1
    np.testing.assert_array_equal(ds.X.numpy(), sk.data[mask] / 16)
    # Label k is classes[k]: here 5 -> 0 and 3 -> 1.
    np.testing.assert_array_equal(ds.y.numpy(), np.where(sk.target[mask] == 5, 0, 1))
    assert ds.y.dtype == torch.int64 and ds.classes == (5, 3) and ds.X_test is None


def test_digits_first_n_per_class_in_file_order(sk):
    ds = load_data({"kind": "digits", "classes": [3, 5, 8], "n_per_class": 7})
    idx = np.sort(np.concatenate([np.flatnonzero(sk.target == c)[:7] for c in (3, 5, 8)]))
    np.testing.assert_array_equal(ds.X.numpy(), sk.data[idx] / 16)
    np.testing.assert_array_equal(ds.y.numpy(), [(3, 5, 8).index(t) for t in sk.target[idx]])
    assert ds.num_outputs == 3


def test_digits_test_fraction_is_stratified_disjoint_and_seeded(sk):
    spec = {"kind": "digits", "n_per_class": 40, "test_fraction": 0.25, "seed": 1}
    a, b = load_data(spec), load_data(spec)
    c = load_data({**spec, "seed": 2})
    assert torch.equal(a.X_test, b.X_test) and not torch.equal(a.X_test, c.X_test)
    assert torch.bincount(a.y_test).tolist() == [10, 10] and torch.bincount(a.y).tolist() == [30, 30]
    tr, te = a.info["indices"].numpy(), a.info["test_indices"].numpy()
    pool = np.sort(np.concatenate([np.flatnonzero(sk.target == k)[:40] for k in (3, 5)]))
    assert not set(tr) & set(te) and np.array_equal(np.sort(np.concatenate([tr, te])), pool)
    assert np.all(np.diff(tr) > 0)  # training part stays in file order
    np.testing.assert_array_equal(a.X_test.numpy(), sk.data[te] / 16)


@pytest.mark.parametrize("classes", [[3, 12], [-1, 3]])
def test_digits_class_not_in_data_set_is_spec_error(classes):
    with pytest.raises(SpecError) as e:
        load_data({"kind": "digits", "classes": classes}, source="run.yaml")
    msg = str(e.value)
    assert msg.startswith("run.yaml: data.classes") and "0..9" in msg and "\n" not in msg


@pytest.mark.parametrize("classes", [[3, 3], [3]])
def test_digits_classes_distinct_and_at_least_two(classes):
    with pytest.raises(SpecError, match="data.classes"):
        load_data({"kind": "digits", "classes": classes})


def test_digits_unknown_field_is_named():
    with pytest.raises(SpecError, match=r"data\.n_per_klass: unknown field"):
        load_data({"kind": "digits", "n_per_klass": 5})


def test_digits_n_per_class_larger_than_available(sk):
    have = int((sk.target == 3).sum())
    with pytest.raises(SpecError, match=rf"data\.n_per_class: .*class 3, but only {have} exist"):
        load_data({"kind": "digits", "n_per_class": 500}, source="")


def test_unknown_kind_suggests_nearest():
    with pytest.raises(SpecError, match="did you mean 'digits'"):
        load_data("digit")


# ----------------------------------------------------------------------------------- cifar10

def _raw_batches(folder, names):
    # Read the files the way CIFAR-10's own page does (encoding="bytes", b"..." keys): an oracle
    # independent of torchvision's latin1 path.
    data, labels = [], []
    for name in names:
        with open(folder / name, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        data.append(d[b"data"])
        labels += d[b"labels"]
    return np.concatenate(data), np.asarray(labels)


@pytest.fixture(scope="module")
def tiny_cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    folder = write_tiny_cifar(root, n_per_batch=40)
    return root, folder


def test_cifar10_first_n_per_class_and_normalisation(tiny_cifar):
    root, folder = tiny_cifar
    ds = load_data({"kind": "cifar10", "root": str(root), "classes": [5, 3], "n": 16,
                    "n_test": 4, "verify": False})
    data, labels = _raw_batches(folder, [f"data_batch_{i}" for i in range(1, 6)])
    idx = np.sort(np.concatenate([np.flatnonzero(labels == c)[:8] for c in (5, 3)]))
    assert idx.max() >= 40  # the picks span several batch files, so file order is really tested
    assert ds.X.shape == (16, 3, 32, 32) and ds.X.dtype == torch.float64
    assert ds.input_shape == (3, 32, 32) and ds.classes == (5, 3)
    np.testing.assert_array_equal(ds.info["indices"].numpy(), idx)
    np.testing.assert_array_equal(ds.y.numpy(), np.where(labels[idx] == 5, 0, 1))
    # One pixel by hand: image 2, green channel, row 5, column 7 (CIFAR rows are R|G|B planes).
    raw = int(data[idx[2], 1 * 1024 + 5 * 32 + 7])
    assert ds.X[2, 1, 5, 7].item() == pytest.approx((raw / 255 - 0.4822) / 0.1994, abs=1e-12)
    mean = np.array([0.4914, 0.4822, 0.4465]).reshape(1, 3, 1, 1)
    std = np.array([0.2023, 0.1994, 0.2010]).reshape(1, 3, 1, 1)
    expect = (data[idx].reshape(-1, 3, 32, 32) / 255 - mean) / std
    np.testing.assert_allclose(ds.X.numpy(), expect, rtol=0, atol=1e-12)
    tdata, tlabels = _raw_batches(folder, ["test_batch"])
    tidx = np.sort(np.concatenate([np.flatnonzero(tlabels == c)[:2] for c in (5, 3)]))
    np.testing.assert_allclose(ds.X_test.numpy(), (tdata[tidx].reshape(-1, 3, 32, 32) / 255 - mean) / std,
                               atol=1e-12)
    assert ds.info["label_names"] == ("dog", "cat")


def test_cifar10_default_keeps_torchvision_md5_check(tiny_cifar):
    root, _ = tiny_cifar
    with pytest.raises(EosbranchError) as e:
        load_data({"kind": "cifar10", "root": str(root), "n": 4})
    msg = str(e.value)
    assert "md5" in msg and "verify: false" in msg and "\n" not in msg


def test_cifar10_missing_root_is_one_line_error(tmp_path):
    missing = tmp_path / "no_such_dir"
    with pytest.raises(EosbranchError) as e:
        load_data({"kind": "cifar10", "root": str(missing)}, source="spec.yaml")
    msg = str(e.value)
    assert str(missing) in msg and "download: true" in msg and "\n" not in msg
    assert msg.startswith("spec.yaml: ")


def test_cifar10_missing_file_is_named(tmp_path):
    folder = write_tiny_cifar(tmp_path, n_per_batch=4)
    (folder / "test_batch").unlink()
    with pytest.raises(EosbranchError, match="test_batch"):
        load_data({"kind": "cifar10", "root": str(tmp_path), "verify": False})


def test_cifar10_too_few_images_and_bad_pair(tiny_cifar):
    root, _ = tiny_cifar
    with pytest.raises(SpecError, match=r"data\.n: asks for 500 training images"):
        load_data({"kind": "cifar10", "root": str(root), "n": 1000, "verify": False})
    with pytest.raises(SpecError, match=r"data\.classes: .*exactly 2"):
        load_data({"kind": "cifar10", "root": str(root), "classes": [1, 2, 3]})
    with pytest.raises(SpecError, match=r"data\.n: .*even"):
        load_data({"kind": "cifar10", "root": str(root), "n": 5})


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_cifar10_unverified_refuses_crafted_pickle(tmp_path):
    folder = write_tiny_cifar(tmp_path, n_per_batch=4)
    marker = tmp_path / "pwned"
    with open(folder / "data_batch_3", "wb") as f:
        pickle.dump({"data": _Payload(marker), "labels": []}, f, protocol=2)
    with pytest.raises(EosbranchError, match="data_batch_3: not a CIFAR-10 batch file"):
        load_data({"kind": "cifar10", "root": str(tmp_path), "verify": False})
    assert not marker.exists()


# --------------------------------------------------------------------------------- chebyshev

@pytest.mark.parametrize("degree", [0, 1, 2, 5, 8])
def test_chebyshev_matches_numpy(degree):
    ds = load_data({"kind": "chebyshev", "n": 33, "degree": degree})
    x = np.linspace(-1, 1, 33)
    assert ds.X.shape == (33, 1) and ds.y.shape == (33, 1) and ds.task == "regression"
    np.testing.assert_allclose(ds.X[:, 0].numpy(), x, atol=1e-15)
    coef = np.zeros(degree + 1)
    coef[-1] = 1
    np.testing.assert_allclose(ds.y[:, 0].numpy(), np.polynomial.chebyshev.chebval(x, coef), atol=1e-12)


# --------------------------------------------------------------------------- linear_opposing

def test_linear_opposing_construction():
    n, d1, d2, alpha, p = 3000, 6, 20, 50.0, 0.1
    ds = load_data({"kind": "linear_opposing", "n": n, "d1": d1, "d2": d2, "alpha": alpha, "p": p,
                    "beta_norm": 3.0, "seed": 4})
    assert ds.X.shape == (n, d1 + d2) and ds.y.shape == (n, 1) and ds.input_shape == (d1 + d2,)
    mask = ds.info["mask"].numpy()
    assert ds.info["d1"] == d1 and ds.info["d2"] == d2
    assert mask.sum() == round(p * n)
    x, x_o = ds.X[:, :d1].numpy(), ds.X[:, d1:].numpy()
    np.testing.assert_allclose(np.abs(x_o[mask]), math.sqrt(alpha / p), rtol=1e-15)
    assert np.all(x_o[~mask] == 0)
    assert 0.4 < (x_o[mask] > 0).mean() < 0.6  # independent signs
    # Exact share p of magnitude^2 alpha/p: the second moment is alpha on every coordinate.
    np.testing.assert_allclose((x_o ** 2).mean(axis=0), alpha, rtol=1e-12)
    beta = ds.info["beta"].numpy()
    assert np.linalg.norm(beta) == pytest.approx(3.0)
    np.testing.assert_allclose(ds.y[:, 0].numpy(), x @ beta + np.abs(x_o).sum(1) / math.sqrt(d2), rtol=1e-12)
    assert abs(x.mean()) < 0.05 and abs(x.var() - 1) < 0.05  # x ~ N(0, I)


def test_linear_opposing_seeded_and_defaults():
    a = load_data({"kind": "linear_opposing", "n": 200, "seed": 1})
    b = load_data({"kind": "linear_opposing", "n": 200, "seed": 1})
    c = load_data({"kind": "linear_opposing", "n": 200, "seed": 2})
    assert torch.equal(a.X, b.X) and torch.equal(a.y, b.y) and not torch.equal(a.X, c.X)
    assert a.X.shape == (200, 150)  # defaults d1 = 50, d2 = 100
    assert load_data("linear_opposing").X.shape == (4000, 150)


@pytest.mark.parametrize("bad", [{"p": 0}, {"p": 1.5}, {"alpha": -1}, {"d2": 0}, {"n": 5, "p": 0.01}])
def test_linear_opposing_validation(bad):
    with pytest.raises(SpecError, match=r"^data"):
        load_data({"kind": "linear_opposing", **bad})


# -------------------------------------------------------------------------------- prototypes

def test_prototypes_seeded_balanced_and_separated():
    spec = {"kind": "prototypes", "dim": 20, "n_per_class": 2000, "separation": 4.0, "noise": 1.0, "seed": 3}
    a, b = load_data(spec), load_data(spec)
    c = load_data({**spec, "seed": 4})
    assert torch.equal(a.X, b.X) and not torch.equal(a.X, c.X)
    assert a.X.shape == (4000, 20) and torch.bincount(a.y).tolist() == [2000, 2000]
    gap = (a.X[a.y == 1].mean(0) - a.X[a.y == 0].mean(0)).norm().item()
    assert gap == pytest.approx(4.0, rel=0.05)
    # A few points cross the mid-plane, most are clear of it.
    margin = ((a.X - a.X.mean(0)) @ a.info["direction"]) * (2 * a.y - 1)
    assert 0.005 < (margin < 0).double().mean().item() < 0.05
    with_test = load_data({**spec, "n_test_per_class": 10})
    assert torch.equal(with_test.X, a.X)  # asking for a test set leaves the training set alone
    assert torch.bincount(with_test.y_test).tolist() == [10, 10]


# ----------------------------------------------------------------------------------- tensors

def test_tensors_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((30, 4)), rng.choice([2, 7], 30)
    Xt, yt = rng.standard_normal((6, 4)), np.array([2, 7, 7, 2, 2, 7])
    np.savez(tmp_path / "d.npz", X=X, y=y, X_test=Xt, y_test=yt)
    ds = load_data({"kind": "tensors", "path": str(tmp_path / "d.npz")})
    assert ds.task == "classification" and ds.classes == (2, 7) and ds.num_outputs == 2
    np.testing.assert_array_equal(ds.X.numpy(), X)
    np.testing.assert_array_equal(ds.y.numpy(), (y == 7).astype(int))
    np.testing.assert_array_equal(ds.y_test.numpy(), (yt == 7).astype(int))


def test_tensors_pt_round_trip_regression(tmp_path):
    X, y = torch.randn(12, 3, dtype=torch.float32), torch.randn(12)
    torch.save({"X": X, "y": y}, tmp_path / "d.pt")
    ds = load_data({"kind": "tensors", "path": str(tmp_path / "d.pt")})
    assert ds.task == "regression" and ds.y.shape == (12, 1) and ds.X.dtype == torch.float64
    assert torch.equal(ds.X, X.double()) and torch.equal(ds.y[:, 0], y.double())
    assert ds.X_test is None and ds.classes is None


def test_tensors_missing_key_and_file(tmp_path):
    np.savez(tmp_path / "d.npz", X=np.zeros((3, 2)))
    with pytest.raises(EosbranchError, match=r"d\.npz: missing key 'y'"):
        load_data({"kind": "tensors", "path": str(tmp_path / "d.npz")})
    with pytest.raises(EosbranchError, match="file not found: .*nope.pt"):
        load_data({"kind": "tensors", "path": str(tmp_path / "nope.pt")})
    with pytest.raises(SpecError, match=r"data\.path: .*\.npz, \.pt"):
        load_data({"kind": "tensors", "path": "data.csv"})


def test_tensors_refuses_crafted_pt_pickle(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"X": _Payload(marker), "y": torch.zeros(2)}, evil)
    with pytest.raises(EosbranchError, match="refused to load") as e:
        load_data({"kind": "tensors", "path": str(evil)})
    assert "\n" not in str(e.value)
    assert not marker.exists()
    # The payload is live: an unsafe load would have run it. So the check above is meaningful.
    torch.load(evil, weights_only=False)
    assert marker.exists()


def test_tensors_refuses_npz_object_arrays(tmp_path):
    np.savez(tmp_path / "o.npz", X=np.array([{"a": 1}], dtype=object), y=np.zeros(1))
    with pytest.raises(EosbranchError, match="o.npz: refused"):
        load_data({"kind": "tensors", "path": str(tmp_path / "o.npz")})


def test_dataset_checks_a_loaders_dtypes():
    with pytest.raises(ValueError, match="int64"):
        Dataset(torch.zeros(2, 1, dtype=torch.float64), torch.zeros(2), None, None,
                "classification", 2, (1,), None, {})


# ---------------------------------------------------------------------------------- modular

@pytest.mark.parametrize("op,fn", [("add", lambda a, b, p: (a + b) % p), ("sub", lambda a, b, p: (a - b) % p),
                                   ("mul", lambda a, b, p: (a * b) % p)])
def test_modular_labels_sizes_and_split_are_the_closed_form(op, fn):
    p = 7
    ds = load_data({"kind": "modular", "p": p, "op": op, "train_fraction": 0.4, "seed": 3})
    k = round(0.4 * p * p)
    assert ds.X.shape == (k, 2) and ds.X_test.shape == (p * p - k, 2) and ds.X.dtype == torch.float64
    assert ds.num_outputs == p and ds.task == "classification" and ds.input_shape == (2,)
    for X, y in ((ds.X, ds.y), (ds.X_test, ds.y_test)):
        a, b = X[:, 0].long(), X[:, 1].long()
        assert torch.equal(X, X.round()) and int(X.min()) >= 0 and int(X.max()) < p
        assert torch.equal(y, torch.tensor([fn(int(i), int(j), p) for i, j in zip(a, b)]))
    # train and test partition all p² pairs, each in row order (a·p + b increasing)
    rows = torch.cat([ds.info["indices"], ds.info["test_indices"]])
    assert sorted(rows.tolist()) == list(range(p * p))
    assert torch.equal(ds.info["indices"], ds.X[:, 0].long() * p + ds.X[:, 1].long())
    assert torch.all(ds.info["indices"].diff() > 0)
    # the split is the seeded permutation's first k rows
    assert ds.info["indices"].tolist() == sorted(np.random.default_rng(3).permutation(p * p)[:k].tolist())


def test_modular_split_is_deterministic_and_seeded():
    spec = {"kind": "modular", "p": 11, "train_fraction": 0.5}
    a, b = load_data(spec), load_data(spec)
    assert torch.equal(a.X, b.X) and torch.equal(a.y, b.y)
    c = load_data({**spec, "seed": 1})
    assert not torch.equal(a.info["indices"], c.info["indices"])
    full = load_data({**spec, "train_fraction": 1.0})
    assert full.X.shape == (121, 2) and full.X_test is None


def test_modular_onehot_encodes_the_same_pairs():
    tok = load_data({"kind": "modular", "p": 5, "train_fraction": 0.6})
    hot = load_data({"kind": "modular", "p": 5, "train_fraction": 0.6, "encoding": "onehot"})
    assert hot.X.shape == (15, 10) and torch.equal(hot.y, tok.y)
    assert torch.equal(hot.X[:, :5].argmax(1), tok.X[:, 0].long())
    assert torch.equal(hot.X[:, 5:].argmax(1), tok.X[:, 1].long()) and torch.equal(hot.X.sum(1), torch.full((15,), 2.0, dtype=torch.float64))


@pytest.mark.parametrize("bad,field", [({"p": 1}, "data.p"), ({"op": "div"}, "data.op"),
                                       ({"train_fraction": 0.0}, "data.train_fraction"),
                                       ({"p": 2, "train_fraction": 0.1}, "rounds to no training pair")])
def test_modular_bad_params_are_one_line(bad, field):
    with pytest.raises(SpecError, match=field) as err:
        load_data({"kind": "modular", **bad})
    assert "\n" not in str(err.value)
