"""3DGS PLY export/import (INRIA layout)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from plyfile import PlyData, PlyElement

from agent.splat import GaussianModel, load_ply, save_ply


def _model(n: int, degree: int) -> GaussianModel:
    g = torch.Generator().manual_seed(degree)
    return GaussianModel(
        means=torch.randn(n, 3, generator=g),
        quats=torch.randn(n, 4, generator=g),
        log_scales=torch.randn(n, 3, generator=g) - 4,
        opacity_logits=torch.randn(n, generator=g),
        sh=torch.randn(n, (degree + 1) ** 2, 3, generator=g),
    )


@pytest.mark.parametrize("degree", [0, 1, 3])
def test_round_trip_is_exact(tmp_path, degree):
    model = _model(50, degree)
    path = save_ply(model, tmp_path / "m.ply")
    back = load_ply(path)
    for a, b in zip(model.parameters(), back.parameters()):
        assert torch.equal(a, b)


def test_layout_is_the_inria_one(tmp_path):
    model = _model(4, 1)
    ply = PlyData.read(str(save_ply(model, tmp_path / "m.ply")))
    names = [p.name for p in ply["vertex"].properties]
    expected = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    expected += [f"f_rest_{i}" for i in range(9)] + ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    assert names == expected
    assert not ply.text and all(p.val_dtype in ("f4", "float32") for p in ply["vertex"].properties)
    v = ply["vertex"]
    # f_rest is channel-major: red's 3 degree-1 coefficients first
    np.testing.assert_array_equal(np.stack([v[f"f_rest_{i}"] for i in range(3)], 1), model.sh[:, 1:, 0].numpy())
    np.testing.assert_array_equal(v["rot_0"], model.quats[:, 0].numpy())  # w first
    np.testing.assert_array_equal(v["opacity"], model.opacity_logits.numpy())  # stored as logit


def test_missing_property_is_named(tmp_path):
    vertex = np.zeros(3, dtype=[(n, "f4") for n in ["x", "y", "z", "f_dc_0", "f_dc_1", "f_dc_2", "opacity"]])
    path = tmp_path / "bad.ply"
    PlyData([PlyElement.describe(vertex, "vertex")]).write(str(path))
    with pytest.raises(ValueError, match=r"bad\.ply.*scale_0"):
        load_ply(path)


def test_activation_helpers():
    means = torch.zeros(2, 3)
    model = GaussianModel.from_activated(
        means, torch.tensor([[1.0, 0, 0, 0]] * 2), torch.tensor([[0.01, 0.02, 0.03]] * 2),
        torch.tensor([0.25, 0.75]), torch.tensor([[0.1, 0.5, 0.9]] * 2),
    )  # fmt: skip
    torch.testing.assert_close(model.scales(), torch.tensor([[0.01, 0.02, 0.03]] * 2))
    torch.testing.assert_close(model.opacities(), torch.tensor([0.25, 0.75]))
    torch.testing.assert_close(model.rgb(), torch.tensor([[0.1, 0.5, 0.9]] * 2))
    with pytest.raises(ValueError, match="sh"):
        GaussianModel(means, model.quats, model.log_scales, model.opacity_logits, torch.zeros(2, 5, 3))
