"""Metrics of ../shared/spec/metrics.md against hand-computed cases and a brute-force reference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from agent.eval.metrics import (
    accuracy_at_threshold,
    au_pro,
    evidence_near,
    image_auroc,
    located_auroc,
    pixel_auroc,
    pro_curve,
    resample_max,
    trapezoid_to_limit,
    v_aupro,
    voxelise_ground_truth,
)
from agent.fusion import SparseVolume

# --------------------------------------------------------------------------------------------------
# AUROC


def test_image_auroc_hand_computed_with_a_tie():
    # positives {0.5, 0.9}, negatives {0.5, 0.2}: pairs won 0.5 (tie) + 1 + 1 + 1 of 4.
    assert image_auroc([0.5, 0.5, 0.2, 0.9], [1, 0, 0, 1]) == pytest.approx(3.5 / 4)


def test_pixel_auroc_pools_all_pixels_of_all_views():
    maps = [np.array([[0.1, 0.4]]), np.array([[0.35, 0.8]])]
    masks = [np.array([[0, 0]], np.uint8), np.array([[255, 255]], np.uint8)]
    # positives {0.35, 0.8} vs negatives {0.1, 0.4}: 3 of 4 pairs ordered correctly.
    assert pixel_auroc(maps, masks) == pytest.approx(0.75)
    # The same data as one N x H x W array gives the same figure.
    assert pixel_auroc(np.stack(maps), np.stack(masks)) == pytest.approx(0.75)


@pytest.mark.parametrize(
    "call",
    [
        lambda: image_auroc([0.1, 0.2], [0, 0]),
        lambda: image_auroc([0.1, 0.2], [1, 1]),
        lambda: image_auroc([0.1, math.nan], [0, 1]),
        lambda: image_auroc([0.1, 0.2, 0.3], [0, 1]),
        lambda: image_auroc([0.1, 0.2], [0, 2]),
        lambda: pixel_auroc([np.zeros((2, 2))], [np.zeros((2, 2))]),
        lambda: pixel_auroc([np.zeros((2, 2))], [np.zeros((2, 3))]),
        lambda: pixel_auroc([np.zeros((2, 2))], []),
    ],
)
def test_auroc_rejects_degenerate_input(call):
    with pytest.raises(ValueError):
        call()


def test_one_class_error_says_why():
    with pytest.raises(ValueError, match="both nominal and defective"):
        image_auroc([0.1, 0.2], [0, 0])


# --------------------------------------------------------------------------------------------------
# AU-PRO

# Mask with pixels A=(0,0), B=(1,1), C=(1,2): A touches B only diagonally, so one region under
# 8-connectivity (the MVTec reference) and two ({A}, {B, C}) under 4-connectivity.
L_MASK = np.array([[1, 0, 0], [0, 1, 1], [0, 0, 0]], np.uint8)


def test_au_pro_uses_8_connectivity_hand_computed():
    scores = np.array([[0.9, 0.5, 0.2], [0.4, 0.6, 0.3], [0.1, 0.05, 0.0]])
    # Descending: A .9, B .6, ok .5, ok .4, C .3, ... With one region of 3 pixels the curve is
    # (0,0) (0,1/3) (0,2/3) (1/6,2/3) (1/3,2/3) (1/3,1) ... so PRO = 2/3 on FPR [0, 0.3].
    # (4-connectivity would give regions {A}, {B,C} and PRO = 3/4.)
    assert au_pro([scores], [L_MASK], fpr_limit=0.3) == pytest.approx(2 / 3)


def test_au_pro_interpolates_at_the_fpr_limit_and_merges_ties():
    # As above but C ties with the nominal pixel at 0.4: the curve jumps diagonally from
    # (1/6, 2/3) to (1/3, 1) and crosses the limit 0.3 on that segment.
    scores = np.array([[0.9, 0.5, 0.2], [0.4, 0.6, 0.4], [0.1, 0.05, 0.0]])
    y_at_limit = 2 / 3 + (1 - 2 / 3) * (0.3 - 1 / 6) / (1 / 3 - 1 / 6)  # = 14/15
    area = (1 / 6) * (2 / 3) + 0.5 * (2 / 3 + y_at_limit) * (0.3 - 1 / 6)  # = 49/225
    assert au_pro([scores], [L_MASK], fpr_limit=0.3) == pytest.approx(area / 0.3)
    assert area / 0.3 == pytest.approx(49 / 67.5)
    fprs, pros = pro_curve([scores], [L_MASK])
    np.testing.assert_allclose(fprs, [0, 0, 0, 1 / 6, 1 / 3, 1 / 2, 2 / 3, 5 / 6, 1, 1])
    np.testing.assert_allclose(pros, [0, 1 / 3, 2 / 3, 2 / 3, 1, 1, 1, 1, 1, 1])


def _brute_force_curve(maps, masks):
    """PRO and FPR evaluated at every distinct threshold by definition (4 for-loops, no tricks)."""
    from scipy import ndimage

    regions, ok = [], []
    for m, k in zip(maps, masks):
        lab, n = ndimage.label(k, structure=np.ones((3, 3)))
        regions += [m[lab == r] for r in range(1, n + 1)]
        ok.append(m[lab == 0])
    ok = np.concatenate(ok)
    xs, ys = [0.0], [0.0]
    for t in np.unique(np.concatenate([m.ravel() for m in maps]))[::-1]:
        xs.append(np.mean(ok >= t))
        ys.append(np.mean([np.mean(r >= t) for r in regions]))
    return np.array(xs + [1.0]), np.array(ys + [1.0])


def test_pro_curve_matches_brute_force_definition_with_ties():
    rng = np.random.default_rng(0)
    maps = [rng.integers(0, 12, size=(9, 11)).astype(float) for _ in range(3)]
    masks = [np.zeros((9, 11), bool) for _ in range(3)]
    masks[0][2:5, 3:6] = True
    masks[0][7, 9] = True
    masks[2][0:2, 0:8] = True
    masks[2][5, 5] = masks[2][6, 6] = True  # diagonal pair: one region
    for m, k in zip(maps, masks):
        m[k] += 3  # defects score higher on average
    fprs, pros = pro_curve(maps, masks)
    ref_x, ref_y = _brute_force_curve(maps, masks)
    np.testing.assert_allclose(fprs, ref_x, atol=1e-12)
    np.testing.assert_allclose(pros, ref_y, atol=1e-12)

    # Area: truncate at the limit with the interpolated end point, then a plain trapezoid sum.
    limit = 0.3
    inside = ref_x <= limit
    y_lim = np.interp(limit, ref_x, ref_y)
    x_t, y_t = np.append(ref_x[inside], limit), np.append(ref_y[inside], y_lim)
    expected = np.sum(0.5 * (y_t[1:] + y_t[:-1]) * np.diff(x_t)) / limit
    assert au_pro(maps, masks, fpr_limit=limit) == pytest.approx(expected)


def test_trapezoid_without_interpolation_when_the_limit_is_a_curve_point():
    assert trapezoid_to_limit([0, 0.3, 1], [0, 1, 1], 0.3) == pytest.approx(0.15)
    assert trapezoid_to_limit([0, 0.2, 0.4], [0, 1, 1], 0.3) == pytest.approx(0.1 + 0.1)


@pytest.mark.parametrize(
    "maps, masks, match",
    [
        ([np.ones((3, 3))], [np.zeros((3, 3))], "no defect regions"),
        ([np.ones((3, 3))], [np.ones((3, 3))], "no nominal"),
        ([np.full((3, 3), np.nan)], [L_MASK], "NaN"),
    ],
)
def test_au_pro_rejects_degenerate_input(maps, masks, match):
    with pytest.raises(ValueError, match=match):
        au_pro(maps, masks)


def test_au_pro_rejects_bad_limit():
    with pytest.raises(ValueError, match="fpr_limit"):
        au_pro([np.ones((3, 3))], [L_MASK], fpr_limit=0.0)


# --------------------------------------------------------------------------------------------------
# V-AUPRO

EVAL_VOXEL = 0.002


def _centres(ijk, size=EVAL_VOXEL):
    return (np.asarray(ijk, float) + 0.5) * size


def _tiny_scene():
    """A row of 200 nominal voxels, blob 1 = two voxels, blob 2 = one voxel; two points per voxel."""
    nominal = [(i, 0, 0) for i in range(200)]
    blob1 = [(0, 2, 0), (1, 2, 0)]
    blob2 = [(5, 2, 0)]
    ijk = nominal + blob1 + blob2
    ids = [0] * 200 + [1, 1] + [2]
    c = _centres(ijk)
    points = np.concatenate([c - 0.0003, c + 0.0004]).astype(np.float32)
    return points, np.array(ids * 2, np.int32)


def _predicted_half_size_volume():
    """Predicted on a 1 mm lattice (half the eval voxel): each eval voxel holds 8 predicted voxels."""
    cells = {
        (1, 5, 1): 0.9,  # in eval voxel (0,2,0), blob 1
        (0, 4, 0): 0.2,  # also in (0,2,0): the max (0.9) wins
        (2, 4, 0): 0.5,  # in (1,2,0), blob 1
        (10, 4, 0): 0.7,  # in (5,2,0), blob 2
        (14, 0, 0): 0.8,  # in nominal (7,0,0)
        (1000, 1000, 1000): 0.1,  # nowhere near: only sets the lowest score
    }
    return SparseVolume(0.001, np.zeros(3), np.array(list(cells)), np.array(list(cells.values())))


def test_v_aupro_hand_computed_with_resampling():
    points, ids = _tiny_scene()
    volume = _predicted_half_size_volume()
    # Eval voxels: blob1 (0.9, 0.5), blob2 0.7, nominal (7,0,0) 0.8, the other 199 nominal voxels
    # hold no prediction and take the lowest score 0.1. Curve: (0,0) (0,.25) (.005,.25) (.005,.75)
    # (.005,1) (1,1): area to FPR 0.01 = .005*.25 + .005*1 = .00625 -> 0.625.
    assert v_aupro(volume, points, ids, EVAL_VOXEL) == pytest.approx(0.625)
    # Pooling two copies of the same capture leaves the curve unchanged.
    assert v_aupro([volume, volume], [points, points], [ids, ids], EVAL_VOXEL) == pytest.approx(0.625)


def test_v_aupro_perfect_prediction_on_the_eval_lattice():
    points, ids = _tiny_scene()
    gt = voxelise_ground_truth(points, ids, EVAL_VOXEL)
    score = (~gt.nominal).astype(np.float32)
    perfect = SparseVolume(EVAL_VOXEL, gt.grid_origin, gt.ijk, score)
    assert v_aupro(perfect, points, ids, EVAL_VOXEL) == pytest.approx(1.0)


def test_resample_takes_max_of_overlapping_coarser_voxel():
    # One 4 mm voxel covers 2 x 2 x 2 eval voxels of 2 mm; a voxel outside it gets the lowest score.
    coarse = SparseVolume(0.004, np.zeros(3), np.array([[0, 0, 0], [5, 5, 5]]), np.array([3.0, -1.0]))
    targets = np.array([[0, 0, 0], [1, 1, 1], [1, 0, 1], [2, 0, 0]])
    np.testing.assert_allclose(resample_max(coarse, targets, 0.002, np.zeros(3)), [3.0, 3.0, 3.0, -1.0])


def test_voxel_holding_points_of_two_blobs_belongs_to_both():
    points = np.array([[0.0005, 0.0005, 0.0005], [0.0015, 0.0015, 0.0015], [0.0035, 0.0005, 0.0005]])
    gt = voxelise_ground_truth(points, np.array([1, 2, 0]), EVAL_VOXEL)
    assert len(gt.ijk) == 2
    assert sorted(gt.pair_blob.tolist()) == [1, 2]
    assert gt.nominal.tolist() == [False, True]


def test_v_aupro_rejects_ground_truth_without_blobs_and_bad_ids():
    points, ids = _tiny_scene()
    volume = _predicted_half_size_volume()
    with pytest.raises(ValueError, match="no defect regions"):
        v_aupro(volume, points, np.zeros_like(ids), EVAL_VOXEL)
    with pytest.raises(ValueError, match="defect_ids"):
        v_aupro(volume, points, ids[:-1], EVAL_VOXEL)
    with pytest.raises(ValueError, match="empty"):
        v_aupro(SparseVolume(0.001, np.zeros(3), np.zeros((0, 3), int), np.zeros(0)), points, ids, EVAL_VOXEL)


# --------------------------------------------------------------------------------------------------
# Accuracy at threshold


def test_accuracy_at_threshold_hand_computed():
    # good: 0.2 pass (right), 0.6 fail (false reject); defective: 0.9 fail, 0.4 pass (escape),
    # 0.5 == threshold -> fail.
    result = accuracy_at_threshold([0.2, 0.6, 0.9, 0.4, 0.5], [0, 0, 1, 1, 1], threshold=0.5)
    assert result.accuracy == pytest.approx(3 / 5)
    assert result.false_reject_rate == pytest.approx(1 / 2)
    assert result.escape_rate == pytest.approx(1 / 3)
    assert (result.n_good, result.n_defective) == (2, 3)


def test_accuracy_rates_are_nan_without_their_class():
    only_good = accuracy_at_threshold([0.1, 0.7], [0, 0], threshold=0.5)
    assert only_good.accuracy == pytest.approx(0.5)
    assert only_good.false_reject_rate == pytest.approx(0.5)
    assert math.isnan(only_good.escape_rate)
    with pytest.raises(ValueError, match="no parts"):
        accuracy_at_threshold([], [], threshold=0.5)


# --------------------------------------------------------------------------------------------------
# Evidence at the defect (beyond the spec)


def test_evidence_near_splits_the_volume_at_the_radius():
    # 1 cm voxels along x, centres at 0.5, 1.5, ... 4.5 cm; the defect's points at x = 0 and 0.2 cm
    vol = SparseVolume(0.01, np.zeros(3), np.array([[i, 0, 0] for i in range(5)]), np.array([0.3, 2.0, 5.0, 1.0, 0.7], np.float32))
    vol.origin = np.array([0.0, -0.005, -0.005])
    points = np.array([[0.0, 0.0, 0.0], [0.002, 0.0, 0.0]])
    # within 1 cm of a point: only the centre at 0.5 cm (the next, at 1.5 cm, is 1.3 cm from the nearer point)
    near, elsewhere = evidence_near(vol, points, 0.01)
    assert near == pytest.approx(0.3) and elsewhere == pytest.approx(5.0)
    near, elsewhere = evidence_near(vol, points, 0.014)  # now the 1.5 cm centre (1.3 cm away) counts too
    assert near == pytest.approx(2.0) and elsewhere == pytest.approx(5.0)
    near, elsewhere = evidence_near(vol, points, 0.05)  # everything near, nothing elsewhere
    assert near == pytest.approx(5.0) and elsewhere is None
    assert evidence_near(vol, points + 1.0, 0.01) == (None, pytest.approx(5.0))


def test_evidence_near_rejects_bad_input():
    vol = SparseVolume(0.01, np.zeros(3), np.zeros((1, 3), np.int64), np.ones(1, np.float32))
    with pytest.raises(ValueError, match="no defect points"):
        evidence_near(vol, np.zeros((0, 3)))
    with pytest.raises(ValueError, match="radius_m"):
        evidence_near(vol, np.zeros((1, 3)), 0.0)


def test_located_auroc_hand_computed():
    # good 0.2, 0.6; defects scored at their defect 0.9 (wins both), 0.4 (wins one), None (nothing near: loses both)
    assert located_auroc([0.2, 0.6], [0.9, 0.4, None]) == pytest.approx(3 / 6)
    assert located_auroc([0.2, 0.6], [0.9, 0.7]) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="good and defective"):
        located_auroc([], [0.5])
