"""The CUDA path (issue 16): a bit-exact null fork, HVPs against a dense float64 Hessian on the CPU,
two identical runs equal bit for bit. Marked ``gpu`` (deselected by default; ``pytest -m gpu``,
or benchmarks/gpu.py) and skipped where CUDA is absent.

EOSBRANCH_GPU_TEST_DEVICE=cpu runs the same checks on the CPU (a dry run of the tests' logic on a
machine without a GPU)."""

from __future__ import annotations

import copy
import os

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts

import pytest
import torch

import eosbranch
from eosbranch.curvature import hessian_matvec, top_eigenpairs
from eosbranch.spec import parse_spec
from eosbranch.train import build
from tests.oracles import dense_hessian

DEVICE = os.environ.get("EOSBRANCH_GPU_TEST_DEVICE", "cuda")

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device"),
]

MODELS = {
    "mlp": {"kind": "mlp", "width": 16, "depth": 2},
    "vit": {"kind": "vit", "patch": 4, "d_model": 8, "depth": 1, "heads": 2, "mlp_ratio": 2},
}


def spec(model: str = "mlp", **kw) -> dict:
    s = {
        "name": f"gpu-{model}", "seed": 0, "device": DEVICE, "dtype": "float32",
        "data": {"kind": "digits", "classes": [3, 5], "n_per_class": 40},
        "groups": "classes", "model": copy.deepcopy(MODELS[model]), "loss": "mse",
        "optimizer": {"kind": "gd", "lr": 0.05}, "steps": 30,
        "measure": {"every": 4, "sharpness": True, "examples": "all"}, "checkpoint": {"every": 7},
    }
    s.update(kw)
    return s


@pytest.mark.parametrize("model", ["mlp", "vit"])
def test_null_fork_on_cuda_is_bit_identical(tmp_path, model):
    parent = eosbranch.train(spec(model), tmp_path)
    (branch,) = eosbranch.fork(parent, at=("step", 17), branches="null")
    a, b = parent.checkpoint()["model"], branch.checkpoint()["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cols = ["step", "group", "metric", "value"]
    pm = parent.metrics[parent.metrics.step >= 17][cols].reset_index(drop=True)
    bm = branch.metrics[cols].reset_index(drop=True)
    assert pm.equals(bm)
    cert = branch.events.query("event == 'certificate_null'")
    assert cert.value.tolist() == [0.0]


@pytest.mark.parametrize("model", ["mlp", "vit"])
def test_hvp_on_cuda_matches_a_dense_float64_hessian_on_the_cpu(model):
    s = spec(model, groups=None, data={"kind": "digits", "classes": [3, 5], "n_per_class": 20})
    s["model"] = {"kind": "mlp", "width": 8, "depth": 1} if model == "mlp" else s["model"]
    dev = build(parse_spec(s))  # float32 on the device
    cpu = build(parse_spec({**s, "device": "cpu", "dtype": "float64"}))  # same initial weights
    cpu.model.load_state_dict(dev.model.state_dict())
    cpu.data.X = dev.data.X.detach().cpu().double()  # the device's float32 inputs, exactly
    H = dense_hessian(cpu.model, cpu.loss_fn, cpu.train_X, cpu.train_y)  # float64, on the CPU
    op = hessian_matvec(dev.model, dev.loss_fn, (dev.train_X, dev.train_y))
    assert op.dim == H.shape[0]
    V = torch.randn(op.dim, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = op(V.to(device=dev.device, dtype=torch.float32)).double().cpu()
    want = H @ V
    assert ((got - want).norm(dim=0) / want.norm(dim=0)).max() < 1e-4
    lam = torch.linalg.eigvalsh(H)[-1].item()
    res = top_eigenpairs(op, op.dim, k=1, tol=1e-4)
    assert abs(float(res.values[0]) - lam) / abs(lam) < 1e-4


@pytest.mark.parametrize("model", ["mlp", "vit"])
def test_two_identical_cuda_runs_are_bit_identical(tmp_path, model):
    a = eosbranch.train(spec(model), tmp_path / "a")
    b = eosbranch.train(spec(model), tmp_path / "b")
    ca, cb = a.checkpoint(), b.checkpoint()
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    assert torch.equal(ca["eig_vectors"], cb["eig_vectors"])
    cols = ["step", "group", "metric", "value"]
    assert a.metrics[cols].equals(b.metrics[cols])
    assert not a.metric("sharpness").isna().any()
