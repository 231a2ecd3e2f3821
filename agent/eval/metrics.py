"""Evaluation metrics exactly as ../shared/spec/metrics.md defines them. Plain numpy, no I/O.

Conventions:
- Labels and masks: True / nonzero = defective (a part, a pixel). Scores: higher = more anomalous.
- Degenerate inputs raise ValueError with the reason: AUROCs need both classes; AU-PRO and
  V-AUPRO need at least one defect region and at least one nominal pixel / voxel; NaN or infinite
  scores are rejected. The one exception is :func:`accuracy_at_threshold`, whose false-reject
  (escape) rate is NaN when the set holds no good (defective) parts.
- AU-PRO follows the MVTec AD / MVTec 3D-AD reference evaluation code: regions are the
  8-connected components of each mask (``scipy.ndimage.label`` with a 3x3 structure of ones, as the
  reference), the PRO curve is exact (one point per distinct score, ties merged, starting at (0, 0)
  and ending at (1, 1)), and the area is a trapezoid sum up to the FPR limit with the curve
  linearly interpolated at exactly the limit, divided by the limit. The reference accumulates the
  FPR in float32; this code uses float64 (differences ~1e-7).
- V-AUPRO builds the same exact curve over voxels instead of sampling FPRs uniformly (SiM3D's text);
  for a fine curve the two agree, and the exact curve is the one that is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree
from sklearn.metrics import roc_auc_score

from agent.fusion import SparseVolume, key_box, key_rows, unique_voxels, voxel_indices, voxel_keys

Maps = Sequence[np.ndarray] | np.ndarray  # one H x W array, N x H x W, or a sequence of H x W arrays
# 8-connectivity, as the MVTec reference code (structure = np.ones((3, 3))).
PRO_STRUCTURE = np.ones((3, 3), dtype=int)
# A predicted voxel lies in a ground-truth voxel when their boxes overlap by more than this
# fraction of a ground-truth voxel edge on every axis (so touching faces do not count).
_OVERLAP_EPS = 1e-6


# --------------------------------------------------------------------------------------------------
# ROC AUC


def image_auroc(scores: Sequence[float] | np.ndarray, labels: Sequence | np.ndarray) -> float:
    """I-AUROC: ROC AUC of per-part (or per-image) scores, defective = positive."""
    scores = _finite_scores(np.asarray(scores, dtype=np.float64).reshape(-1), "scores")
    labels = _binary(labels, "labels").reshape(-1)
    if scores.shape != labels.shape:
        raise ValueError(f"scores ({scores.shape[0]}) and labels ({labels.shape[0]}) differ in length")
    _require_both_classes(labels, "parts")
    return float(roc_auc_score(labels, scores))


def pixel_auroc(maps: Maps, masks: Maps) -> float:
    """P-AUROC: ROC AUC over all pixels of all views pooled, defect-mask pixels positive."""
    flat_maps, flat_masks = _pooled_maps(maps, masks)
    _require_both_classes(flat_masks, "pixels")
    return float(roc_auc_score(flat_masks, flat_maps))


# --------------------------------------------------------------------------------------------------
# PRO curves


def pro_curve(maps: Maps, masks: Maps) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, PRO) curve of anomaly maps against defect masks (MVTec AD reference algorithm).

    Each 8-connected region of each mask is one region; FPR is over all pixels outside the masks
    of all maps. Maps may differ in size; each must match its mask.
    """
    maps, masks = _paired_maps(maps, masks)
    scores, fp_change, pro_change = [], [], []
    n_regions = 0
    for score_map, mask in zip(maps, masks):
        labelled, n = ndimage.label(mask, structure=PRO_STRUCTURE)
        sizes = np.bincount(labelled.reshape(-1), minlength=n + 1).astype(np.float64)
        per_label = np.zeros(n + 1)
        per_label[1:] = 1.0 / sizes[1:]
        scores.append(score_map.reshape(-1))
        fp_change.append((labelled == 0).reshape(-1).astype(np.float64))
        pro_change.append(per_label[labelled.reshape(-1)])
        n_regions += n
    return _exact_pro_curve(np.concatenate(scores), np.concatenate(fp_change), np.concatenate(pro_change), n_regions)


