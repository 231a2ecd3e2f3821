"""Voxel fusion of per-view anomaly maps, defect components and the anomaly_volume.npz format."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from agent.fusion import (
    DefectRegion,
    SparseVolume,
    SurfaceEvidenceAccumulator,
    VoxelAccumulator,
    find_defects,
    part_score,
    incidence_cosines,
    label_components,
)
from agent.geometry import Intrinsics, look_at, pixel_rays

# --------------------------------------------------------------------------------------------------
# A synthetic cell: a 10 cm square plate at z = PLATE_Z seen by six cameras on a ring.

VOXEL = 0.004
PLATE_Z = 0.5 * VOXEL  # mid-voxel, so the plate fills one voxel layer
HALF = 0.05
DEFECT = np.array([0.010, -0.015, PLATE_Z])  # seen by every view
FALSE_POSITIVE = np.array([-0.025, 0.020, PLATE_Z])  # appears in view "0" only
SIGMA = 0.006
K = Intrinsics.from_fov(math.radians(30.0), 96, 96)


def _cameras(n: int = 6) -> list[np.ndarray]:
    angles = 2 * np.pi * np.arange(n) / n
    return [look_at(np.array([0.12 * np.cos(a), 0.12 * np.sin(a), 0.30]), np.zeros(3)) for a in angles]


def _plate_depth(c2w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Depth of the plate (0 off the plate) and the world point of each pixel (H x W x 3)."""
    origins, dirs, z_per_length = pixel_rays(c2w, K)
    t = (PLATE_Z - origins[:, 2]) / dirs[:, 2]
    points = origins + t[:, None] * dirs
    on_plate = (t > 0) & (np.abs(points[:, 0]) <= HALF) & (np.abs(points[:, 1]) <= HALF)
    depth = np.where(on_plate, t * z_per_length, 0.0).reshape(K.height, K.width)
    return depth.astype(np.float32), points.reshape(K.height, K.width, 3)


def _bump(points: np.ndarray, centre: np.ndarray) -> np.ndarray:
    return np.exp(-np.sum((points - centre) ** 2, axis=-1) / (2 * SIGMA**2))


def _fused(rule: str) -> VoxelAccumulator:
    rng = np.random.default_rng(1)
    acc = VoxelAccumulator(VOXEL, rule=rule)
    for i, c2w in enumerate(_cameras()):
        depth, points = _plate_depth(c2w)
        score = _bump(points, DEFECT) + 0.03 * rng.random(depth.shape)
        if i == 0:
            score += _bump(points, FALSE_POSITIVE)
        acc.add_view(score.astype(np.float32), depth, c2w, K, view_id=str(i))
    return acc


def test_plate_is_sampled_finely_enough_for_the_voxel_size():
    depth, points = _plate_depth(_cameras()[0])
    footprint = np.linalg.norm(points[48, 49] - points[48, 48])
    assert depth.min() == 0 and (depth > 0).mean() > 0.2
    assert footprint < VOXEL / 2


def test_max_rule_keeps_both_blobs():
    defects = _fused("max").defects(threshold=0.5)
    assert len(defects) == 2
    by_distance = {
        "defect": min(defects, key=lambda d: np.linalg.norm(np.array(d.centroid) - DEFECT)),
        "fp": min(defects, key=lambda d: np.linalg.norm(np.array(d.centroid) - FALSE_POSITIVE)),
    }
    assert np.linalg.norm(np.array(by_distance["defect"].centroid) - DEFECT) < VOXEL
    assert np.linalg.norm(np.array(by_distance["fp"].centroid) - FALSE_POSITIVE) < VOXEL
    assert by_distance["defect"].frames == ("0", "1", "2", "3", "4", "5")
    assert by_distance["fp"].frames == ("0",)


@pytest.mark.parametrize("rule", ["topk", "mean"])
def test_agreement_rules_drop_the_single_view_false_positive(rule):
    acc = _fused(rule)
    defects = acc.defects(threshold=0.5)
    assert len(defects) == 1
    (defect,) = defects
    assert np.linalg.norm(np.array(defect.centroid) - DEFECT) < VOXEL
    assert defect.frames == ("0", "1", "2", "3", "4", "5")
    # The false positive is damped well below the threshold; the real defect keeps its level.
    volume = acc.volume()
    near_fp = np.linalg.norm(volume.centres() - FALSE_POSITIVE, axis=1) < 1.5 * VOXEL
    assert volume.score[near_fp].max() < 0.45
    assert defect.peak_score > 0.8 * _fused("max").defects(0.5)[0].peak_score


