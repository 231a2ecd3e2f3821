"""The nominal surface: fusion of golden depth, nominal tolerances, ICP placement and the per-pixel evidence."""

from __future__ import annotations

import numpy as np
import pytest

from agent.capture import Frame
from agent.geometry import Intrinsics, backproject_depth, look_at, pixel_rays, rotation_about_axis, rotation_angle_deg
from agent.sim import SimConfig, enrollment_poses, inspection_poses, simulate_part
from agent.surface import (
    MIN_COLOUR_TOL, MIN_GEOMETRY_TOL_M, SEE_THROUGH_GAP_TOLS, NominalSurface, build_nominal_surface, colour_contrast, expected_depth, fit_placement,
    PLACEMENT_COARSE_SPACINGS, SHADING_BINS, _shading_correction, geometry_contrast, highlight_free_log_ratio, placement_distance, see_through,
    sample_bilinear, surface_residuals,
)  # fmt: skip

PRODUCT = "bracket"


@pytest.fixture(scope="module")
def scene():
    config = SimConfig(width=128, height=128, enroll_views=18, n_views=4, light_variation=0.05, jitter_mm=3.0, jitter_deg=3.0,
                       surface_points=5_000)  # fmt: skip
    rng = np.random.default_rng(3)
    golden = simulate_part(PRODUCT, None, enrollment_poses(PRODUCT, config), config, rng, jitter=False)
    poses = inspection_poses(PRODUCT, config)
    good = simulate_part(PRODUCT, None, poses, config, rng)
    burr = simulate_part(PRODUCT, "burr", poses, config, rng)
    f = golden.frames[0]
    spacing = float(np.median(f.depth[f.depth > 0]) / f.intrinsics.fx)
    surface = build_nominal_surface(golden.frames, spacing)
    return surface, good, burr


def test_surface_is_on_the_golden_depth_with_floors_and_outward_normals(scene):
    surface, _, _ = scene
    assert len(surface) > 1000
    assert surface.geometry_tol.min() >= np.float32(MIN_GEOMETRY_TOL_M) and surface.colour_tol.min() >= np.float32(MIN_COLOUR_TOL)
    # held-out golden samples stray from the surface by about the sensor noise (0.5 mm): tolerances of that order
    assert 0.0004 <= float(np.median(surface.geometry_tol)) < 0.003
    # normals point up on the top faces of the part (the cameras look from above)
    top = surface.points[:, 2] > np.percentile(surface.points[:, 2], 99)
    assert np.median(surface.normals[top, 2]) > 0.8


def test_save_load_round_trip_and_malformed_file(scene, tmp_path):
    surface, _, _ = scene
    surface.save(tmp_path / "s.npz")
    back = NominalSurface.load(tmp_path / "s.npz")
    np.testing.assert_array_equal(back.points, surface.points)
    np.testing.assert_array_equal(back.colour_tol, surface.colour_tol)
    assert back.spacing_m == surface.spacing_m
    np.savez(tmp_path / "bad.npz", points=surface.points)
    with pytest.raises(ValueError, match="missing"):
        NominalSurface.load(tmp_path / "bad.npz")
    with pytest.raises(ValueError, match="positive"):
        NominalSurface(surface.points, surface.normals, surface.colour, -surface.geometry_tol, surface.colour_tol, surface.spacing_m)


def test_placement_recovers_the_fixture_offset(scene):
    surface, good, _ = scene
    truth = good.gt.T_world_part
    fit = fit_placement(surface, good.frames[:2])
    assert np.linalg.norm(fit.T_world_part[:3, 3] - truth[:3, 3]) < 0.0005
    assert rotation_angle_deg(fit.T_world_part[:3, :3] @ truth[:3, :3].T) < 0.2
    # a refinement started from a wrong guess within the fixture's play (no search) also finds it
    guess = np.eye(4)
    guess[:3, :3] = rotation_about_axis(np.array([0.0, 0.0, 1.0]), np.radians(1.0))
    refined = fit_placement(surface, good.frames[:2], init=guess @ truth, search_mm=0.0, search_deg=0.0)
    assert np.linalg.norm(refined.T_world_part[:3, 3] - truth[:3, 3]) < 0.0005


