"""Synthetic Gaussian scenes with known geometry, for tests and benchmarks."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from agent import geometry
from agent.splat.model import Ks_from_intrinsics, viewmats_from_c2w
from agent.splat.pose import rotmat_to_quat


@dataclass
class Scene:
    """Activated Gaussians plus cameras, ready for :func:`agent.splat.rasterize`."""

    means: Tensor
    quats: Tensor
    scales: Tensor
    opacities: Tensor
    colors: Tensor
    viewmats: Tensor
    Ks: Tensor
    width: int
    height: int

    def args(self) -> tuple:
        """Positional arguments of :func:`agent.splat.rasterize`."""
        return (self.means, self.quats, self.scales, self.opacities, self.colors, self.viewmats, self.Ks, self.width, self.height)


def _frames_from_normals(normals: np.ndarray) -> np.ndarray:
    """Rotations [N,3,3] whose third column is the given unit normal."""
    a = np.cross(normals, np.array([0.0, 0.0, 1.0]))
    degenerate = np.linalg.norm(a, axis=1) < 1e-6
    a[degenerate] = np.cross(normals[degenerate], np.array([1.0, 0.0, 0.0]))
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b = np.cross(normals, a)
    return np.stack([a, b, normals], axis=2)


def random_scene(
    n: int, width: int, height: int, n_cameras: int = 1, seed: int = 0, dtype=torch.float64, opacity_max: float = 0.95
) -> Scene:
    """A cloud of n random ellipsoids (radius ~0.1 m) seen by cameras on a ring around the origin."""
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g, dtype=torch.float64) - 0.5) * 0.2
    quats = torch.randn(n, 4, generator=g, dtype=torch.float64)
    scales = torch.rand(n, 3, generator=g, dtype=torch.float64) * 0.02 + 0.004
    opacities = torch.rand(n, generator=g, dtype=torch.float64) * (opacity_max - 0.05) + 0.05
    colors = torch.rand(n, 3, generator=g, dtype=torch.float64)
    c2w = [
        geometry.look_at(np.array([0.45 * math.cos(a), 0.45 * math.sin(a), 0.2]), np.zeros(3))
        for a in np.linspace(0.3, 0.3 + 2 * math.pi, n_cameras, endpoint=False)
    ]
    K = geometry.Intrinsics.from_fov(math.radians(40), width, height)
    t = lambda x: x.to(dtype)  # noqa: E731
    return Scene(
        t(means), t(quats), t(scales), t(opacities), t(colors),
        viewmats_from_c2w(c2w, dtype=dtype), Ks_from_intrinsics([K] * n_cameras, dtype=dtype), width, height,
    )  # fmt: skip


def surface_scene(n: int = 50_000, width: int = 256, height: int = 256, seed: int = 0, dtype=torch.float32) -> Scene:
    """n flat Gaussians (discs 1-3 px across, 0.1 px thick) on a bumpy closed surface filling the view.

    The realistic workload of the inspection renderer: a part's surface seen up close, each pixel
    covered by a few overlapping splats in front and hidden ones behind.
    """
    rng = np.random.default_rng(seed)
    v = rng.normal(size=(n, 3))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    radius = 0.1 * (1 + 0.15 * np.sin(5 * v[:, 0]) * np.cos(4 * v[:, 1]))
    means = v * radius[:, None]
    dist = 0.26
    fov = 2 * math.atan(0.1 / dist)
    K = geometry.Intrinsics.from_fov(fov, width, height)
    pixel = 2 * math.tan(fov / 2) * (dist - 0.1) / width  # metres per pixel on the near surface
    scales = np.stack([rng.uniform(1.0, 3.0, n) * pixel, rng.uniform(1.0, 3.0, n) * pixel, np.full(n, 0.1 * pixel)], 1)
    quats = rotmat_to_quat(torch.tensor(_frames_from_normals(v)))
    c2w = geometry.look_at(np.array([0.6, -0.64, 0.48]) * dist, np.zeros(3))
    t = lambda x: torch.as_tensor(x).to(dtype)  # noqa: E731
    return Scene(
        t(means), t(quats), t(scales), t(rng.uniform(0.5, 0.99, n)), t(rng.uniform(0.1, 0.9, (n, 3))),
        viewmats_from_c2w(c2w, dtype=dtype), Ks_from_intrinsics(K, dtype=dtype), width, height,
    )  # fmt: skip


def wall_scene(
    depth: float, width: int, height: int, c2w_gl: np.ndarray, K: geometry.Intrinsics, half_size: float,
    spacing: float, opacity: float = 0.99, dtype=torch.float64,
) -> Scene:  # fmt: skip
    """A square wall of flat Gaussians on a grid, facing the camera at ``depth`` metres along its axis."""
    c2w_cv = np.asarray(c2w_gl, dtype=np.float64) @ geometry.GL_TO_CV
    u = np.arange(-half_size, half_size + 1e-12, spacing)
    xx, yy = np.meshgrid(u, u, indexing="ij")
    pts_cam = np.stack([xx.ravel(), yy.ravel(), np.full(xx.size, depth)], 1)
    means = geometry.transform_points(c2w_cv, pts_cam)
    normal = c2w_cv[:3, 2]
    n = len(means)
    quats = rotmat_to_quat(torch.tensor(_frames_from_normals(np.tile(normal, (n, 1)))))
    scales = np.tile([spacing, spacing, spacing * 0.05], (n, 1))
    t = lambda x: torch.as_tensor(x).to(dtype)  # noqa: E731
    return Scene(
        t(means), t(quats), t(scales), t(np.full(n, opacity)), t(np.tile([0.8, 0.5, 0.2], (n, 1))),
        viewmats_from_c2w(c2w_gl, dtype=dtype), Ks_from_intrinsics(K, dtype=dtype), width, height,
    )  # fmt: skip