def test_default_rule_is_topk_and_volume_is_consistent():
    acc = _fused("topk")
    assert VoxelAccumulator(VOXEL).rule == "topk"
    volume = acc.volume()
    assert volume.ijk.dtype == np.int32 and volume.ijk.min() == 0
    assert volume.score.dtype == np.float32
    # One voxel layer at the plate height, covering about the plate's 10 cm x 10 cm.
    assert np.allclose(volume.centres()[:, 2], PLATE_Z)
    assert 20 ** 2 <= len(volume) <= 27 ** 2
    scores = acc.view_scores()
    assert scores.view_ids == tuple(str(i) for i in range(6))
    assert scores.voxel.max() == len(volume) - 1


def test_topk_damps_one_view_in_three_but_keeps_a_voxel_seen_once():
    from agent.fusion import fuse_view_scores

    # voxel 0: three views, one says 1.0; voxel 1: three views agree; voxel 2: a single view.
    voxel = np.array([0, 0, 0, 1, 1, 1, 2])
    score = np.array([1.0, 0.0, 0.0, 0.9, 0.8, 0.7, 1.0])
    weight = np.ones(7)
    fused = fuse_view_scores(voxel, score, weight, 3, "topk", agree_fraction=0.5, min_agree=2)
    np.testing.assert_allclose(fused, [0.5, 0.85, 1.0], rtol=1e-6)  # k = 2, 2, 1
    np.testing.assert_allclose(fuse_view_scores(voxel, score, weight, 3, "max"), [1.0, 0.9, 1.0])
    np.testing.assert_allclose(fuse_view_scores(voxel, score, weight, 3, "mean"), [1 / 3, 0.8, 1.0], rtol=1e-6)
    # Weights: a grazing view (weight 0.1) counts less.
    fused_w = fuse_view_scores(np.array([0, 0]), np.array([1.0, 0.0]), np.array([0.1, 1.0]), 1, "mean")
    np.testing.assert_allclose(fused_w, [0.1 / 1.1], rtol=1e-6)


def _split_fused(prior_views: float = 3.0, geometry_scale: float = 1.0) -> SurfaceEvidenceAccumulator:
    """Six views of the plate: independent signed geometry noise (sd 1) everywhere, a dent (-2 in every view) at
    DEFECT, a colour blob at FALSE_POSITIVE in view "0" only."""
    rng = np.random.default_rng(3)
    acc = SurfaceEvidenceAccumulator(VOXEL, appearance_scale=0.5, geometry_scale=geometry_scale, prior_views=prior_views)
    for i, c2w in enumerate(_cameras()):
        depth, points = _plate_depth(c2w)
        geometry = (rng.normal(0.0, 1.0, depth.shape) - 2.0 * _bump(points, DEFECT)).astype(np.float32)
        appearance = (_bump(points, FALSE_POSITIVE) if i == 0 else np.zeros(depth.shape)).astype(np.float32)
        acc.add_view(appearance, geometry, depth, c2w, K, str(i))
    return acc


