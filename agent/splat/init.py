"""Initial Gaussians for training, from posed captures with known camera poses.

- :func:`init_from_depth`: back-project every foreground pixel (depth > 0) of every posed frame.
- :func:`init_from_visual_hull`: carve a voxel grid with foreground masks (no depth needed).

Foreground masks (:func:`foreground_masks`): ``depth > 0`` where a frame has depth (the simulator's
backdrop lies beyond the depth sensor's range, so it has depth 0); otherwise masks given by the
caller; otherwise :func:`backdrop_mask`, a colour-distance test against the backdrop colour estimated
from the image border (for a plain light-tent backdrop; it fails on parts the colour of the backdrop).

Frame.mask is the *defect* mask of the capture format, never the foreground.
"""

from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np
import torch
from scipy import ndimage

from agent import geometry
from agent.capture import Capture, Frame
from agent.splat.model import GaussianModel

INIT_OPACITY = 0.5


def _posed_frames(capture: Capture, what: str) -> list[tuple[int, Frame]]:
    frames = [(i, f) for i, f in enumerate(capture.frames) if f.c2w is not None]
    if not frames:
        raise ValueError(f"{what} needs frames with camera poses (c2w); the capture has none")
    return frames


def _gaussians(
    points: np.ndarray, colors: np.ndarray, scales: np.ndarray, opacity: float, sh_degree: int, dtype: torch.dtype
) -> GaussianModel:
    n = len(points)
    quats = torch.zeros(n, 4, dtype=dtype)
    quats[:, 0] = 1.0
    scales_t = torch.as_tensor(np.repeat(scales[:, None], 3, axis=1), dtype=dtype)
    colors_t = torch.as_tensor(np.clip(colors, 0.02, 0.98), dtype=dtype)
    return GaussianModel.from_activated(
        torch.as_tensor(points, dtype=dtype), quats, scales_t, torch.full((n,), opacity, dtype=dtype), colors_t, sh_degree
    )


def voxel_downsample(points: np.ndarray, voxel: float, *values: np.ndarray) -> tuple[np.ndarray, ...]:
    """Average points (and per-point values) within cubes of edge ``voxel``; returns (points, *values)."""
    ijk = np.floor(points / voxel).astype(np.int64)
    ijk -= ijk.min(axis=0)
    dims = ijk.max(axis=0) + 1
    keys = (ijk[:, 0] * dims[1] + ijk[:, 1]) * dims[2] + ijk[:, 2]  # one integer per voxel (1-D unique is fast)
    _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    out = []
    for arr in (points, *values):
        arr2 = arr.reshape(len(arr), -1).astype(np.float64)
        acc = np.zeros((len(counts), arr2.shape[1]))
        np.add.at(acc, inverse, arr2)
        acc /= counts[:, None]
        out.append(acc.reshape((len(counts),) + arr.shape[1:]))
    return tuple(out)


def init_from_depth(
    capture: Capture,
    max_points: int = 30_000,
    rng: np.random.Generator | None = None,
    *,
    voxel_size: float | None = None,
    frame_indices: Sequence[int] | None = None,
    opacity: float = INIT_OPACITY,
    sh_degree: int = 0,
    dtype: torch.dtype = torch.float32,
) -> GaussianModel:
    """Isotropic Gaussians on the surface seen by the depth maps of posed frames.

    Every pixel with depth > 0 is back-projected (:func:`geometry.backproject_depth`) with its colour
    and footprint ``z / f`` (metres per pixel). Points are averaged per voxel; the voxel edge starts at
    ``voxel_size`` (default: the median footprint) and grows (about as sqrt(count / max_points), at
    least 5 % a step) until at most ``max_points`` voxels remain. Scale = max(mean footprint in the
    voxel, voxel edge / 2); opacity ``opacity``. ``frame_indices`` restricts the frames used (e.g. the training split). ``rng`` only breaks ties
    when the voxel loop cannot reach ``max_points`` (it then samples voxels at random).
    """
    if max_points < 1:
        raise ValueError(f"max_points must be >= 1, got {max_points}")
    rng = np.random.default_rng(0) if rng is None else rng
    frames = _posed_frames(capture, "init_from_depth")
    if frame_indices is not None:
        wanted = set(int(i) for i in frame_indices)
        frames = [(i, f) for i, f in frames if i in wanted]
    pts, cols, foot = [], [], []
    for i, f in frames:
        if f.depth is None:
            continue
        if f.depth.shape != f.image.shape[:2]:
            raise ValueError(f"frame {f.name}: depth is {f.depth.shape} but the image is {f.image.shape[:2]}")
        K = f.intrinsics
        p, flat = geometry.backproject_depth(f.depth, f.c2w, K)
        pts.append(p)
        cols.append(f.image.reshape(-1, 3)[flat].astype(np.float64) / 255.0)
        foot.append(f.depth.reshape(-1)[flat].astype(np.float64) * (2.0 / (K.fx + K.fy)))
    if not pts or sum(len(p) for p in pts) == 0:
        raise ValueError("init_from_depth: no posed frame has a depth map with depth > 0 pixels")
    points, colors, footprint = np.concatenate(pts), np.concatenate(cols), np.concatenate(foot)
    voxel = float(np.median(footprint)) if voxel_size is None else float(voxel_size)
    if not voxel > 0:
        raise ValueError(f"voxel_size must be > 0, got {voxel}")
    for _ in range(150):
        p, c, s = voxel_downsample(points, voxel, colors, footprint)
        if len(p) <= max_points:
            break
        # a surface: the count falls about as 1 / voxel^2; jump most of the way, then creep up in 5 % steps
        voxel *= max(1.05, 0.97 * np.sqrt(len(p) / max_points))
    if len(p) > max_points:
        keep = rng.choice(len(p), max_points, replace=False)
        p, c, s = p[keep], c[keep], s[keep]
    scales = np.maximum(s, 0.5 * voxel)
    return _gaussians(p, c, scales, opacity, sh_degree, dtype)


