"""The standard 3DGS PLY (INRIA layout), so models open in the usual splat viewers.

Vertex properties, all float32: x y z, nx ny nz (zeros), f_dc_0..2, f_rest_0..3(K-1)-1
(channel-major: all of red's higher-order coefficients, then green's, then blue's),
opacity (logit), scale_0..2 (log), rot_0..3 (w x y z).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from plyfile import PlyData, PlyElement

from agent.splat.model import GaussianModel


def _property_names(n_rest: int) -> list[str]:
    names = ["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2"]
    names += [f"f_rest_{i}" for i in range(n_rest)]
    names += ["opacity", "scale_0", "scale_1", "scale_2", "rot_0", "rot_1", "rot_2", "rot_3"]
    return names


def save_ply(model: GaussianModel, path: str | Path) -> Path:
    """Write ``model`` as a binary little-endian 3DGS PLY."""
    path = Path(path)
    n, k = model.sh.shape[:2]
    sh = model.sh.detach().cpu().double().numpy()
    rest = sh[:, 1:, :].transpose(0, 2, 1).reshape(n, 3 * (k - 1))  # [N, 3, K-1] flattened
    columns = [
        model.means.detach().cpu().double().numpy(),
        np.zeros((n, 3)),
        sh[:, 0, :],
        rest,
        model.opacity_logits.detach().cpu().double().numpy()[:, None],
        model.log_scales.detach().cpu().double().numpy(),
        model.quats.detach().cpu().double().numpy(),
    ]
    data = np.concatenate(columns, axis=1).astype(np.float32)
    names = _property_names(3 * (k - 1))
    vertex = np.empty(n, dtype=[(name, "f4") for name in names])
    for i, name in enumerate(names):
        vertex[name] = data[:, i]
    path.parent.mkdir(parents=True, exist_ok=True)
    PlyData([PlyElement.describe(vertex, "vertex")], text=False).write(str(path))
    return path


def load_ply(path: str | Path, dtype: torch.dtype = torch.float32) -> GaussianModel:
    """Read a 3DGS PLY; raises ValueError naming the file and the missing or malformed property."""
    path = Path(path)
    try:
        ply = PlyData.read(str(path))
    except Exception as exc:  # plyfile raises several types for malformed files
        raise ValueError(f"{path}: not a readable PLY file ({exc})") from exc
    if "vertex" not in ply:
        raise ValueError(f"{path}: no 'vertex' element")
    v = ply["vertex"]
    present = {p.name for p in v.properties}
    rest_names = sorted((p for p in present if p.startswith("f_rest_")), key=lambda s: int(s.split("_")[-1]))
    n_rest = len(rest_names)
    if n_rest % 3 or int(round((n_rest // 3 + 1) ** 0.5)) ** 2 != n_rest // 3 + 1:
        raise ValueError(f"{path}: {n_rest} f_rest_* properties do not form 3 channels of a full SH degree")
    if rest_names != [f"f_rest_{i}" for i in range(n_rest)]:
        raise ValueError(f"{path}: f_rest_* properties are not numbered 0..{n_rest - 1}")
    required = [name for name in _property_names(n_rest) if name not in ("nx", "ny", "nz")]
    missing = [name for name in required if name not in present]
    if missing:
        raise ValueError(f"{path}: missing vertex properties {missing} (expected the INRIA 3DGS layout)")

    def cols(names: list[str]) -> torch.Tensor:
        return torch.tensor(np.stack([np.asarray(v[name], dtype=np.float64) for name in names], axis=1), dtype=dtype)

    n = len(v.data)
    k = n_rest // 3 + 1
    dc = cols(["f_dc_0", "f_dc_1", "f_dc_2"])
    sh = torch.zeros(n, k, 3, dtype=dtype)
    sh[:, 0] = dc
    if n_rest:
        sh[:, 1:] = cols(rest_names).reshape(n, 3, k - 1).transpose(1, 2)
    try:
        return GaussianModel(
            means=cols(["x", "y", "z"]),
            quats=cols(["rot_0", "rot_1", "rot_2", "rot_3"]),
            log_scales=cols(["scale_0", "scale_1", "scale_2"]),
            opacity_logits=cols(["opacity"])[:, 0],
            sh=sh,
        )
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from exc