def test_split_fusion_averages_signed_geometry_over_views_and_keeps_a_consistent_dent():
    acc = _split_fused()
    appearance, geometry = acc.evidence()
    centres = appearance.centres()
    at_dent = np.linalg.norm(centres[:, :2] - DEFECT[:2], axis=1) < 0.5 * VOXEL
    far = np.linalg.norm(centres[:, :2] - DEFECT[:2], axis=1) > 4 * SIGMA
    # the noise's mean over the views (and pixels) that saw a voxel, shrunk by 6 / (6 + 3), stays well below the dent
    assert geometry[far].max() < 0.7
    assert geometry[at_dent].max() > 2.0 * geometry[far].max()
    # rectified per view first (the combined maps' top-k), the same noise reads as evidence as high as the dent
    rectified = VoxelAccumulator(VOXEL)
    rng = np.random.default_rng(3)
    for i, c2w in enumerate(_cameras()):
        depth, points = _plate_depth(c2w)
        rectified.add_view(np.abs(rng.normal(0.0, 1.0, depth.shape) - 2.0 * _bump(points, DEFECT)).astype(np.float32), depth, c2w, K, str(i))
    noise = rectified.volume()
    assert noise.score[np.linalg.norm(noise.centres()[:, :2] - DEFECT[:2], axis=1) > 4 * SIGMA].max() > geometry[far].max() * 1.5
    # the volume: the larger of appearance / its scale and geometry / its scale, on the appearance voxels
    volume = acc.volume()
    assert np.array_equal(volume.ijk, appearance.ijk)
    np.testing.assert_allclose(volume.score, np.maximum(appearance.score / 0.5, geometry), rtol=1e-5)
    # a voxel seen by n views is shrunk by n / (n + prior): without the prior the geometry noise is higher
    _, unshrunk = _split_fused(prior_views=0.0).evidence()
    assert np.all(unshrunk >= geometry - 1e-6) and unshrunk[far].max() > geometry[far].max()


def test_split_fusion_scales_and_frames_name_the_views_that_saw_the_evidence():
    acc = _split_fused(geometry_scale=0.2)
    volume = acc.volume()
    defects = find_defects(volume, 1.0, 1, acc.view_scores())
    near = [d for d in defects if np.linalg.norm(np.array(d.centroid[:2]) - DEFECT[:2]) < 2 * SIGMA]
    assert near and len(near[0].frames) >= 4  # the dent: every view's own geometry evidence is over the threshold
    blob = [d for d in defects if np.linalg.norm(np.array(d.centroid[:2]) - FALSE_POSITIVE[:2]) < 2 * SIGMA]
    assert blob and "0" in blob[0].frames  # the colour blob of view "0", kept by the appearance's top-k (seen once)


def test_split_fusion_without_geometry_is_the_appearance_fusion():
    plain = VoxelAccumulator(VOXEL)
    split = SurfaceEvidenceAccumulator(VOXEL, appearance_scale=2.0)
    for i, c2w in enumerate(_cameras(3)):
        depth, points = _plate_depth(c2w)
        m = _bump(points, DEFECT).astype(np.float32)
        plain.add_view(m, depth, c2w, K, str(i))
        split.add_view(m, None, depth, c2w, K, str(i))
    np.testing.assert_allclose(split.volume().score, plain.volume().score / 2.0, rtol=1e-6)
    with pytest.raises(ValueError, match="geometry_scale"):
        SurfaceEvidenceAccumulator(VOXEL, geometry_scale=0.0)


def test_incidence_cosine_of_plate_matches_geometry():
    c2w = _cameras()[0]
    depth, points = _plate_depth(c2w)
    cos = incidence_cosines(depth, c2w, K)
    ray = c2w[:3, 3] - points
    expected = ray[..., 2] / np.linalg.norm(ray, axis=-1)  # plate normal is +z
    inner = depth > 0
    inner[1:-1, 1:-1] &= (depth[:-2, 1:-1] > 0) & (depth[2:, 1:-1] > 0) & (depth[1:-1, :-2] > 0) & (depth[1:-1, 2:] > 0)
    np.testing.assert_allclose(cos[inner], expected[inner], atol=1e-5)  # float32 depth
    assert np.all(cos[depth == 0] == 0)


def test_add_view_rejects_bad_input():
    acc = VoxelAccumulator(VOXEL)
    c2w = _cameras()[0]
    depth, _ = _plate_depth(c2w)
    good_map = np.zeros_like(depth)
    with pytest.raises(ValueError, match="anomaly map is"):
        acc.add_view(np.zeros((10, 10), np.float32), depth, c2w, K, "a")
    with pytest.raises(ValueError, match="depth must be finite"):
        acc.add_view(good_map, -depth, c2w, K, "a")
    with pytest.raises(ValueError, match="NaN"):
        acc.add_view(np.full_like(depth, np.nan), depth, c2w, K, "a")
    scaled = c2w.copy()
    scaled[:3, :3] *= 2
    with pytest.raises(ValueError, match="c2w is not rigid"):
        acc.add_view(good_map, depth, scaled, K, "a")
    acc.add_view(good_map, depth, c2w, K, "a")
    with pytest.raises(ValueError, match="already added"):
        acc.add_view(good_map, depth, c2w, K, "a")
    with pytest.raises(ValueError, match="no views"):
        VoxelAccumulator(VOXEL).volume()
    with pytest.raises(ValueError, match="fusion rule"):
        VoxelAccumulator(VOXEL, rule="median")