# ---------------------------------------------------------------------------------------------
# Foreground masks and the visual hull


def backdrop_mask(image: np.ndarray, threshold: float = 0.05, border: int = 4) -> np.ndarray:
    """Foreground of an image in front of a plain backdrop: True where the colour differs from the backdrop.

    The backdrop colour is the per-channel median of a ``border``-pixel frame around the image; pixels
    farther than ``threshold`` (fraction of full scale, max over channels) after a 5x5 median blur are
    foreground; holes are filled and specks removed by morphological closing/opening.
    """
    img = cv2.medianBlur(np.ascontiguousarray(image), 5).astype(np.float32) / 255.0
    frame = np.concatenate([img[:border].reshape(-1, 3), img[-border:].reshape(-1, 3),
                            img[:, :border].reshape(-1, 3), img[:, -border:].reshape(-1, 3)])  # fmt: skip
    bg = np.median(frame, axis=0)
    fg = (np.abs(img - bg).max(axis=2) > threshold).astype(np.uint8)
    kernel = np.ones((3, 3), np.uint8)
    fg = cv2.morphologyEx(fg, cv2.MORPH_CLOSE, kernel, iterations=2)
    fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, kernel)
    return fg.astype(bool)


def foreground_masks(capture: Capture, masks: Sequence[np.ndarray] | None = None) -> list[np.ndarray]:
    """One H x W bool foreground mask per frame: ``masks[i]`` if given, else depth > 0, else :func:`backdrop_mask`."""
    if masks is not None and len(masks) != len(capture.frames):
        raise ValueError(f"got {len(masks)} foreground masks for {len(capture.frames)} frames")
    out = []
    for i, f in enumerate(capture.frames):
        if masks is not None:
            m = np.asarray(masks[i], dtype=bool)
            if m.shape != f.image.shape[:2]:
                raise ValueError(f"foreground mask {i} is {m.shape}, frame {f.name}'s image is {f.image.shape[:2]}")
        elif f.depth is not None:
            m = f.depth > 0
        else:
            m = backdrop_mask(f.image)
        out.append(m)
    return out


def _look_target(poses: list[np.ndarray]) -> np.ndarray:
    """Least-squares point closest to every camera's optical axis."""
    A, b = np.zeros((3, 3)), np.zeros(3)
    for T in poses:
        d = -T[:3, 2] / np.linalg.norm(T[:3, 2])  # OpenGL: the camera looks along -z
        P = np.eye(3) - np.outer(d, d)
        A += P
        b += P @ T[:3, 3]
    return np.linalg.lstsq(A, b, rcond=None)[0]