def au_pro(maps: Maps, masks: Maps, fpr_limit: float = 0.3) -> float:
    """AU-PRO@fpr_limit: area under the PRO curve for FPR 0..fpr_limit, divided by fpr_limit."""
    _check_limit(fpr_limit)
    fprs, pros = pro_curve(maps, masks)
    return trapezoid_to_limit(fprs, pros, fpr_limit) / fpr_limit


def trapezoid_to_limit(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under (x, y) for x in [x[0], x_max]; y at x_max is interpolated linearly.

    ``x`` must be sorted ascending (repeats allowed) and reach at least ``x_max``. Same result as
    the MVTec reference ``trapezoid(x, y, x_max)``.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or len(x) < 2:
        raise ValueError("x and y must be 1-D arrays of the same length (at least 2)")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("the curve contains NaN or infinite values")
    if np.any(np.diff(x) < 0):
        raise ValueError("x must be sorted ascending")
    if not x[0] <= x_max <= x[-1]:
        raise ValueError(f"x_max={x_max} lies outside the curve's range [{x[0]}, {x[-1]}]")
    correction = 0.0
    if not np.any(x == x_max):
        ins = int(np.searchsorted(x, x_max, side="right"))
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return float(np.sum(0.5 * (y[1:] + y[:-1]) * np.diff(x)) + correction)


def _exact_pro_curve(
    scores: np.ndarray, fp_change: np.ndarray, pro_change: np.ndarray, n_regions: int
) -> tuple[np.ndarray, np.ndarray]:
    """The curve from per-element score, FP increment (1 = nominal) and PRO increment (1/|region|)."""
    scores = _finite_scores(scores, "anomaly scores")
    n_ok = fp_change.sum()
    if n_regions == 0:
        raise ValueError("no defect regions in the ground truth: the PRO curve is undefined")
    if n_ok == 0:
        raise ValueError("no nominal elements in the ground truth: the false-positive rate is undefined")
    order = np.argsort(scores, kind="stable")[::-1]
    sorted_scores = scores[order]
    fprs = np.cumsum(fp_change[order]) / n_ok
    pros = np.cumsum(pro_change[order]) / n_regions
    # One point per distinct threshold: the last of each run of equal scores.
    last = np.append(np.diff(sorted_scores) != 0, True)
    fprs = np.minimum(fprs[last], 1.0)
    pros = np.minimum(pros[last], 1.0)
    return np.concatenate([[0.0], fprs, [1.0]]), np.concatenate([[0.0], pros, [1.0]])


# --------------------------------------------------------------------------------------------------
# V-AUPRO (SiM3D)


@dataclass(frozen=True)
class GroundTruthVoxels:
    """Ground truth voxelised on a lattice: non-empty voxels and their blob membership."""

    voxel_size: float
    grid_origin: np.ndarray  # (3,) world corner of voxel (0, 0, 0)
    ijk: np.ndarray  # (V, 3) int64 non-empty voxels (those holding surface points)
    pair_voxel: np.ndarray  # (P,) int64: row of ijk ...
    pair_blob: np.ndarray  # (P,) int64: ... belonging to this blob id (>= 1); one pair per (voxel, blob)

    @property
    def nominal(self) -> np.ndarray:
        """Boolean per voxel: True where the voxel belongs to no blob."""
        out = np.ones(len(self.ijk), bool)
        out[self.pair_voxel] = False
        return out


def voxelise_ground_truth(
    surface_points: np.ndarray, defect_ids: np.ndarray, voxel_size: float, grid_origin: np.ndarray | None = None
) -> GroundTruthVoxels:
    """Voxelise ``gt/surface_points.npy`` + ``gt/defect_ids.npy``: a voxel is non-empty when it holds a
    surface point and belongs to blob k when it holds a point with id k (possibly to several blobs)."""
    if not (math.isfinite(voxel_size) and voxel_size > 0):
        raise ValueError(f"voxel_size must be a positive finite number of metres, got {voxel_size}")
    grid_origin = np.zeros(3) if grid_origin is None else np.asarray(grid_origin, dtype=np.float64)
    points = np.asarray(surface_points, dtype=np.float64)
    ids = np.asarray(defect_ids)
    if points.ndim != 2 or points.shape[1] != 3 or len(points) == 0:
        raise ValueError(f"surface_points must be N x 3 with N >= 1, got shape {points.shape}")
    if not np.all(np.isfinite(points)):
        raise ValueError("surface_points contain NaN or infinite values")
    if ids.shape != (len(points),) or (ids.size and ids.dtype.kind not in "iu"):
        got = f"{ids.dtype} {ids.shape}"
        raise ValueError(f"defect_ids must be {len(points)} integers (one per surface point), got {got}")
    if ids.min() < 0:
        raise ValueError("defect_ids must be >= 0 (0 = nominal, k = blob k)")
    ijk, voxel_of_point = unique_voxels(voxel_indices(points, voxel_size, grid_origin))
    ids = ids.astype(np.int64)
    defect = ids > 0
    n_blobs_max = int(ids.max()) + 1
    pairs = np.unique(voxel_of_point[defect] * n_blobs_max + ids[defect])
    return GroundTruthVoxels(voxel_size, grid_origin, ijk, pairs // n_blobs_max, pairs % n_blobs_max)


def resample_max(volume: SparseVolume, ijk: np.ndarray, voxel_size: float, grid_origin: np.ndarray) -> np.ndarray:
    """Scores of ``volume`` on the voxels ``ijk`` of another lattice (float64 per voxel).

    A voxel takes the highest score of the predicted voxels overlapping it (positive volume), or
    the lowest score of the whole volume where none does.
    """
    if len(volume) == 0:
        raise ValueError("the predicted anomaly volume is empty")
    ijk = np.asarray(ijk, dtype=np.int64).reshape(-1, 3)
    out = np.full(len(ijk), -np.inf)
    lo_world = volume.origin + volume.ijk.astype(np.float64) * volume.voxel_size
    first = np.floor((lo_world - grid_origin) / voxel_size + _OVERLAP_EPS).astype(np.int64)
    last = np.ceil((lo_world + volume.voxel_size - grid_origin) / voxel_size - _OVERLAP_EPS).astype(np.int64) - 1
    extent = np.maximum(last - first + 1, 0)
    n_cover = extent.prod(axis=1)
    source = np.repeat(np.arange(len(volume)), n_cover)
    local = np.arange(len(source)) - np.repeat(np.cumsum(n_cover) - n_cover, n_cover)
    ext = extent[source]
    covered = first[source] + np.stack(
        [local // (ext[:, 1] * ext[:, 2]), (local // ext[:, 2]) % ext[:, 1], local % ext[:, 2]], axis=1
    )
    lo, dims = key_box(ijk, covered)
    target = key_rows(voxel_keys(ijk, lo, dims), voxel_keys(covered, lo, dims))
    hit = target >= 0
    np.maximum.at(out, target[hit], volume.score[source[hit]].astype(np.float64))
    out[np.isneginf(out)] = float(volume.score.min())
    return out


def v_aupro(
    volume: SparseVolume | Sequence[SparseVolume],
    surface_points: np.ndarray | Sequence[np.ndarray],
    defect_ids: np.ndarray | Sequence[np.ndarray],
    voxel_size: float,
    fpr_limit: float = 0.01,
    grid_origin: np.ndarray | None = None,
) -> float:
    """V-AUPRO@fpr_limit (SiM3D) of one capture, or of several pooled (pass sequences).

    The ground truth is voxelised at ``voxel_size`` on a lattice anchored at ``grid_origin``
    (default the world origin, the fusion accumulator's default lattice); each predicted volume is
    resampled onto it with :func:`resample_max`. PRO is averaged over all blobs of all captures and
    FPR taken over all their non-empty nominal voxels.
    """
    _check_limit(fpr_limit)
    if isinstance(volume, SparseVolume):
        volume, surface_points, defect_ids = [volume], [surface_points], [defect_ids]
    if not (len(volume) == len(surface_points) == len(defect_ids)) or len(volume) == 0:
        raise ValueError("give one volume, one surface_points and one defect_ids array per capture (at least one)")
    scores, fp_change, pro_change = [], [], []
    n_regions = 0
    for pred, points, ids in zip(volume, surface_points, defect_ids):
        gt = voxelise_ground_truth(points, ids, voxel_size, grid_origin)
        blob_ids, blob_of_pair = np.unique(gt.pair_blob, return_inverse=True)
        blob_sizes = np.bincount(blob_of_pair, minlength=len(blob_ids))
        pro = np.bincount(gt.pair_voxel, 1.0 / blob_sizes[blob_of_pair], len(gt.ijk))
        scores.append(resample_max(pred, gt.ijk, gt.voxel_size, gt.grid_origin))
        fp_change.append(gt.nominal.astype(np.float64))
        pro_change.append(pro)
        n_regions += len(blob_ids)
    fprs, pros = _exact_pro_curve(
        np.concatenate(scores), np.concatenate(fp_change), np.concatenate(pro_change), n_regions
    )
    return trapezoid_to_limit(fprs, pros, fpr_limit) / fpr_limit


# --------------------------------------------------------------------------------------------------
# Accuracy at the recipe's threshold


@dataclass(frozen=True)
class ThresholdAccuracy:
    """Verdict quality at one threshold; a part fails when its score >= threshold."""

    accuracy: float  # fraction of parts with the right verdict
    false_reject_rate: float  # good parts failed / good parts (NaN without good parts)
    escape_rate: float  # defective parts passed / defective parts (NaN without defective parts)
    n_good: int
    n_defective: int


def accuracy_at_threshold(
    scores: Sequence[float] | np.ndarray, labels: Sequence | np.ndarray, threshold: float
) -> ThresholdAccuracy:
    """Accuracy, false-reject and escape rates of the verdicts ``fail = score >= threshold``."""
    scores = _finite_scores(np.asarray(scores, dtype=np.float64).reshape(-1), "scores")
    labels = _binary(labels, "labels").reshape(-1)
    if scores.shape != labels.shape:
        raise ValueError(f"scores ({scores.shape[0]}) and labels ({labels.shape[0]}) differ in length")
    if len(scores) == 0:
        raise ValueError("no parts to score")
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    fail = scores >= threshold
    n_defective = int(labels.sum())
    n_good = len(labels) - n_defective
    return ThresholdAccuracy(
        accuracy=float(np.mean(fail == labels)),
        false_reject_rate=float(np.sum(fail & ~labels) / n_good) if n_good else math.nan,
        escape_rate=float(np.sum(~fail & labels) / n_defective) if n_defective else math.nan,
        n_good=n_good,
        n_defective=n_defective,
    )


# --------------------------------------------------------------------------------------------------
# Evidence at the defect (beyond the spec: is a part failed where its defect is?)

# A defect is located when the anomaly volume reaches the threshold within this distance of the defect's
# ground-truth surface points (the acceptance: an injected defect found within 1 cm of its true position).
LOCATE_RADIUS_M = 0.01


def evidence_near(volume: SparseVolume, points: np.ndarray, radius_m: float = LOCATE_RADIUS_M) -> tuple[float | None, float | None]:
    """The highest score of the voxels of ``volume`` whose centre lies within ``radius_m`` of one of ``points``
    (N x 3, world frame: a defect's ground-truth surface points), and the highest score of the others; None where
    there is no such voxel. Tells a part failed at its defect from one failed by evidence elsewhere."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if not (math.isfinite(radius_m) and radius_m > 0):
        raise ValueError(f"radius_m must be a positive number of metres, got {radius_m}")
    if len(points) == 0:
        raise ValueError("no defect points to look near")
    if len(volume) == 0:
        return None, None
    dist, _ = cKDTree(points).query(volume.centres(), distance_upper_bound=radius_m)
    near = dist <= radius_m
    score = volume.score.astype(np.float64)
    return (float(score[near].max()) if near.any() else None), (float(score[~near].max()) if (~near).any() else None)


def located_auroc(good_scores: Sequence[float] | np.ndarray, defect_scores: Sequence[float | None]) -> float:
    """I-AUROC counting only evidence at the defects: the good parts' scores against each defective part's score
    near its defect (:func:`evidence_near`; None, nothing scored near it, ranks below every good part)."""
    good = _finite_scores(np.asarray(good_scores, dtype=np.float64).reshape(-1), "good part scores")
    if len(good) == 0 or len(defect_scores) == 0:
        raise ValueError("located I-AUROC needs good and defective parts")
    floor = min([float(good.min())] + [s for s in defect_scores if s is not None]) - 1.0
    bad = np.array([floor if s is None else s for s in defect_scores], dtype=np.float64)
    return image_auroc(np.concatenate([good, _finite_scores(bad, "defect scores")]), np.r_[np.zeros(len(good)), np.ones(len(bad))])


# --------------------------------------------------------------------------------------------------
# Input checks


def _finite_scores(scores: np.ndarray, what: str) -> np.ndarray:
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"{what} contain NaN or infinite values")
    return scores


def _binary(labels, what: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.dtype == bool:
        return labels
    if labels.size and (labels.dtype.kind not in "iuf" or not np.all(np.isin(labels, (0, 1)))):
        raise ValueError(f"{what} must be booleans or 0/1 (1 = defective)")
    return labels.astype(bool)


def _require_both_classes(labels: np.ndarray, what: str) -> None:
    n_pos = int(labels.sum())
    if n_pos == 0 or n_pos == labels.size:
        kind = "defective" if n_pos else "nominal"
        raise ValueError(f"AUROC needs both nominal and defective {what}; all {labels.size} are {kind}")


def _paired_maps(maps, masks) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Anomaly maps (float64) and masks (bool, nonzero = defect) as equal-length lists of 2-D arrays."""
    maps = [np.asarray(m, dtype=np.float64) for m in _as_list(maps)]
    masks = [np.asarray(m) != 0 for m in _as_list(masks)]
    if len(maps) != len(masks) or not maps:
        raise ValueError(f"need one mask per anomaly map (at least one), got {len(maps)} maps and {len(masks)} masks")
    for i, (m, k) in enumerate(zip(maps, masks)):
        if m.ndim != 2 or m.shape != k.shape:
            raise ValueError(f"map {i} is {m.shape} but its mask is {k.shape}; both must be the same H x W")
        _finite_scores(m, f"anomaly map {i}")
    return maps, masks


def _as_list(arrays) -> list:
    """One 2-D array, an N x H x W array or a sequence of 2-D arrays -> list of arrays."""
    if isinstance(arrays, np.ndarray) and arrays.ndim == 2:
        return [arrays]
    return list(arrays)


def _pooled_maps(maps, masks) -> tuple[np.ndarray, np.ndarray]:
    maps, masks = _paired_maps(maps, masks)
    return np.concatenate([m.reshape(-1) for m in maps]), np.concatenate([k.reshape(-1) for k in masks])


def _check_limit(fpr_limit: float) -> None:
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
