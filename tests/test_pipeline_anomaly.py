"""The per-view evidence of agent.anomaly on small synthetic arrays (no backbone, no renderer)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from agent import anomaly


def _features(seed: int = 0, h: int = 8, w: int = 10, d: int = 16) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).normal(size=(1, d, h, w)).astype(np.float32))


def test_reference_distance_is_zero_for_the_same_features_and_ignores_gain():
    f = _features()
    assert np.abs(anomaly.reference_patch_distance(f, f.clone())).max() < 1e-5
    assert np.abs(anomaly.reference_patch_distance(f, 1.3 * f)).max() < 1e-5  # normalised per patch


def test_reference_window_absorbs_a_one_patch_shift_but_not_a_changed_patch():
    f = _features()
    shifted = torch.roll(f, shifts=1, dims=3)  # the reference misaligned by one patch
    exact = anomaly.reference_patch_distance(f, shifted, window=1)
    tolerant = anomaly.reference_patch_distance(f, shifted, window=3)
    assert exact[:, 1:-1].min() > 0.5  # unrelated random features
    assert tolerant[:, 1:-1].max() < 1e-5
    changed = f.clone()
    changed[0, :, 4, 5] = -changed[0, :, 4, 5]  # the observed patch differs from every reference patch near it
    d = anomaly.reference_patch_distance(changed, f, window=3)
    assert d[4, 5] > 0.5 and np.delete(d.ravel(), 4 * 10 + 5).max() < 1e-5


def test_reference_distance_rejects_bad_input():
    f = _features()
    with pytest.raises(ValueError, match="odd"):
        anomaly.reference_patch_distance(f, f, window=2)
    with pytest.raises(ValueError, match=r"\[1, D, h, w\]"):
        anomaly.reference_patch_distance(f, f[:, :, :4])


def _plane_view(depth_m: float, lo: int, hi: int, size: int = 32) -> anomaly.ReferenceView:
    depth = np.zeros((size, size), np.float32)
    depth[lo:hi, lo:hi] = depth_m
    alpha = (depth > 0).astype(np.float32)
    return anomaly.ReferenceView(np.zeros((size, size, 3), np.float32), alpha, depth)


def test_geometry_tolerates_a_one_pixel_misalignment_and_finds_a_bump():
    scale = 0.003
    ref = _plane_view(0.5, 8, 24)
    obs_depth = np.roll(ref.depth, 1, axis=1)  # silhouette one pixel off
    ev = anomaly.geometry_evidence(obs_depth > 0, obs_depth, ref, scale, tolerance_px=1)
    assert ev.max() == 0.0
    bump = obs_depth.copy()
    bump[12:20, 12:20] -= 0.006  # 6 mm of extra material towards the camera
    ev = anomaly.geometry_evidence(bump > 0, bump, ref, scale, tolerance_px=1)
    assert ev[15:17, 15:17].min() >= 1.5 and ev[:10].max() == 0.0
    hole = obs_depth.copy()
    hole[12:20, 12:20] = 0.0  # missing material: the camera sees the backdrop (no depth) where the part should be
    ev = anomaly.geometry_evidence(hole > 0, hole, ref, scale, tolerance_px=1)
    assert ev[15, 15] == 1.0


def test_geometry_counts_only_well_above_its_nominal_peak():
    maps = np.zeros((3, 4, 4), np.float32)
    maps[1, 0, 0] = 0.9  # reference channel just below its nominal peak
    maps[0, 1, 1] = 1.5  # memory channel above its nominal peak
    maps[2, 2, 2] = 2.0  # geometry at twice its nominal peak: weighted below 1
    maps[2, 3, 3] = 6.0  # geometry at 6x: counts (6 / 3 = 2)
    combined = anomaly.combine_channels(maps, [0.0, 0.0, 0.0], [1.0, 1.0, 1.0])
    assert combined[0, 0] == pytest.approx(0.9) and combined[1, 1] == pytest.approx(1.5)
    assert combined[2, 2] < 1.0 and combined[3, 3] == pytest.approx(2.0)


def test_surface_map_widens_evidence_by_a_pixel_and_keeps_it_local():
    maps = np.zeros((len(anomaly.SURFACE_CHANNELS), 256, 256), np.float32)
    maps[anomaly.SURFACE_CHANNELS.index("colour"), 100, 100] = 2.0  # one pixel of colour evidence at scale 2
    maps[anomaly.SURFACE_CHANNELS.index("extra"), 180, 60:90] = 1.0  # a thin line of extra material
    out = anomaly.combine_surface_channels(maps, scale=(1.0, 1.0, 2.0, 1.0))
    assert out.dtype == np.float32 and out.shape == (256, 256)
    assert np.unravel_index(np.argmax(out[:150]), (150, 256)) == (100, 100)  # the peak stays where it was
    assert 0.6 < out[100, 100] <= 1.0  # scaled by 1/2, widened over 3 x 3 and smoothed by 1 px: about 0.75
    assert out[100, 101] > 0.5 and out[99, 99] > 0.3  # the pixels next to it now share the evidence
    assert out[100, 104] < 0.02 and out[96, 100] < 0.02  # but it stays local
    assert out[181, 75] > 0.6 and out[183, 75] < 0.1  # the line is one pixel wider on each side, not more
    flat = anomaly.combine_surface_channels(np.full_like(maps, 0.3), scale=(1.0, 1.0, 1.0, 1.0))
    np.testing.assert_allclose(flat, 0.3, rtol=1e-5)  # a uniform level keeps its value