def carve_visual_hull(
    capture: Capture,
    masks: Sequence[np.ndarray] | None = None,
    resolution: int = 96,
    bounds: tuple[np.ndarray, np.ndarray] | None = None,
    dilate_px: int = 1,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Occupancy of a ``resolution``^3 voxel grid carved by the foreground masks of the posed frames.

    A voxel centre survives when every view it projects into (in front of the camera, inside the image)
    sees foreground there (masks dilated by ``dilate_px``) and at least one view sees it.
    ``bounds`` = (lo, hi) world corners; default: a cube around the point the cameras look at, as wide as
    the smallest view's footprint there. Returns (occupied [R,R,R] bool, lo corner, voxel edge).
    """
    posed = _posed_frames(capture, "carve_visual_hull")
    fg_all = foreground_masks(capture, masks)
    if bounds is None:
        centre = _look_target([f.c2w for _, f in posed])
        half = min(
            np.linalg.norm(f.c2w[:3, 3] - centre) * 0.5 * min(f.intrinsics.width / f.intrinsics.fx, f.intrinsics.height / f.intrinsics.fy)
            for _, f in posed
        )
        lo, hi = centre - half, centre + half
    else:
        lo, hi = (np.asarray(b, dtype=np.float64) for b in bounds)
    edge = float((hi - lo).max()) / resolution
    axis = (np.arange(resolution) + 0.5) * edge
    gx, gy, gz = np.meshgrid(lo[0] + axis, lo[1] + axis, lo[2] + axis, indexing="ij")
    centres = np.stack([gx.ravel(), gy.ravel(), gz.ravel()], 1)
    alive = np.ones(len(centres), dtype=bool)
    seen = np.zeros(len(centres), dtype=bool)
    kernel = np.ones((2 * dilate_px + 1, 2 * dilate_px + 1), np.uint8)
    for i, f in posed:
        fg = fg_all[i].astype(np.uint8)
        if dilate_px > 0:
            fg = cv2.dilate(fg, kernel)
        idx = np.nonzero(alive)[0]
        uv, z = geometry.project_points(centres[idx], f.c2w, f.intrinsics)
        inside = (z > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < f.intrinsics.width) & (uv[:, 1] >= 0) & (uv[:, 1] < f.intrinsics.height)
        ii = np.clip(np.floor(uv[:, 0]), 0, f.intrinsics.width - 1).astype(np.int64)
        jj = np.clip(np.floor(uv[:, 1]), 0, f.intrinsics.height - 1).astype(np.int64)
        hit = fg[jj, ii] > 0
        alive[idx[inside & ~hit]] = False
        seen[idx[inside]] = True
    occupied = (alive & seen).reshape(resolution, resolution, resolution)
    return occupied, lo, edge


def init_from_visual_hull(
    capture: Capture,
    max_points: int = 30_000,
    rng: np.random.Generator | None = None,
    *,
    masks: Sequence[np.ndarray] | None = None,
    resolution: int = 96,
    bounds: tuple[np.ndarray, np.ndarray] | None = None,
    opacity: float = INIT_OPACITY,
    sh_degree: int = 0,
    dtype: torch.dtype = torch.float32,
) -> GaussianModel:
    """Gaussians on the surface voxels of the visual hull (occupied voxels with an empty 6-neighbour).

    Colour: the mean pixel colour over the views facing the voxel's outward normal (normal = minus the
    gradient of the smoothed occupancy; views with cos > 0.3, else all views that see it). Occlusion is not
    modelled; training corrects colours. Scale = voxel edge / 2 (grown if subsampled), opacity ``opacity``.
    """
    rng = np.random.default_rng(0) if rng is None else rng
    occ, lo, edge = carve_visual_hull(capture, masks, resolution, bounds)
    if not occ.any():
        raise ValueError("init_from_visual_hull: the visual hull is empty (check the poses and foreground masks)")
    pad = np.pad(occ, 1)
    empty_nb = np.zeros_like(occ)
    for ax in range(3):
        for s in (-1, 1):
            empty_nb |= ~np.roll(pad, s, axis=ax)[1:-1, 1:-1, 1:-1]
    surface = occ & empty_nb
    ijk = np.argwhere(surface)
    points = lo + (ijk + 0.5) * edge
    smooth = ndimage.gaussian_filter(pad.astype(np.float64), sigma=1.0)
    grad = np.stack(np.gradient(smooth), axis=-1)[1:-1, 1:-1, 1:-1][surface]
    normals = -grad / np.maximum(np.linalg.norm(grad, axis=1, keepdims=True), 1e-9)
    scale = 0.5 * edge
    if len(points) > max_points:
        keep = rng.choice(len(points), max_points, replace=False)
        points, normals = points[keep], normals[keep]
        scale *= np.sqrt(len(ijk) / max_points)
    colors = _project_colors(capture, points, normals)
    return _gaussians(points, colors, np.full(len(points), scale), opacity, sh_degree, dtype)


def _project_colors(capture: Capture, points: np.ndarray, normals: np.ndarray) -> np.ndarray:
    acc_face, n_face = np.zeros((len(points), 3)), np.zeros(len(points))
    acc_all, n_all = np.zeros((len(points), 3)), np.zeros(len(points))
    for _, f in _posed_frames(capture, "colour projection"):
        K = f.intrinsics
        uv, z = geometry.project_points(points, f.c2w, K)
        inside = (z > 0) & (uv[:, 0] >= 0) & (uv[:, 0] < K.width) & (uv[:, 1] >= 0) & (uv[:, 1] < K.height)
        ii = np.clip(np.floor(uv[:, 0]), 0, K.width - 1).astype(np.int64)
        jj = np.clip(np.floor(uv[:, 1]), 0, K.height - 1).astype(np.int64)
        rgb = f.image[jj, ii].astype(np.float64) / 255.0
        to_cam = f.c2w[:3, 3] - points
        cos = (to_cam * normals).sum(1) / np.maximum(np.linalg.norm(to_cam, axis=1), 1e-12)
        face = inside & (cos > 0.3)
        acc_face[face] += rgb[face]
        n_face[face] += 1
        acc_all[inside] += rgb[inside]
        n_all[inside] += 1
    out = np.full((len(points), 3), 0.5)
    has_all = n_all > 0
    out[has_all] = acc_all[has_all] / n_all[has_all, None]
    has_face = n_face > 0
    out[has_face] = acc_face[has_face] / n_face[has_face, None]
    return out