def test_the_coarse_placement_target_keeps_one_point_per_coarse_cell(scene):
    surface, _, _ = scene
    coarse = surface.coarse
    assert coarse is surface.coarse  # computed once
    cells = np.floor(surface.points / (PLACEMENT_COARSE_SPACINGS * surface.spacing_m)).astype(np.int64)
    assert len(coarse.points) == len(np.unique(cells, axis=0)) < len(surface.points) / 3
    # the kept points are surface points with their own normals, and every surface point has one within its cell
    d, j = surface.tree.query(coarse.points)
    assert d.max() == 0.0
    np.testing.assert_array_equal(coarse.normals, surface.normals[j])
    reach, _ = coarse.tree.query(surface.points)
    assert reach.max() <= np.sqrt(3) * PLACEMENT_COARSE_SPACINGS * surface.spacing_m


def test_sample_bilinear_takes_more_points_than_a_remap_map_can_hold():
    # a 512 x 512 view holds more than 32767 pixels on the part: one column of them is more than cv2.remap takes
    rng = np.random.default_rng(5)
    image = rng.random((40, 60, 3)).astype(np.float32)
    n = 70_001
    u, v = rng.uniform(-1.5, 60.5, n), rng.uniform(-1.5, 40.5, n)
    u[:3] = [np.nan, 0.0, 59.0]
    v[:3] = [0.0, 0.0, 39.0]
    got = sample_bilinear(image, u, v)
    assert got.shape == (n, 3)
    padded = np.pad(image, ((1, 2), (1, 2), (0, 0)))  # 0 outside the image
    uu, vv = np.nan_to_num(u) + 1.0, v + 1.0
    inside = (uu >= 0) & (vv >= 0) & (uu <= 61) & (vv <= 41)
    x0, y0 = np.floor(uu).astype(int), np.floor(vv).astype(int)
    fx, fy = (uu - x0)[:, None], (vv - y0)[:, None]
    x0, y0 = np.clip(x0, 0, 61), np.clip(y0, 0, 41)
    want = ((1 - fx) * (1 - fy) * padded[y0, x0] + fx * (1 - fy) * padded[y0, x0 + 1]
            + (1 - fx) * fy * padded[y0 + 1, x0] + fx * fy * padded[y0 + 1, x0 + 1])  # fmt: skip
    np.testing.assert_allclose(got[inside], want[inside], atol=2e-3)  # cv2 interpolates with 5-bit weights
    np.testing.assert_allclose(got[1], image[0, 0], atol=1e-6)
    np.testing.assert_allclose(got[2], image[39, 59], atol=1e-6)
    np.testing.assert_allclose(got[0], image[0, 0], atol=1e-6)  # NaN reads as 0


def test_shading_correction_is_the_median_ratio_per_normal_bin():
    rng = np.random.default_rng(5)
    n = 4000
    normals = rng.normal(size=(n, 3))
    normals /= np.linalg.norm(normals, axis=1, keepdims=True)
    reference = rng.uniform(0.02, 0.9, (n, 3))
    observed = reference * rng.uniform(0.6, 1.6, (n, 3))
    gain = _shading_correction(normals, observed, reference)
    # the rule written out: bins of at least 32 samples with a measurable reference take their median ratio, the
    # rest the global median; clipped to 0.5-2
    ratio = observed / np.maximum(reference, 0.02)
    good = (reference > 0.04).all(axis=1)
    b = np.clip(((normals + 1.0) * 0.5 * SHADING_BINS).astype(np.int64), 0, SHADING_BINS - 1)
    key = (b[:, 0] * SHADING_BINS + b[:, 1]) * SHADING_BINS + b[:, 2]
    expected = np.tile(np.median(ratio[good], axis=0), (n, 1))
    for k in np.unique(key):
        if (good & (key == k)).sum() >= 32:
            expected[key == k] = np.median(ratio[good & (key == k)], axis=0)
    assert 0 < (np.bincount(key[good]) >= 32).sum() < len(np.unique(key))  # both cases occur
    np.testing.assert_array_equal(gain, np.clip(expected, 0.5, 2.0))


def _l_profile(spacing: float) -> NominalSurface:
    """A grey L profile 50 mm long along x: a floor plate (z = 0, 30 mm deep in y) and a back wall (y = 0, 25 mm
    high), as points on a grid of ``spacing``: a prism, like the bracket."""
    xs = np.arange(-0.025, 0.025 + 1e-9, spacing)
    floor = np.stack(np.meshgrid(xs, np.arange(0.0, 0.03 + 1e-9, spacing), [0.0], indexing="ij"), -1).reshape(-1, 3)
    wall = np.stack(np.meshgrid(xs, [0.0], np.arange(spacing, 0.025 + 1e-9, spacing), indexing="ij"), -1).reshape(-1, 3)
    normals = np.concatenate([np.tile([0.0, 0.0, 1.0], (len(floor), 1)), np.tile([0.0, 1.0, 0.0], (len(wall), 1))])
    n = len(floor) + len(wall)
    return NominalSurface(np.concatenate([floor, wall]).astype(np.float32), normals.astype(np.float32), np.full((n, 3), 0.5, np.float32),
                          np.full(n, 0.0005, np.float32), np.full(n, 0.06, np.float32), spacing)  # fmt: skip


