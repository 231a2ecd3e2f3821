"""Rasterizer correctness: projection vs gsplat's torch reference, images vs a naive compositor, known geometry."""

from __future__ import annotations

import math
import logging

import numpy as np
import pytest
import torch
from gsplat.cuda import _torch_impl as gs

from agent import geometry
from agent.splat import cpu_kernel, rasterize, transform_gaussians
from agent.splat.composite import bin_gaussians_torch
from agent.splat.pose import pose_from_vector, quat_to_rotmat, rotvec_to_matrix
from agent.splat.projection import project_gaussians
from agent.splat.scenes import random_scene, wall_scene


def test_quat_to_rotmat_matches_gsplat():
    q = torch.randn(20, 4, dtype=torch.float64)
    torch.testing.assert_close(quat_to_rotmat(q), gs._quat_to_rotmat(q), rtol=0, atol=1e-14)


def test_projection_matches_gsplat_torch_reference():
    s = random_scene(200, 64, 48, n_cameras=3, seed=1)
    covars, _ = gs._quat_scale_to_covar_preci(s.quats, s.scales, compute_preci=False)
    radii, means2d, depths, conics, _ = gs._fully_fused_projection(
        s.means, covars, s.viewmats, s.Ks, s.width, s.height, eps2d=0.3, near_plane=0.01, far_plane=100.0
    )
    ours = project_gaussians(s.means, s.quats, s.scales, s.viewmats, s.Ks, s.width, s.height, near=0.01, far=100.0)
    assert (radii > 0).all(-1).sum() > 300  # most are visible: the comparison means something
    torch.testing.assert_close(ours.means2d, means2d, rtol=0, atol=1e-10)
    torch.testing.assert_close(ours.depths, depths, rtol=0, atol=1e-12)
    torch.testing.assert_close(ours.conics, conics, rtol=1e-9, atol=1e-12)
    assert torch.equal(ours.radii, radii)
    # the camera-frame means are gsplat's too
    means_c, _ = gs._world_to_cam(s.means, covars, s.viewmats)
    torch.testing.assert_close(ours.depths, means_c[..., 2], rtol=0, atol=1e-12)


def test_projection_with_opacity_uses_tight_radius():
    s = random_scene(100, 64, 48, seed=2)
    loose = project_gaussians(s.means, s.quats, s.scales, s.viewmats, s.Ks, 64, 48)
    tight = project_gaussians(s.means, s.quats, s.scales, s.viewmats, s.Ks, 64, 48, opacities=s.opacities)
    assert (tight.radii <= loose.radii).all() and (tight.radii < loose.radii).any()
    # beyond the tight radius along x, a Gaussian's alpha is below 1/255
    a = tight.conics[0, :, 0]
    sigma_edge = 0.5 * (tight.radii[0, :, 0].double() ** 2) * (a - tight.conics[0, :, 1] ** 2 / tight.conics[0, :, 2])
    visible = (tight.radii[0] > 0).all(-1)
    assert (s.opacities[visible] * torch.exp(-sigma_edge[visible]) <= 1 / 255 + 1e-9).all()


def test_binning_matches_gsplat_isect_tiles():
    s = random_scene(60, 70, 50, n_cameras=2, seed=3, dtype=torch.float32)
    p = project_gaussians(s.means, s.quats, s.scales, s.viewmats, s.Ks, 70, 50, opacities=s.opacities)
    tiles_x, tiles_y = math.ceil(70 / 16), math.ceil(50 / 16)
    _, isect_ids, flatten_ids = gs._isect_tiles(p.means2d.detach(), p.radii, p.depths.detach(), 16, tiles_x, tiles_y)
    offsets_ref = gs._isect_offset_encode(isect_ids, 2, tiles_x, tiles_y).reshape(-1).long()
    for offsets, flat in (
        bin_gaussians_torch(p.means2d, p.radii, p.depths, 70, 50, 16),
        cpu_kernel.bin_gaussians(p.means2d, p.radii, p.depths, 70, 50, 16),
    ):
        assert torch.equal(offsets[:-1], offsets_ref)
        assert torch.equal(flat, flatten_ids.long())