# --------------------------------------------------------------------------------------------------
# Components


def test_components_use_26_connectivity_and_min_size():
    ijk = np.array(
        [
            [0, 0, 0], [1, 1, 1],  # corner-touching: one component under 26-connectivity
            [5, 5, 5],  # isolated single voxel
            [9, 0, 0], [9, 1, 0], [9, 2, 0],  # a line of three
            [0, 0, 5],  # below threshold
        ]
    )
    score = np.array([2.0, 1.5, 3.0, 1.2, 1.4, 1.1, 0.5], np.float32)
    origin = np.array([1.0, 2.0, 3.0])
    volume = SparseVolume(0.5, origin, ijk, score)
    defects = find_defects(volume, threshold=1.0)
    assert [d.n_voxels for d in defects] == [1, 2, 3]  # highest peak first
    assert [d.id for d in defects] == [1, 2, 3]
    pair = defects[1]
    assert pair.peak_score == pytest.approx(2.0)
    np.testing.assert_allclose(pair.bbox_min, origin)
    np.testing.assert_allclose(pair.bbox_max, origin + 2 * 0.5)
    np.testing.assert_allclose(pair.centroid, origin + 0.5 * np.array([1.0, 1.0, 1.0]))
    assert [d.n_voxels for d in find_defects(volume, threshold=1.0, min_voxels=2)] == [2, 3]
    assert find_defects(volume, threshold=10.0) == []
    assert pair.frames == ()  # no view scores given


def test_defects_convert_to_the_verdict_defect_message():
    from agent.contract import VerdictDefect

    (region,) = _fused("topk").defects(threshold=0.5)
    message = VerdictDefect(**dataclasses.asdict(region)).to_dict()
    assert VerdictDefect.from_dict(json.loads(json.dumps(message))).to_dict() == message
    assert message["frames"] == ["0", "1", "2", "3", "4", "5"] and message["n_voxels"] == region.n_voxels


def test_label_components_counts_face_edge_and_corner_neighbours_alike():
    n, labels = label_components(np.array([[0, 0, 0], [1, 0, 0], [2, 1, 0], [3, 2, 1], [6, 0, 0]]))
    assert n == 2
    assert len(set(labels[:4].tolist())) == 1 and labels[4] != labels[0]


# --------------------------------------------------------------------------------------------------
# anomaly_volume.npz


def _volume() -> SparseVolume:
    return SparseVolume(0.002, np.array([0.1, -0.2, 0.3]), np.array([[0, 0, 0], [1, 2, 3]]), np.array([0.5, 2.5]))


def test_npz_round_trip_has_exactly_the_spec_keys_and_dtypes(tmp_path):
    path = tmp_path / "anomaly_volume.npz"
    _volume().save_npz(path)
    with np.load(path) as data:
        assert sorted(data.files) == ["ijk", "origin", "score", "voxel_size"]
        assert data["voxel_size"].dtype == np.float64 and data["voxel_size"].shape == ()
        assert data["origin"].dtype == np.float64 and data["origin"].shape == (3,)
        assert data["ijk"].dtype == np.int32 and data["ijk"].shape == (2, 3)
        assert data["score"].dtype == np.float32 and data["score"].shape == (2,)
    loaded = SparseVolume.load_npz(path)
    assert loaded.voxel_size == 0.002
    np.testing.assert_array_equal(loaded.origin, [0.1, -0.2, 0.3])
    np.testing.assert_array_equal(loaded.ijk, [[0, 0, 0], [1, 2, 3]])
    np.testing.assert_array_equal(loaded.score, np.float32([0.5, 2.5]))


