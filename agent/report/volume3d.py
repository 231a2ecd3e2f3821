"""A part's anomaly volume in 3D: a coloured point cloud PLY (MeshLab, CloudCompare) and the report viewer's data.

Colours are the heatmaps' scale: jet over 0 .. 2 x threshold (blue = 0, green = threshold, red >= twice
it). Voxels of a reported defect (score >= threshold, centre inside the defect's box) keep full colour;
the others are faded toward grey (those below the threshold more), so that the defects stand out.

The PLY (binary little-endian, one ``vertex`` element) has per point ``x y z`` (float32, world frame,
metres: the voxel centres), ``red green blue`` (uchar), ``score`` (float32), ``defect_id`` (int32, 0 =
none) and ``kind`` (uchar: 0 voxel, 1 defect centroid, 2 corner of a defect's box). MeshLab shows the
colours; CloudCompare also offers ``score``, ``defect_id`` and ``kind`` as scalar fields.

``defects`` are any objects with ``id``, ``centroid``, ``bbox_min``, ``bbox_max`` and ``peak_score``
(agent.fusion.DefectRegion, agent.contract.VerdictDefect, storage.DefectRecord).
"""

from __future__ import annotations

import base64
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from plyfile import PlyData, PlyElement

from agent.fusion import SparseVolume

FADE_BELOW_THRESHOLD = 0.55  # how far voxels below the threshold are blended toward grey
FADE_OUTSIDE_DEFECTS = 0.3  # ... and voxels at or above it that belong to no reported defect
FADE_GREY = np.array([150.0, 150.0, 150.0])
MARKER_RGB = (255, 64, 255)  # defect centroids and box corners
KIND_VOXEL, KIND_CENTROID, KIND_CORNER = 0, 1, 2
PLY_DTYPE = [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1"),
             ("score", "<f4"), ("defect_id", "<i4"), ("kind", "u1")]  # fmt: skip
DEFAULT_VIEWER_POINTS = 40_000


def jet_colours(score: np.ndarray, threshold: float) -> np.ndarray:
    """N x 3 uint8 RGB: OpenCV's jet over 0 .. 2 x threshold, as the 2D heatmaps (agent.artifacts.map_overlay)."""
    score = np.nan_to_num(np.asarray(score, dtype=np.float64).reshape(-1), nan=0.0, posinf=2.0 * threshold)
    level = (np.clip(score / (2.0 * threshold), 0.0, 1.0) * 255).astype(np.uint8)
    return cv2.cvtColor(cv2.applyColorMap(level[:, None], cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB).reshape(-1, 3)


def defect_of_voxels(volume: SparseVolume, defects: Sequence[Any], threshold: float) -> np.ndarray:
    """Per voxel the id of the defect it belongs to (score >= threshold and centre inside the defect's box), else 0."""
    centres = volume.centres()
    ids = np.zeros(len(volume), np.int32)
    above = volume.score >= threshold
    for d in defects:
        inside = np.all((centres >= np.asarray(d.bbox_min)) & (centres <= np.asarray(d.bbox_max)), axis=1)
        ids[above & inside & (ids == 0)] = int(d.id)
    return ids


def voxel_colours(volume: SparseVolume, defect_ids: np.ndarray, threshold: float) -> np.ndarray:
    """N x 3 uint8: jet colours; full for voxels of a defect, faded toward grey for the others (more below the threshold)."""
    rgb = jet_colours(volume.score, threshold).astype(np.float64)
    fade = np.where(volume.score < threshold, FADE_BELOW_THRESHOLD, FADE_OUTSIDE_DEFECTS)
    fade[np.asarray(defect_ids) != 0] = 0.0
    rgb = (1 - fade[:, None]) * rgb + fade[:, None] * FADE_GREY
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def anomaly_point_cloud(volume: SparseVolume, defects: Sequence[Any], threshold: float) -> np.ndarray:
    """The PLY's vertices (structured array, :data:`PLY_DTYPE`): every voxel, then per defect its centroid and the 8 box corners."""
    defect_ids = defect_of_voxels(volume, defects, threshold)
    voxels = np.empty(len(volume), dtype=PLY_DTYPE)
    centres = volume.centres()
    rgb = voxel_colours(volume, defect_ids, threshold)
    for axis, name in enumerate("xyz"):
        voxels[name] = centres[:, axis]
    for channel, name in enumerate(("red", "green", "blue")):
        voxels[name] = rgb[:, channel]
    voxels["score"] = volume.score
    voxels["defect_id"] = defect_ids
    voxels["kind"] = KIND_VOXEL
    markers = []
    for d in defects:
        lo, hi = np.asarray(d.bbox_min, np.float64), np.asarray(d.bbox_max, np.float64)
        corners = [np.where(np.array(bits, bool), hi, lo) for bits in itertools.product((0, 1), repeat=3)]
        for kind, point in [(KIND_CENTROID, np.asarray(d.centroid, np.float64))] + [(KIND_CORNER, c) for c in corners]:
            markers.append((*point.astype(np.float32), *MARKER_RGB, float(d.peak_score), int(d.id), kind))
    return np.concatenate([voxels, np.array(markers, dtype=PLY_DTYPE)]) if markers else voxels


def write_anomaly_ply(path: str | Path, volume: SparseVolume, defects: Sequence[Any], threshold: float, *, part: str = "") -> Path:
    """Write :func:`anomaly_point_cloud` as a binary little-endian PLY (replaced atomically); returns the path."""
    path = Path(path)
    comments = [
        f"edge-inspection-agent anomaly volume{' of ' + part if part else ''}",
        "world (cell) frame, metres; points are voxel centres",
        f"voxel_size {volume.voxel_size:g} threshold {threshold:g}",
        "colour: jet over 0..2x threshold, faded below it; magenta: defect centroids and box corners",
        "kind: 0 voxel, 1 defect centroid, 2 defect box corner; defect_id 0: none",
    ]
    ply = PlyData([PlyElement.describe(anomaly_point_cloud(volume, defects, threshold), "vertex")], text=False, byte_order="<", comments=comments)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    ply.write(str(tmp))
    tmp.replace(path)
    return path


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(array).tobytes()).decode("ascii")