@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("dtype,atol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_image_matches_naive_reference(backend, dtype, atol):
    # dense and opaque enough that the alpha clamp and the early stop both happen
    s = random_scene(400, 64, 48, n_cameras=2, seed=4, dtype=dtype, opacity_max=1.0)
    bg = torch.tensor([0.1, 0.2, 0.3], dtype=dtype)
    ref = rasterize(*s.args(), backend="naive", backgrounds=bg)
    out = rasterize(*s.args(), backend=backend, backgrounds=bg)
    assert out.meta["backend"] == backend
    assert (ref.alpha > 0.999).float().mean() > 0.05  # many pixels saturate (early stop)
    for name in ("rgb", "depth", "alpha"):
        torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=0, atol=atol * (10 if name == "depth" else 1))


def test_opaque_wall_has_known_depth_and_alpha():
    W = H = 48
    K = geometry.Intrinsics.from_fov(math.radians(50), W, H)
    c2w = geometry.look_at(np.array([0.3, -0.2, 0.25]), np.array([0.0, 0.0, 0.05]))
    d = 0.4
    half = 0.5 * d * math.tan(math.radians(25))  # the wall covers the middle half of the view
    s = wall_scene(d, W, H, c2w, K, half_size=half, spacing=half / 12)
    bg = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)
    out = rasterize(*s.args(), backend="cpu", backgrounds=bg)
    inner = slice(H // 4 + 3, 3 * H // 4 - 3)
    alpha = out.alpha[0, inner, inner, 0]
    depth = out.depth[0, inner, inner, 0]
    assert (alpha > 0.999).all()
    torch.testing.assert_close(depth, torch.full_like(depth, d), rtol=0, atol=1e-9)
    torch.testing.assert_close(out.rgb[0, inner, inner], torch.tensor([0.8, 0.5, 0.2], dtype=torch.float64).expand_as(out.rgb[0, inner, inner]), rtol=0, atol=2e-3)
    # outside the wall: nothing, background colour, depth 0 ("no measurement")
    assert out.alpha[0, :3].abs().max() == 0 and out.depth[0, :3].abs().max() == 0
    torch.testing.assert_close(out.rgb[0, :3], bg.expand(3, W, 3))
    # back-projecting the rendered depth with agent.geometry lands on the wall plane
    pts, _ = geometry.backproject_depth(np.where(out.alpha[0, ..., 0].numpy() > 0.999, out.depth[0, ..., 0].numpy(), 0), c2w, K)
    axis = -c2w[:3, 2]
    np.testing.assert_allclose((pts - c2w[:3, 3]) @ axis, d, atol=1e-9)


def test_single_gaussian_lands_where_geometry_projects_it():
    W, H = 64, 48
    K = geometry.Intrinsics(70.0, 72.0, 30.3, 25.1, W, H)
    c2w = geometry.look_at(np.array([0.2, 0.3, 0.25]), np.array([0.0, 0.0, 0.0]))
    point = np.array([[0.01, -0.02, 0.03]])
    uv, z = geometry.project_points(point, c2w, K)
    t = lambda x: torch.tensor(x, dtype=torch.float64)  # noqa: E731
    out = rasterize(
        t(point), t([[1.0, 0, 0, 0]]), t([[0.004, 0.004, 0.004]]), t([0.9]), t([[1.0, 1.0, 1.0]]),
        t(geometry.c2w_gl_to_w2c_cv(c2w))[None], t(K.matrix())[None], W, H,
    )  # fmt: skip
    a = out.alpha[0, ..., 0]
    jj, ii = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    centroid = np.array([(a * ii).sum() / a.sum(), (a * jj).sum() / a.sum()])
    np.testing.assert_allclose(centroid, uv[0], atol=0.05)
    assert abs(out.depth[0, int(uv[0, 1]), int(uv[0, 0]), 0].item() - z[0]) < 1e-9


def test_object_pose_equals_moving_the_gaussians():
    s = random_scene(80, 40, 32, n_cameras=2, seed=5)
    xi = torch.tensor([0.05, -0.1, 0.2, 0.01, -0.02, 0.015], dtype=torch.float64)
    posed = rasterize(*s.args(), object_pose=xi)
    means, quats = transform_gaussians(s.means, s.quats, xi)
    moved = rasterize(means, quats, *s.args()[2:])
    for name in ("rgb", "depth", "alpha"):
        torch.testing.assert_close(getattr(posed, name), getattr(moved, name), rtol=0, atol=1e-9)
    # 4x4 and 6-vector forms agree
    posed4 = rasterize(*s.args(), object_pose=pose_from_vector(xi))
    torch.testing.assert_close(posed4.rgb, posed.rgb, rtol=0, atol=0)


def test_rotvec_matches_geometry_rodrigues():
    axis, angle = np.array([0.3, -0.5, 0.8]), 0.7
    rv = torch.tensor(axis / np.linalg.norm(axis) * angle)
    np.testing.assert_allclose(rotvec_to_matrix(rv).numpy(), geometry.rotation_about_axis(axis, angle), atol=1e-14)
    torch.testing.assert_close(rotvec_to_matrix(torch.zeros(3, dtype=torch.float64)), torch.eye(3, dtype=torch.float64))


def test_sh_degree_zero_equals_rgb_and_higher_degrees_match_naive():
    s = random_scene(60, 32, 32, seed=6)
    sh0 = ((s.colors - 0.5) / 0.28209479177387814)[:, None, :]
    a = rasterize(*s.args())
    b = rasterize(*s.args()[:4], sh0, *s.args()[5:], sh_degree=0)
    torch.testing.assert_close(a.rgb, b.rgb, rtol=0, atol=1e-12)
    sh = torch.randn(60, 16, 3, dtype=torch.float64) * 0.3
    ref = rasterize(*s.args()[:4], sh, *s.args()[5:], sh_degree=3, backend="naive")
    out = rasterize(*s.args()[:4], sh, *s.args()[5:], sh_degree=3, backend="cpu")
    torch.testing.assert_close(out.rgb, ref.rgb, rtol=0, atol=1e-10)
    assert (out.rgb - b.rgb).abs().max() > 0.05  # the view-dependent terms change the image


def test_bad_inputs_are_named():
    s = random_scene(10, 16, 16)
    with pytest.raises(ValueError, match="quats"):
        rasterize(s.means, s.quats[:, :3], *s.args()[2:])
    with pytest.raises(ValueError, match="Ks"):
        rasterize(*s.args()[:6], s.Ks[:, :2], 16, 16)
    with pytest.raises(ValueError, match="backend"):
        rasterize(*s.args(), backend="opengl")
    with pytest.raises(ValueError, match="object_pose"):
        rasterize(*s.args(), object_pose=torch.zeros(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="gsplat"):
        rasterize(*s.args(), backend="gsplat")  # CPU tensors


def test_missing_compiler_falls_back_to_torch_with_a_warning(monkeypatch, caplog):
    s = random_scene(30, 16, 16)
    expected = rasterize(*s.args(), backend="torch")
    monkeypatch.setattr(cpu_kernel, "_state", {})
    monkeypatch.setattr(cpu_kernel.shutil, "which", lambda name: None)
    with caplog.at_level(logging.WARNING, logger="agent.splat.cpu_kernel"):
        out = rasterize(*s.args(), backend="cpu")
    assert out.meta["backend"] == "torch"
    assert "falling back to the pure-torch rasterizer" in caplog.text
    torch.testing.assert_close(out.rgb, expected.rgb, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for gsplat's kernels")
def test_gsplat_backend_matches_cpu_backend():
    s = random_scene(300, 64, 48, n_cameras=2, seed=7, dtype=torch.float32)
    xi = torch.tensor([0.02, -0.03, 0.05, 0.01, 0.0, -0.01])
    bg = torch.tensor([0.1, 0.2, 0.3])
    cpu = rasterize(*s.args(), object_pose=xi, backgrounds=bg, backend="cpu")
    cuda_args = [a.cuda() if torch.is_tensor(a) else a for a in s.args()]
    gpu = rasterize(*cuda_args, object_pose=xi.cuda(), backgrounds=bg.cuda(), backend="auto")
    assert gpu.meta["backend"] == "gsplat"
    for name in ("rgb", "depth", "alpha"):
        torch.testing.assert_close(getattr(gpu, name).cpu(), getattr(cpu, name), rtol=0, atol=1e-3)
