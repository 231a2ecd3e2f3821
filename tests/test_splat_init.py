"""Initial Gaussians from depth and from the visual hull, on a small simulated golden part."""

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from agent.capture import Capture, Frame
from agent.sim import SimConfig, enrollment_poses, simulate_part
from agent.splat.init import (
    backdrop_mask,
    carve_visual_hull,
    foreground_masks,
    init_from_depth,
    init_from_visual_hull,
    voxel_downsample,
)


@pytest.fixture(scope="module")
def vase():
    cfg = SimConfig(width=64, height=64, enroll_views=12, surface_points=20_000, supersample=1, shadows=False)
    return simulate_part("vase", None, enrollment_poses("vase", cfg), cfg, np.random.default_rng(0), jitter=False)


def test_init_from_depth_puts_points_on_the_surface(vase):
    model = init_from_depth(vase, max_points=3000, rng=np.random.default_rng(0))
    assert 1000 < len(model) <= 3000
    dist, _ = cKDTree(vase.gt.surface_points).query(model.means.numpy())
    footprint = float(np.median([f.depth[f.depth > 0].mean() / f.intrinsics.fx for f in vase.frames]))
    # Averaged back-projected pixels: within a pixel footprint of the true surface (depth noise 0.5 mm).
    assert np.median(dist) < footprint
    assert np.percentile(dist, 99) < 3 * footprint
    assert torch.allclose(model.opacities(), torch.full((len(model),), 0.5))
    scales = model.scales()
    assert torch.all(scales[:, 0] == scales[:, 1]) and bool((scales > 0).all())
    assert float(scales.median()) < 3 * footprint


def test_init_from_depth_colours_come_from_the_pixels():
    K_cfg = SimConfig(width=32, height=32, enroll_views=1, surface_points=1000, supersample=1, shadows=False)
    cap = simulate_part("bracket", None, enrollment_poses("bracket", K_cfg)[:1], K_cfg, np.random.default_rng(1), jitter=False)
    f = cap.frames[0]
    model = init_from_depth(cap, max_points=10_000, voxel_size=1e-5)  # a voxel per pixel: no averaging
    fg = f.image[f.depth > 0].astype(np.float64) / 255.0
    assert len(model) == len(fg)
    got = np.sort(model.rgb().numpy(), axis=0)
    assert np.allclose(got, np.sort(np.clip(fg, 0.02, 0.98), axis=0), atol=1e-5)


def test_init_from_depth_rejects_unusable_captures(vase):
    no_depth = Capture(frames=[Frame(f.name, f.image, f.intrinsics, f.c2w) for f in vase.frames[:2]])
    with pytest.raises(ValueError, match="depth"):
        init_from_depth(no_depth)
    no_pose = Capture(frames=[Frame(f.name, f.image, f.intrinsics, None, f.depth) for f in vase.frames[:2]])
    with pytest.raises(ValueError, match="poses"):
        init_from_depth(no_pose)
    with pytest.raises(ValueError, match="max_points"):
        init_from_depth(vase, max_points=0)


def test_voxel_downsample_averages_within_voxels():
    pts = np.array([[0.1, 0.1, 0.1], [0.3, 0.3, 0.3], [1.5, 0.2, 0.2]])
    vals = np.array([1.0, 3.0, 7.0])
    p, v = voxel_downsample(pts, 1.0, vals)
    order = np.argsort(p[:, 0])
    assert np.allclose(p[order], [[0.2, 0.2, 0.2], [1.5, 0.2, 0.2]])
    assert np.allclose(v[order], [2.0, 7.0])


def test_visual_hull_contains_the_surface(vase):
    no_depth = Capture(frames=[Frame(f.name, f.image, f.intrinsics, f.c2w) for f in vase.frames])
    masks = [f.depth > 0 for f in vase.frames]
    occ, lo, edge = carve_visual_hull(no_depth, masks, resolution=48)
    ijk = np.floor((vase.gt.surface_points - lo) / edge).astype(int)
    assert ijk.min() >= 0 and ijk.max() < 48, "the default bounds must enclose the part"
    inside = occ[ijk[:, 0], ijk[:, 1], ijk[:, 2]]
    assert inside.mean() > 0.995
    # and it is not everything: the hull is a small part of the bounding cube
    assert occ.mean() < 0.3


def test_visual_hull_init_lies_near_the_surface(vase):
    no_depth = Capture(frames=[Frame(f.name, f.image, f.intrinsics, f.c2w) for f in vase.frames])
    masks = [f.depth > 0 for f in vase.frames]
    model = init_from_visual_hull(no_depth, max_points=4000, masks=masks, resolution=48)
    assert 0 < len(model) <= 4000
    _, _, edge = carve_visual_hull(no_depth, masks, resolution=48)
    dist, _ = cKDTree(vase.gt.surface_points).query(model.means.numpy())
    # The vase's opening is concave (a hull cannot carve it); most surface voxels still sit on the glaze.
    assert np.median(dist) < 2 * edge


def test_foreground_masks_sources(vase):
    given = [np.zeros((64, 64), bool) for _ in vase.frames]
    assert all(not m.any() for m in foreground_masks(vase, given))
    assert all(np.array_equal(m, f.depth > 0) for m, f in zip(foreground_masks(vase), vase.frames))
    no_depth = Capture(frames=[Frame(f.name, f.image, f.intrinsics, f.c2w) for f in vase.frames])
    ious = []
    for m, f in zip(foreground_masks(no_depth), vase.frames):
        truth = f.depth > 0
        ious.append((m & truth).sum() / (m | truth).sum())
    # measured at 64 x 64: mean 0.94, worst view 0.87 (the glaze's highlights come close to the backdrop's grey)
    assert np.mean(ious) > 0.9 and min(ious) > 0.8, ious
    with pytest.raises(ValueError, match="masks"):
        foreground_masks(vase, given[:1])


def test_backdrop_mask_on_a_plain_image():
    img = np.full((40, 40, 3), 200, np.uint8)
    img[10:30, 12:25] = (40, 90, 160)
    m = backdrop_mask(img)
    expected = np.zeros((40, 40), bool)
    expected[10:30, 12:25] = True
    assert (m == expected).mean() > 0.98