def _write(path, **arrays):
    base = dict(
        voxel_size=np.float64(0.002), origin=np.zeros(3), ijk=np.zeros((1, 3), np.int32), score=np.ones(1, np.float32)
    )
    base.update(arrays)
    np.savez(path, **{k: v for k, v in base.items() if v is not None})


@pytest.mark.parametrize(
    "arrays, match",
    [
        (dict(score=None), r"missing key\(s\) \['score'\]"),
        (dict(voxel_size=np.float64(-1.0)), "voxel_size must be a positive"),
        (dict(voxel_size=np.array([0.002])), "voxel_size must be a float scalar"),
        (dict(origin=np.zeros(2)), "origin must be 3"),
        (dict(ijk=np.zeros((1, 2), np.int32)), "ijk must be M x 3"),
        (dict(ijk=np.zeros((1, 3), np.float32)), "ijk must have an integer dtype"),
        (dict(score=np.ones(2, np.float32)), "one value per voxel"),
        (dict(score=np.array([np.nan], np.float32)), "NaN"),
        (dict(ijk=np.zeros((2, 3), np.int32), score=np.ones(2, np.float32)), "same voxel more than once"),
        (dict(score=np.array([object()], dtype=object)), "anomaly_volume.npz"),
    ],
)
def test_npz_load_rejects_bad_files_naming_the_file(tmp_path, arrays, match):
    path = tmp_path / "anomaly_volume.npz"
    _write(path, **arrays)
    with pytest.raises(ValueError, match=match) as err:
        SparseVolume.load_npz(path)
    assert str(path) in str(err.value)


def test_npz_load_rejects_a_non_npz_file(tmp_path):
    path = tmp_path / "anomaly_volume.npz"
    path.write_text("not a zip")
    with pytest.raises(ValueError, match="not an npz"):
        SparseVolume.load_npz(path)
    with pytest.raises(FileNotFoundError):
        SparseVolume.load_npz(tmp_path / "missing.npz")


def test_defect_region_is_frozen():
    region = DefectRegion(1, (0.0, 0.0, 0.0), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), 1.0, 1, ())
    with pytest.raises(AttributeError):
        region.id = 2  # type: ignore[misc]


def test_part_score_is_the_highest_threshold_with_a_reportable_defect():
    # a lone peak of 5.0, a pair at (3.0, 2.5), a run of three at (2.0, 1.8, 1.2), far apart
    ijk = np.array([[0, 0, 0], [10, 0, 0], [11, 0, 0], [20, 0, 0], [21, 1, 0], [22, 1, 1]])
    score = np.array([5.0, 3.0, 2.5, 2.0, 1.8, 1.2], np.float32)
    volume = SparseVolume(0.01, np.zeros(3), ijk, score)
    assert part_score(volume, 1) == pytest.approx(5.0)
    assert part_score(volume, 2) == pytest.approx(2.5)  # the pair: min(3.0, 2.5)
    assert part_score(volume, 3) == pytest.approx(1.2)
    assert part_score(volume, 4) == 0.0  # no region of four voxels at any threshold
    assert part_score(SparseVolume(0.01, np.zeros(3), np.zeros((0, 3), np.int32), np.zeros(0, np.float32)), 2) == 0.0
    with pytest.raises(ValueError, match="min_voxels"):
        part_score(volume, 0)


def test_part_score_agrees_with_find_defects_on_random_volumes():
    rng = np.random.default_rng(3)
    for trial in range(30):
        n = int(rng.integers(1, 400))
        ijk = np.unique(rng.integers(0, 12, size=(n, 3)), axis=0).astype(np.int32)
        score = rng.choice([0.5, 1.0, 1.5, 2.0], size=len(ijk)).astype(np.float32) if trial % 3 == 0 else rng.gamma(2.0, 0.5, len(ijk)).astype(np.float32)
        volume = SparseVolume(0.01, np.zeros(3), ijk, score)
        for k in (1, 2, 5):
            s = part_score(volume, k)
            if s > 0:
                assert find_defects(volume, s, k), (trial, k)  # a defect at the score...
            above = score[score > s]
            if len(above):
                assert not find_defects(volume, float(above.min()), k), (trial, k)  # ...and none just above it
