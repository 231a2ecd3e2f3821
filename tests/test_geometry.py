import math

import numpy as np
import pytest

from agent import geometry as g


def test_look_at_points_minus_z_at_target_and_keeps_z_up():
    eye, target = np.array([0.3, -0.4, 0.5]), np.array([0.0, 0.0, 0.1])
    T = g.look_at(eye, target)
    g.check_rigid(T)
    forward = -T[:3, 2]
    np.testing.assert_allclose(forward, (target - eye) / np.linalg.norm(target - eye), atol=1e-12)
    assert T[2, 1] > 0  # camera y axis points upwards in the world


def test_projection_and_backprojection_round_trip():
    K = g.Intrinsics(300.0, 310.0, 64.0, 60.0, 128, 120)
    c2w = g.look_at([0.4, 0.2, 0.3], [0.0, 0.0, 0.0])
    rng = np.random.default_rng(0)
    jj, ii = rng.integers(0, 120, 50), rng.integers(0, 128, 50)
    depth = np.zeros((120, 128))
    depth[jj, ii] = rng.uniform(0.3, 0.7, 50)
    pts, flat = g.backproject_depth(depth, c2w, K)
    uv, z = g.project_points(pts, c2w, K)
    np.testing.assert_allclose(uv[:, 0], flat % 128 + 0.5, atol=1e-9)
    np.testing.assert_allclose(uv[:, 1], flat // 128 + 0.5, atol=1e-9)
    np.testing.assert_allclose(z, depth.reshape(-1)[flat], atol=1e-12)


def test_pixel_rays_hit_the_backprojected_points():
    K = g.Intrinsics.from_fov(math.radians(40), 32, 24)
    c2w = g.look_at([0.0, -0.5, 0.2], [0.0, 0.0, 0.05])
    origins, dirs, z_per_t = g.pixel_rays(c2w, K)
    depth = np.full((24, 32), 0.4)
    pts, flat = g.backproject_depth(depth, c2w, K)
    t = 0.4 / z_per_t[flat]
    np.testing.assert_allclose(origins[flat] + dirs[flat] * t[:, None], pts, atol=1e-12)
    # supersampled rays: s*s contiguous samples per pixel, their mean is the pixel centre ray
    o4, d4, _ = g.pixel_rays(c2w, K, supersample=2)
    assert d4.shape == (32 * 24 * 4, 3)
    mean_dir = d4.reshape(-1, 4, 3).mean(axis=1)
    mean_dir /= np.linalg.norm(mean_dir, axis=1, keepdims=True)
    np.testing.assert_allclose(mean_dir, dirs, atol=1e-4)


def test_gl_cv_conversions_are_inverse():
    c2w = g.look_at([0.1, 0.2, 0.3], [0.0, 0.0, 0.0])
    np.testing.assert_allclose(g.w2c_cv_to_c2w_gl(g.c2w_gl_to_w2c_cv(c2w)), c2w, atol=1e-12)
    np.testing.assert_allclose(g.invert_rigid(c2w) @ c2w, np.eye(4), atol=1e-12)


@pytest.mark.parametrize(
    "T, problem",
    [
        (np.eye(3), "must be 4x4"),
        (np.full((4, 4), np.nan), "NaN"),
        (np.diag([2.0, 1.0, 1.0, 1.0]), "not rigid"),
        (np.diag([-1.0, 1.0, 1.0, 1.0]), "reflection"),
        (np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], float), "last row"),
    ],
)
def test_check_rigid_names_the_problem(T, problem):
    with pytest.raises(ValueError, match=problem):
        g.check_rigid(T, what="frame 3 transform_matrix")


def test_intrinsics_validation_and_scaling():
    K = g.Intrinsics.from_fov(math.radians(90), 200, 100)
    assert K.fx == pytest.approx(100.0) and (K.cx, K.cy) == (100.0, 50.0)
    K.validate()
    assert K.scaled(400, 200).fx == pytest.approx(200.0)
    for bad in (g.Intrinsics(-1, 1, 5, 5, 10, 10), g.Intrinsics(1, 1, 50, 5, 10, 10), g.Intrinsics(float("nan"), 1, 5, 5, 10, 10)):
        with pytest.raises(ValueError):
            bad.validate()


def test_rotation_helpers():
    R = g.rotation_about_axis([0, 0, 1], math.radians(30))
    assert g.rotation_angle_deg(R) == pytest.approx(30.0)
    np.testing.assert_allclose(R @ [1, 0, 0], [math.cos(math.radians(30)), math.sin(math.radians(30)), 0], atol=1e-12)


def test_transform_points_is_the_matrix_product():
    rng = np.random.default_rng(0)
    T = np.eye(4)
    T[:3, :3] = g.rotation_about_axis(rng.normal(size=3), 0.7)
    T[:3, 3] = rng.normal(size=3)
    points = rng.normal(size=(1000, 3)).astype(np.float32)  # float32 in, float64 out
    got = g.transform_points(T, points)
    assert got.dtype == np.float64 and got.shape == (1000, 3)
    np.testing.assert_allclose(got, points.astype(np.float64) @ T[:3, :3].T + T[:3, 3], rtol=0, atol=1e-12)
    np.testing.assert_allclose(g.transform_points(T, points[:0]), np.zeros((0, 3)))