def viewer_payload(
    volume: SparseVolume,
    defects: Sequence[Any],
    threshold: float,
    *,
    cameras: Sequence[Sequence[float]] = (),
    max_points: int = DEFAULT_VIEWER_POINTS,
    seed: int = 0,
) -> dict[str, Any]:
    """The data of agent/report/viewer (see its src/viewer.js): voxels sorted by ascending score, at most
    ``max_points`` of them (every voxel at or above the threshold is kept first, the rest sampled at random,
    deterministically), as base64 little-endian arrays."""
    if max_points < 1:
        raise ValueError(f"max_points must be >= 1, got {max_points}")
    defect_ids = defect_of_voxels(volume, defects, threshold)
    rgb = voxel_colours(volume, defect_ids, threshold)
    n = len(volume)
    keep = np.arange(n)
    if n > max_points:
        rng = np.random.default_rng(seed)
        priority = np.where(volume.score >= threshold, 2.0, 0.0) + rng.random(n)  # above threshold first, then random
        keep = np.sort(np.argsort(-priority, kind="stable")[:max_points])
    order = keep[np.argsort(volume.score[keep], kind="stable")]
    ijk = volume.ijk[order].astype(np.int64)
    base = ijk.min(axis=0) if len(ijk) else np.zeros(3, np.int64)
    rel = ijk - base
    if len(rel) and rel.max() > np.iinfo(np.int16).max:
        raise ValueError(f"the volume spans {int(rel.max()) + 1} voxels along an axis; the viewer takes at most {np.iinfo(np.int16).max + 1}")
    return {
        "voxel_size": float(volume.voxel_size),
        "origin": [float(v) for v in volume.origin + base * volume.voxel_size],
        "ijk": _b64(rel.astype("<i2")),
        "rgb": _b64(rgb[order]),
        "score": _b64(volume.score[order].astype("<f4")),
        "threshold": float(threshold),
        "n_volume": int(n),
        "defects": [
            {"id": int(d.id), "min": [float(v) for v in d.bbox_min], "max": [float(v) for v in d.bbox_max],
             "centroid": [float(v) for v in d.centroid], "peak": float(d.peak_score)}
            for d in defects
        ],  # fmt: skip
        "cameras": [[float(v) for v in c] for c in cameras],
    }
