"""Model registry: shapes, the Kaiming-normal x init_scale / zero-bias initialisation."""

import pytest
import torch

from eosbranch.errors import SpecError
from eosbranch.models import build_model


@pytest.mark.parametrize("section,shape", [
    ({"kind": "mlp", "width": 8, "depth": 2, "activation": "tanh"}, (64,)),
    ({"kind": "mlp", "width": 8, "depth": 0}, (3, 32, 32)),
    ({"kind": "cnn", "channels": [4, 4]}, (64,)),
    ({"kind": "cnn", "channels": [4]}, (3, 32, 32)),
    ({"kind": "resnet", "widths": [4, 8]}, (3, 32, 32)),
    ({"kind": "resnet", "widths": [4], "batchnorm": True}, (1, 8, 8)),
    ({"kind": "vgg11"}, (3, 32, 32)),
    ({"kind": "vgg11", "batchnorm": True}, (3, 32, 32)),
])
def test_models_map_inputs_to_outputs(section, shape):
    torch.manual_seed(0)
    model = build_model(section, shape, 3)
    assert model(torch.randn(2, *shape)).shape == (2, 3)


def test_mlp_init_is_scaled_kaiming_with_zero_bias():
    torch.manual_seed(0)
    a = build_model({"kind": "mlp", "width": 4000, "depth": 1, "init_scale": 1.0}, (500,), 2)
    torch.manual_seed(0)
    b = build_model({"kind": "mlp", "width": 4000, "depth": 1, "init_scale": 0.2}, (500,), 2)
    wa, wb = a[1].weight, b[1].weight
    assert torch.allclose(wb, 0.2 * wa)
    assert abs(wa.std().item() - (2 / 500) ** 0.5) < 0.01 * (2 / 500) ** 0.5  # Kaiming normal, fan_in
    assert torch.count_nonzero(a[1].bias) == 0


def test_linear2_is_c_times_linear():
    torch.manual_seed(0)
    m = build_model({"kind": "linear2", "c": 1.0}, (6,), 1)
    x = torch.randn(5, 6)
    assert torch.allclose(m(x)[:, 0], m.c * (x @ m.w))
    with pytest.raises(SpecError, match="one output"):
        build_model({"kind": "linear2"}, (6,), 2)


def test_unknown_model_param_is_named():
    with pytest.raises(SpecError, match=r"model\.widht: unknown field.*did you mean 'width'"):
        build_model({"kind": "mlp", "widht": 3}, (4,), 2)