def _l_profile_view(shift_x: float) -> Frame:
    """A depth view of :func:`_l_profile` moved by ``shift_x`` along its length, from in front and above."""
    K = Intrinsics(fx=220.0, fy=220.0, cx=64.0, cy=64.0, width=128, height=128)
    c2w = look_at(np.array([0.03, 0.2, 0.15]), np.array([0.0, 0.01, 0.01]))
    origins, dirs, z_per_t = pixel_rays(c2w, K)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_floor, t_wall = -origins[:, 2] / dirs[:, 2], -origins[:, 1] / dirs[:, 1]
    x_floor, y_floor = (origins + t_floor[:, None] * dirs)[:, :2].T
    x_wall, z_wall = (origins + t_wall[:, None] * dirs)[:, [0, 2]].T
    on_floor = (t_floor > 0) & (np.abs(x_floor - shift_x) <= 0.025) & (y_floor >= 0) & (y_floor <= 0.03)
    on_wall = (t_wall > 0) & (np.abs(x_wall - shift_x) <= 0.025) & (z_wall >= 0) & (z_wall <= 0.025)
    t = np.minimum(np.where(on_floor, t_floor, np.inf), np.where(on_wall, t_wall, np.inf))
    depth = np.where(np.isfinite(t), t * z_per_t, 0.0).reshape(128, 128).astype(np.float32)
    return Frame(name="000", image=np.full((128, 128, 3), 128, np.uint8), intrinsics=K, c2w=c2w, depth=depth)


def test_placement_is_not_fooled_by_a_slide_along_a_prism():
    # Point-to-plane ICP cannot move a prism along its length, and a placement slid along it has residuals as small
    # as the true one (the samples beyond the end still lie on its planes): the hypotheses are ranked by the samples'
    # distance to the surface instead, which the slid ones increase.
    surface = _l_profile(0.0005)
    frame = _l_profile_view(0.003)
    points = backproject_depth(frame.depth, frame.c2w, frame.intrinsics)[0]
    at_recipe, at_truth = np.eye(4), np.eye(4)  # world -> recipe: the recipe placement (3 mm off) and the truth
    at_truth[0, 3] = -0.003
    assert placement_distance(surface, points, at_truth) < 0.8 * placement_distance(surface, points, at_recipe)
    fit = fit_placement(surface, [frame])  # init: the recipe placement, 3 mm off; the search reaches it
    assert abs(fit.T_world_part[0, 3] - 0.003) < 0.0003 and abs(fit.T_world_part[1, 3]) < 0.0003


def test_placement_without_depth_is_a_clear_error(scene):
    surface, good, _ = scene
    frame = good.frames[0]
    empty = type(frame)(name=frame.name, image=frame.image, intrinsics=frame.intrinsics, c2w=frame.c2w, depth=np.zeros_like(frame.depth))
    with pytest.raises(ValueError, match="depth"):
        fit_placement(surface, [empty])


def test_burr_stands_out_and_the_good_part_stays_near_its_tolerance(scene):
    from agent.anomaly import surface_channel_maps

    surface, good, burr = scene
    raw = surface_residuals(surface, good.frames[0], good.gt.T_world_part)
    assert raw.observed.sum() == (good.frames[0].depth > 0).sum()
    # the maps inspection uses (median + blur): the good part stays within about its nominal tolerance
    good_peak = max(float(surface_channel_maps(surface, f, good.gt.T_world_part).channels[0].max()) for f in good.frames)
    assert good_peak < 1.5
    seen = [f for f in burr.frames if f.mask.sum() >= 4]
    assert seen, "the burr should be visible in some view"
    on = [float(surface_channel_maps(surface, f, burr.gt.T_world_part).channels[0][f.mask].max()) for f in seen]
    assert max(on) > 2.0 * good_peak, (on, good_peak)


