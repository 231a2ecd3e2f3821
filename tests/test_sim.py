"""Simulator: products, cameras, geometry of the rendered depth, defects and their ground truth."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.ndimage import map_coordinates
from scipy.spatial import cKDTree

from agent.capture import DEFECT_TYPES
from agent.geometry import backproject_depth, check_rigid, project_points, transform_points
from agent.sim import PRODUCTS, SimConfig, enrollment_poses, inspection_poses, simulate_part
from agent.sim.products import load_product
from agent.sim.trajectory import camera_intrinsics

SIZES_M = {"stool": (0.30, 0.40), "vase": (0.20, 0.30), "bracket": (0.08, 0.15), "mug": (0.08, 0.15)}


def small_config(**overrides) -> SimConfig:
    base = dict(width=80, height=80, n_views=6, enroll_views=6, surface_points=20_000, depth_noise_std=0.0)
    base.update(overrides)
    return SimConfig(**base)


@pytest.mark.parametrize("name", sorted(PRODUCTS))
def test_product_meshes_are_closed_real_sized_and_stand_on_the_fixture(name):
    model = load_product(name)
    assert model.mesh.is_watertight()
    lo, hi = model.mesh.vertices.min(axis=0), model.mesh.vertices.max(axis=0)
    assert abs(lo[2]) < 1e-6, "the base must sit at z = 0"
    lo_size, hi_size = SIZES_M[name]
    assert lo_size <= (hi - lo).max() <= hi_size
    assert np.allclose(0.5 * (lo[:2] + hi[:2]), 0.0, atol=0.015), "the part must be centred on the fixture"


def test_config_rejects_bad_values_by_name():
    with pytest.raises(ValueError, match="fov_deg"):
        SimConfig(fov_deg=0)
    with pytest.raises(ValueError, match="supersample"):
        SimConfig(supersample=0)
    with pytest.raises(ValueError, match="light_variation"):
        SimConfig(light_variation=2.0)


def test_unknown_product_and_defect_are_named():
    config = small_config()
    with pytest.raises(ValueError, match="unknown product 'chair'"):
        inspection_poses("chair", config)
    with pytest.raises(ValueError, match="unknown defect type 'crack'"):
        simulate_part("bracket", "crack", inspection_poses("bracket", config), config, np.random.default_rng(0))


def test_trajectories_look_at_the_part_and_inspection_azimuths_differ():
    config = SimConfig()
    enroll, inspect = enrollment_poses("vase", config), inspection_poses("vase", config)
    assert len(enroll) == 36 and len(inspect) == 12
    target = load_product("vase").center
    K = camera_intrinsics(config)
    assert 35.0 <= config.fov_deg <= 45.0
    for pose in enroll + inspect:
        check_rigid(pose)
        uv, z = project_points(target[None], pose, K)
        assert z[0] > 0 and np.allclose(uv[0], [K.cx, K.cy], atol=1e-6)
    azimuth = lambda p: round(math.degrees(math.atan2(p[1, 3] - target[1], p[0, 3] - target[0])) % 360.0, 3)
    assert not {azimuth(p) for p in inspect} & {azimuth(p) for p in enroll}


@pytest.mark.parametrize("name", ["stool", "bracket"])
def test_part_fills_most_of_the_frame(name):
    config = small_config(n_views=4, jitter_mm=0.0, jitter_deg=0.0)
    capture = simulate_part(name, None, inspection_poses(name, config), config, np.random.default_rng(0))
    for frame in capture.frames:
        rows, cols = np.nonzero(frame.depth > 0)
        extent = max(rows.max() - rows.min(), cols.max() - cols.min()) + 1
        assert 0.6 * config.width <= extent <= config.width
        assert rows.min() > 0 and cols.min() > 0 and rows.max() < config.height - 1 and cols.max() < config.width - 1


def test_depth_reprojects_between_views_within_half_a_pixel():
    config = small_config(width=96, height=96, n_views=8, noise_std=0.0)
    poses = inspection_poses("vase", config)
    capture = simulate_part("vase", None, poses, config, np.random.default_rng(3))
    K = capture.frames[0].intrinsics
    errors_px, depth_errors = [], []
    for a, b in [(0, 1), (1, 2), (4, 5), (0, 4)]:
        fa, fb = capture.frames[a], capture.frames[b]
        points, flat = backproject_depth(fa.depth, fa.c2w, K)
        uv, z = project_points(points, fb.c2w, K)
        inside = (uv[:, 0] >= 1) & (uv[:, 0] < K.width - 1) & (uv[:, 1] >= 1) & (uv[:, 1] < K.height - 1)
        uv, z, points, flat = uv[inside], z[inside], points[inside], flat[inside]
        # B's depth at the continuous projection (bilinear; only where all four neighbours are surface)
        coords = [uv[:, 1] - 0.5, uv[:, 0] - 0.5]
        zb = map_coordinates(fb.depth.astype(np.float64), coords, order=1)
        valid = map_coordinates((fb.depth > 0).astype(np.float64), coords, order=1) > 0.999
        mutual = valid & (np.abs(zb - z) < 0.002)  # visible in both views
        assert mutual.sum() > 300
        depth_errors.append(np.abs(zb - z)[mutual])
        # round trip: the surface point B sees there, projected back into A, lands on A's pixel centre
        rays_z = zb[mutual]
        x = (uv[mutual, 0] - K.cx) / K.fx * rays_z
        y = (uv[mutual, 1] - K.cy) / K.fy * rays_z
        from agent.geometry import GL_TO_CV

        q = transform_points(fb.c2w @ GL_TO_CV, np.stack([x, y, rays_z], axis=1))
        uv_a, _ = project_points(q, fa.c2w, K)
        jj, ii = np.divmod(flat[mutual], K.width)
        errors_px.append(np.linalg.norm(uv_a - np.stack([ii + 0.5, jj + 0.5], axis=1), axis=1))
    assert np.median(np.concatenate(errors_px)) < 0.5
    assert np.median(np.concatenate(depth_errors)) < 0.0005


def test_same_seed_same_data_and_another_seed_differs():
    config = small_config(n_views=3)
    poses = inspection_poses("mug", config)
    a = simulate_part("mug", "stain", poses, config, np.random.default_rng(11))
    b = simulate_part("mug", "stain", poses, config, np.random.default_rng(11))
    c = simulate_part("mug", "stain", poses, config, np.random.default_rng(12))
    for fa, fb in zip(a.frames, b.frames):
        assert np.array_equal(fa.image, fb.image) and np.array_equal(fa.depth, fb.depth) and np.array_equal(fa.mask, fb.mask)
    assert np.array_equal(a.gt.surface_points, b.gt.surface_points) and np.array_equal(a.gt.defect_ids, b.gt.defect_ids)
    assert np.allclose(a.gt.T_world_part, b.gt.T_world_part)
    assert not np.allclose(a.gt.T_world_part, c.gt.T_world_part)
    assert not np.array_equal(a.frames[0].image, c.frames[0].image)


def test_golden_part_has_identity_placement_and_test_parts_are_jittered_within_limits():
    config = small_config(n_views=2, jitter_mm=3.0, jitter_deg=3.0)
    poses = inspection_poses("bracket", config)
    golden = simulate_part("bracket", None, poses, config, np.random.default_rng(0), jitter=False)
    assert np.array_equal(golden.gt.T_world_part, np.eye(4)) and golden.gt.label == "good"
    assert not any(f.mask.any() for f in golden.frames)
    for seed in range(3):
        T = simulate_part("bracket", None, poses, config, np.random.default_rng(seed)).gt.T_world_part
        check_rigid(T)
        assert np.all(np.abs(T[:2, 3]) <= 0.003) and T[2, 3] == 0.0
        assert math.degrees(math.atan2(T[1, 0], T[0, 0])) == pytest.approx(0.0, abs=3.0)
        assert not np.allclose(T, np.eye(4))


def test_background_is_light_grey_with_no_depth_and_images_are_noisy():
    config = small_config(n_views=2)
    capture = simulate_part("bracket", None, inspection_poses("bracket", config), config, np.random.default_rng(1))
    frame = capture.frames[0]
    background = frame.image[frame.depth == 0].astype(float)
    assert 170 < background.mean() < 235 and background.std(axis=0).max() < 12
    assert frame.depth.dtype == np.float32 and frame.image.dtype == np.uint8
    assert np.abs(np.diff(background[:, 0])).mean() > 0.5  # sensor noise


@pytest.mark.parametrize("defect", DEFECT_TYPES)
@pytest.mark.parametrize("name", sorted(PRODUCTS))
def test_defect_ground_truth_is_consistent(name, defect):
    config = small_config()
    poses = inspection_poses(name, config)
    capture = simulate_part(name, defect, poses, config, np.random.default_rng(7))
    gt = capture.gt
    assert gt.label == defect and len(gt.defects) == 1
    blob = gt.defects[0]
    assert blob.id == 1 and blob.type == defect
    assert 0.003 <= blob.radius_m <= 0.04

    # visible in at least two inspection views
    counts = [int(f.mask.sum()) for f in capture.frames]
    assert sum(c >= config.min_pixels_scaled for c in counts) >= 2, counts

    # mask pixels back-project near the defect (pixel centres may see past a silhouette: most, not all)
    K = capture.frames[0].intrinsics
    pixel_m = 2 * math.tan(math.radians(config.fov_deg) / 2) / config.width  # metres per pixel at 1 m
    near = []
    for frame in capture.frames:
        if not frame.mask.any():
            continue
        points, flat = backproject_depth(np.where(frame.mask, frame.depth, 0), frame.c2w, K)
        dist_cam = np.linalg.norm(frame.c2w[:3, 3] - blob.center)
        near.append(np.linalg.norm(points - blob.center, axis=1) <= blob.radius_m + 2 * pixel_m * dist_cam)
    near = np.concatenate(near)
    assert near.mean() > 0.8

    # surface points: labelled ones lie within the blob radius, there are enough of them
    ids = gt.defect_ids
    assert gt.surface_points.dtype == np.float32 and ids.dtype == np.int32 and len(ids) == len(gt.surface_points)
    labelled = gt.surface_points[ids == 1]
    assert len(labelled) >= 50
    assert np.linalg.norm(labelled - blob.center, axis=1).max() <= blob.radius_m * 1.001 + 1e-5
    if defect in ("stain", "dent", "missing"):
        core = np.linalg.norm(gt.surface_points - blob.center, axis=1) < 0.3 * blob.radius_m
        assert core.sum() > 5 and (ids[core] == 1).mean() > 0.9

    # surface points lie on the rendered surface (world frame, part as placed)
    tree = cKDTree(gt.surface_points)
    spacing = math.sqrt(load_product(name).mesh.face_areas.sum() / config.surface_points)
    for frame in capture.frames[:3]:
        points, flat = backproject_depth(frame.depth, frame.c2w, K)
        if defect == "missing":  # the points cover the nominal surface: leave the cavity out
            points = points[~frame.mask.reshape(-1)[flat]]
        d, _ = tree.query(points)
        assert np.median(d) < 1.5 * spacing
        assert np.quantile(d, 0.95) < 4 * spacing