def test_a_highlight_is_taken_out_of_the_colour_ratio_and_a_stain_is_not():
    reference = np.array([[0.10, 0.20, 0.55], [0.80, 0.60, 0.38]])
    highlight = reference + 0.3  # white light added to every channel
    assert np.abs(highlight_free_log_ratio(highlight, reference)).max() < 1e-9
    stain = 0.3 * reference + 0.7 * np.array([0.24, 0.16, 0.10])  # darker and browner
    stained = highlight_free_log_ratio(stain, reference)
    assert (stained[1] < -0.3).all()  # on wood: darker in every channel
    assert np.ptp(stained[0]) > 1.0  # on blue paint: a different hue
    shaded = 0.8 * reference  # less light: every channel darker by the same factor (before the shading correction)
    ratio = highlight_free_log_ratio(shaded, reference)
    assert np.ptp(ratio[0]) < 0.05 and ratio[0].mean() < -0.1


def _square_view(size: int, margin: int = 8):
    """Pixel coordinates of a size x size view and the mask of a part filling it but for ``margin`` px."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    seen = np.zeros((size, size), bool)
    seen[margin:-margin, margin:-margin] = True
    return yy, xx, seen


def test_colour_contrast_ignores_a_smooth_light_change_and_finds_a_blob():
    H = W = 64
    yy, xx, valid = _square_view(64)
    rng = np.random.default_rng(0)
    lighting = np.broadcast_to(0.004 * xx + 0.1, (3, H, W))  # a light turned across the part: a smooth ramp
    texture = rng.normal(0.0, 0.05, (3, H, W))  # pixel-scale misregistration of the wood grain: zero mean
    nominal = colour_contrast(lighting + texture, valid, 2.5, 10.0)
    assert nominal.max() < 0.08 and (nominal[~valid] == 0).all()
    blob = ((yy - 32) ** 2 + (xx - 30) ** 2 < 16).astype(np.float32)
    stained = lighting + texture - 0.5 * blob  # a 40 % darker spot, 8 px wide
    found = colour_contrast(stained, valid, 2.5, 10.0)
    assert found.max() > 3 * nominal.max()
    assert np.hypot(*(np.array(np.unravel_index(found.argmax(), found.shape)) - [32, 30])) <= 2


def test_geometry_contrast_cancels_depth_noise_and_a_placement_tilt_and_finds_a_dent():
    H = W = 96
    yy, xx, observed = _square_view(96)
    rng = np.random.default_rng(1)
    tilt = 0.01 * (xx - 48)  # a part placed a little off: the residual ramps across the face (+-0.4 tolerances)
    noise = rng.normal(0.0, 1.0, (H, W))  # per-pixel depth noise of 1 tolerance
    extra, inside = geometry_contrast(tilt + noise, observed, 3.0, 40.0)
    nominal = max(extra.max(), inside.max())
    assert nominal < 0.7 and (extra[~observed] == 0).all() and (inside[~observed] == 0).all()
    # the raw per-pixel noise is far above the dent's depth; the averaged contrast is not
    assert np.abs(noise).max() > 3.0
    dent = 3.0 * np.clip(1.0 - ((yy - 40) ** 2 + (xx - 60) ** 2) / 64.0, 0.0, None) ** 2  # 8 px radius, 3 tolerances deep
    extra_d, inside_d = geometry_contrast(tilt + noise - dent, observed, 3.0, 40.0)
    assert inside_d.max() > 2 * nominal
    assert np.hypot(*(np.array(np.unravel_index(inside_d.argmax(), inside_d.shape)) - [40, 60])) <= 3
    assert extra_d[32:49, 52:69].max() < nominal  # a dent is not extra material


def _step_view(size: int = 64):
    """An expected depth map: a square part 0.5 m away, its right third a face 20 mm nearer (a depth edge inside)."""
    yy, xx, seen = _square_view(size)
    expected = np.where(seen, np.where(xx >= 40, 0.48, 0.5), 0.0).astype(np.float32)
    return yy, xx, expected


def test_see_through_finds_a_notch_and_a_hole_and_tolerates_a_pixel_of_misplacement():
    yy, xx, expected = _step_view()
    rng = np.random.default_rng(2)
    observed = np.where(expected > 0, expected + rng.normal(0.0, 0.0005, expected.shape), 0.0).astype(np.float32)
    assert not see_through(expected, observed, 0.003).any()
    # a part placed one pixel off: its outline and its depth edge move by a pixel, which the margin absorbs
    shifted = np.roll(observed, 1, axis=1)
    assert not see_through(expected, shifted, 0.003).any()
    # a chunk gone from the left edge (the camera sees nothing there) and a hole showing a surface 10 mm behind
    damaged = observed.copy()
    notch = (np.abs(yy - 30) < 4) & (xx < 14)
    damaged[notch] = 0.0
    hole = (np.abs(yy - 20) < 3) & (np.abs(xx - 25) < 3)
    damaged[hole] += 0.010
    found = see_through(expected, damaged, 0.003)
    assert found[hole].all()
    assert found[notch & (xx >= 9)].all()  # one pixel in from the outline (x = 8) on
    assert not found[~(notch | hole)].any()
    # less than the gap behind (a dent) is not seen through
    dented = observed.copy()
    dented[hole] += 0.002
    assert not see_through(expected, dented, 0.003).any()


def test_expected_depth_is_where_a_good_view_sees_the_part(scene):
    surface, good, _ = scene
    T = good.gt.T_world_part
    for f in good.frames:
        expected = expected_depth(surface, f.c2w, f.intrinsics, T)
        both = (expected > 0) & (f.depth > 0)
        union = (expected > 0) | (f.depth > 0)
        assert both.sum() > 0.9 * union.sum()  # the same outline to within its edge pixels
        assert np.median(np.abs(expected[both] - f.depth[both])) < 0.001
        gap = SEE_THROUGH_GAP_TOLS * surface.typical_geometry_tol
        assert see_through(expected, f.depth, gap).sum() <= 0.002 * (f.depth > 0).sum()


def test_a_chunk_cut_from_the_outline_is_seen_through(scene):
    from agent.capture import Frame

    surface, good, _ = scene
    f = good.frames[0]
    T = good.gt.T_world_part
    gap = SEE_THROUGH_GAP_TOLS * surface.typical_geometry_tol
    before = see_through(expected_depth(surface, f.c2w, f.intrinsics, T), f.depth, gap)
    # cut a disc of 5 px radius out of the part, 3 px in from where its outline is leftmost (the camera now sees the backdrop there)
    ys, xs = np.nonzero(f.depth > 0)
    y0, x0 = int(np.median(ys[xs == xs.min()])), int(xs.min()) + 3
    yy, xx = np.mgrid[0 : f.depth.shape[0], 0 : f.depth.shape[1]]
    chunk = ((yy - y0) ** 2 + (xx - x0) ** 2 <= 25) & (f.depth > 0)
    cut = Frame(name=f.name, image=f.image, intrinsics=f.intrinsics, c2w=f.c2w, depth=np.where(chunk, 0.0, f.depth).astype(np.float32))
    r = surface_residuals(surface, cut, T)
    assert (r.see_through & chunk).sum() >= 10
    assert not (r.see_through & ~chunk & ~before).any()
    # the channel inspection maps, and the depth it fuses them through: the chunk is placed where the material was
    from agent.anomaly import SURFACE_CHANNELS, surface_channel_maps

    maps = surface_channel_maps(surface, cut, T)
    missing = maps.channels[SURFACE_CHANNELS.index("missing")]
    assert chunk[np.unravel_index(missing.argmax(), missing.shape)]
    filled = chunk & r.see_through  # no depth there: the camera saw the backdrop
    np.testing.assert_allclose(maps.fusion_depth[filled], r.expected_depth[filled])
    np.testing.assert_array_equal(maps.fusion_depth[~chunk & (f.depth > 0)], f.depth[~chunk & (f.depth > 0)])


def test_broad_white_light_takes_out_a_broad_highlight_and_leaves_a_thin_pale_line():
    from agent.surface import broad_white_light

    shape = (40, 40)
    reference = np.tile(np.array([0.50, 0.35, 0.20]), (40 * 40, 1))
    observed = reference.copy()
    yy, xx = np.divmod(np.arange(40 * 40), 40)
    patch = (np.abs(yy - 12) < 6) & (np.abs(xx - 12) < 6)
    observed[patch] += 0.25  # a highlight: white light over a 11 x 11 px patch
    line = (xx == 30) & (yy > 5) & (yy < 35)
    observed[line] = reference[line] * np.array([1.16, 1.33, 1.63])  # a pale scratch a pixel wide
    white = broad_white_light(observed, reference, np.ones(len(observed), bool), np.arange(40 * 40), shape, 2.0)
    centre = patch & (np.abs(yy - 12) < 2) & (np.abs(xx - 12) < 2)
    assert np.allclose(white[centre], 0.25, atol=0.01)  # the middle of the highlight: nearly all of it
    excess = (observed[line] - reference[line]).min(axis=1)
    assert (white[line] < 0.25 * excess).all()  # the line's own white light is not its surroundings'
    assert (white[~patch & ~line] == 0).all()
