"""The nominal surface of a recipe: the golden part's measured surface, its colour and its nominal tolerances.

The Gaussian reference (:mod:`agent.splat`) is what the inspection renders and what places a part when frames
carry no depth. Its rendered depth, though, is an alpha-blended expectation over Gaussians a few millimetres wide,
biased towards the camera at grazing angles by several millimetres: too coarse to find a 1 mm dent. When the cell
has a depth camera, the golden capture's depth maps give the surface directly. This module keeps that surface as
points on a grid of ``spacing_m`` (the golden depth maps fused, each point the mean of the samples in its cell,
then smoothed over its neighbours), with normals, the mean colour seen by the golden views, and two per-point
tolerances fitted on nominal data only (leave-views-out, :func:`build_nominal_surface`):

``geometry_tol``  metres: how far held-out golden depth samples stray from the surface near this point;
``colour_tol``    RGB in [0, 1]: how far held-out golden colours stray from the point's colour (texture edges,
                  view-dependent gloss).

Used at inspection (plain functions, no I/O):

- :func:`fit_placement` places the part (its offset from the recipe frame) by robust point-to-plane ICP of the
  observed depth against the surface: on the fixture's degrees of freedom (x, y, turn about z) by default, from
  several starts ranked by the samples' distance to the surface (:func:`placement_distance`).
- :func:`surface_residuals` gives, per pixel of a view, the evidence of extra material (a point in front of the
  surface: burr) and of material inside the nominal surface (dent, missing material's cut face), each divided by
  the point's tolerance (1 = the worst nominal case; inspection maps their signed difference as a local contrast,
  :func:`geometry_contrast`), and of a colour that is not the golden part's (stain,
  scratch): the local contrast of the observed-to-golden colour ratio (:func:`colour_contrast`); and where the camera
  sees through the nominal surface (:func:`see_through`: nothing, or something far behind, where the surface placed
  at the part's placement should be seen, :func:`expected_depth`), a chunk missing from an outline. Colours are
  compared after a shading correction fitted per view and per normal direction, so a light that is brighter or
  turned a few degrees does not read as a defect; a specular highlight (white light added to the surface colour) is
  taken out (against reference views, which hold the cell's highlights, only where the surroundings share it: a pale
  scratch stays), and clipped pixels are not measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
from scipy.spatial import cKDTree

from agent.capture import Frame
from agent.filters import gaussian_blur, maximum_filter
from agent.geometry import (
    Intrinsics,
    backproject_depth,
    invert_rigid,
    project_points,
    rotation_about_axis,
    transform_points,
)
from agent.npz import read_versioned_npz
from agent.reference_views import ReferenceView

SURFACE_FORMAT = "edge-inspection-agent/nominal-surface"
SURFACE_VERSION = 1
NORMAL_NEIGHBOURS = 12
# Tolerance floors: never trust a point more than this (sensor noise not seen in the golden views, light changes).
MIN_GEOMETRY_TOL_M = 0.0004
MIN_COLOUR_TOL = 0.06
# A surface point seen by fewer golden views than this (e.g. the inside bottom of a vase, seen through its neck from
# above only) gives no evidence: its position and colour are not known well enough.
MIN_SUPPORT = 3
# Normal-direction bins of the shading correction (a 5 x 5 x 5 grid over the unit cube of normal components).
SHADING_BINS = 5
ENCLOSURE_RADIUS_SPACINGS = 25.0
CHROMA_SCALE = 3.0  # chromaticity differences (0..1 per component) to roughly RGB units
BRIGHTNESS_WEIGHT = 0.35
# Colour evidence at inspection (see colour_contrast): a channel at or above this level may be clipped by the
# sensor (a highlight on a glossy glaze), so the pixel's colour is not measured; LOG_EPS keeps log ratios of dark
# pixels finite (about the sensor noise floor, in [0, 1] units).
SATURATED_LEVEL = 0.97
LOG_EPS = 0.03
# A reference view (agent.reference_views) saw a surface point when its depth there is within this of the point's.
REFERENCE_DEPTH_AGREEMENT_M = 0.004
# Colour against reference views is divided by 1 + d / REFERENCE_SPREAD_LOG, where d is how far the references'
# (shading-corrected) log brightness disagrees at and around the pixel (reference_disagreement, the highest within
# REFERENCE_SPREAD_RADIUS_PX): where nominal parts under their own lights differ (a cast shadow whose edge moves with
# each part's key light: the stool's seat on its legs), a part that differs from all of them is less evidence. Where
# they agree (a lit face), a stain keeps its evidence. Measured with `agent eval` on seed 8128 (3 recipes, 8 good + 10
# defective parts, 3 teach-in parts, 256 px), I-AUROC stool / bracket / vase 0.750 / 0.762 / 0.900 -> 0.800 / 0.712 /
# 0.900 (mean 0.804 either way): the stool's good parts' colour peaks fell from up to 0.99 to 0.53-0.87 but one (0.98)
# and its geometry now sets their scores; the bracket's ranks moved by one scratch and a missing chunk within 0.05.
# On the bench's fresh seed 5531 (same data, both codes): 0.738 / 0.800 / 0.938 -> 0.863 / 0.838 / 0.938, mean 0.825 ->
# 0.879 (the stool's stains 0.44 -> 0.88), V-AUPRO@1% 0.606 -> 0.622.
REFERENCE_SPREAD_LOG = 0.2
REFERENCE_SPREAD_RADIUS_PX = 2
# Seeing through the nominal surface (see_through): the camera sees nothing, or something more than
# SEE_THROUGH_GAP_TOLS typical nominal tolerances (the median geometry_tol) behind, where the nominal surface should
# be. The outline is trusted SEE_THROUGH_TOLERANCE_PX pixels in from its edge (a placement a few tenths of a
# millimetre off moves it by less), and not at its own depth edges (steps larger than the gap).
SEE_THROUGH_GAP_TOLS = 4.0
SEE_THROUGH_TOLERANCE_PX = 1
# Placement hypotheses are compared by the mean distance of the observed points to their nearest nominal points,
# each capped at this (a burr, or a region the golden views did not see, counts the same at every hypothesis). See
# fit_placement: a part slid along a prism-like shape leaves its point-to-plane residuals as small as in place.
PLACEMENT_DISTANCE_CAP_M = 0.003
# The coarse stage of fit_placement (15 starts x 10 ICP iterations on a part's first view) matches against the surface
# thinned to one point per cell of PLACEMENT_COARSE_SPACINGS spacings (the bracket: 9.9k of 185k points): it only ranks
# basins, and its nearest-neighbour queries, 10 mm wide, were half of the first view's placement time. The ranking and
# the fine stages use every point. An ICP stops once an iteration moves the placement by less than
# ICP_CONVERGED_M (metres, and radians for the turn): a micrometre, a tenth of the depth noise's effect on the placement.
PLACEMENT_COARSE_SPACINGS = 3.0
ICP_CONVERGED_M = 1e-6
FINE_ICP_ITERATIONS = 20  # fit_placement's fine stage, by default


@dataclass
class NominalSurface:
    """The golden part's surface in the recipe frame (see the module docstring). float32 arrays, N points."""

    points: np.ndarray  # N x 3 metres
    normals: np.ndarray  # N x 3 unit, pointing out of the part (towards the cameras that saw it)
    colour: np.ndarray  # N x 3 mean RGB in [0, 1]
    geometry_tol: np.ndarray  # N metres
    colour_tol: np.ndarray  # N
    spacing_m: float
    support: np.ndarray | None = None  # N: golden views that saw the point's neighbourhood (None: trusted everywhere)
    _tree: cKDTree | None = field(default=None, repr=False, compare=False)
    _enclosure: np.ndarray | None = field(default=None, repr=False, compare=False)
    _typical_geometry_tol: float | None = field(default=None, repr=False, compare=False)
    _trusted: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False, compare=False)
    _coarse: "_MatchTarget | None" = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = len(self.points)
        if self.support is None:
            self.support = np.full(n, 1000, np.int32)
        self.support = np.asarray(self.support, dtype=np.int32)
        if self.support.shape != (n,) or (self.support < 0).any():
            raise ValueError(f"nominal surface: support must be {n} counts >= 0")
        for name in ("points", "normals", "colour"):
            a = getattr(self, name)
            if a.shape != (n, 3) or not np.isfinite(a).all():
                raise ValueError(f"nominal surface: {name} must be a finite {n} x 3 array, got shape {a.shape}")
        for name in ("geometry_tol", "colour_tol"):
            a = getattr(self, name)
            if a.shape != (n,) or not np.isfinite(a).all() or (a <= 0).any():
                raise ValueError(f"nominal surface: {name} must be {n} positive finite values")
        if n < 16:
            raise ValueError(f"nominal surface: {n} points is too few (at least 16)")
        if not (math.isfinite(self.spacing_m) and self.spacing_m > 0):
            raise ValueError(f"nominal surface: spacing_m must be > 0, got {self.spacing_m}")

    def __len__(self) -> int:
        return len(self.points)

    @property
    def tree(self) -> cKDTree:
        if self._tree is None:
            self._tree = cKDTree(self.points)
        return self._tree

    @property
    def typical_geometry_tol(self) -> float:
        """Metres: the median of the points' geometry tolerances (computed once)."""
        if self._typical_geometry_tol is None:
            self._typical_geometry_tol = float(np.median(self.geometry_tol))
        return self._typical_geometry_tol

    @property
    def coarse(self) -> "_MatchTarget":
        """The surface thinned to one point per cell of PLACEMENT_COARSE_SPACINGS spacings (computed once), with its
        own KD-tree: what the coarse placement stage matches against."""
        if self._coarse is None:
            cell = np.floor(self.points / (PLACEMENT_COARSE_SPACINGS * self.spacing_m)).astype(np.int64)
            _, first = np.unique(cell, axis=0, return_index=True)
            keep = np.sort(first)
            self._coarse = _MatchTarget(self.points[keep], self.normals[keep], cKDTree(self.points[keep]))
        return self._coarse

    def build_search_structures(self) -> None:
        """Build what placement and every view's scoring search (the KD-trees, the trusted points) now, not on first
        use: on a recipe's load rather than on the first part's first view."""
        self.tree, self.coarse, self.trusted  # noqa: B018

    @property
    def full(self) -> "_MatchTarget":
        """Every surface point as a matching target (the fine placement stages)."""
        return _MatchTarget(self.points, self.normals, self.tree)

    @property
    def trusted(self) -> tuple[np.ndarray, np.ndarray]:
        """The points the golden views saw well (support >= MIN_SUPPORT) and their normals, float64 (computed once):
        what :func:`expected_depth` z-buffers on every view."""
        if self._trusted is None:
            ok = self.support >= MIN_SUPPORT
            self._trusted = (self.points[ok].astype(np.float64), self.normals[ok].astype(np.float64))
        return self._trusted

    @property
    def enclosure(self) -> np.ndarray:
        """N in [0, 1]: how enclosed each point is by other parts of the surface (computed once): the share of 32
        nearby points of a sparse subsample (up to ``ENCLOSURE_RADIUS_SPACINGS`` spacings away) that stand more than
        two spacings above the point's tangent plane. High at a leg-rung joint or inside a bend, where a turned
        light moves cast shadows; 0 on an open face."""
        if self._enclosure is None:
            step = max(1, len(self.points) // 5000)
            sub = self.points[::step].astype(np.float64)
            k = min(32, len(sub))
            d, j = cKDTree(sub).query(self.points, k=k)
            rel = sub[j] - self.points[:, None, :].astype(np.float64)
            above = np.einsum("nkj,nj->nk", rel, self.normals.astype(np.float64)) > 2.0 * self.spacing_m
            near = d < ENCLOSURE_RADIUS_SPACINGS * self.spacing_m
            self._enclosure = ((above & near).sum(axis=1) / k).astype(np.float32)
        return self._enclosure

    def save(self, path: str | Path) -> None:
        np.savez_compressed(
            path, format=np.array(SURFACE_FORMAT), version=np.array(SURFACE_VERSION), points=self.points, normals=self.normals,
            colour=self.colour, geometry_tol=self.geometry_tol, colour_tol=self.colour_tol, spacing_m=np.array(self.spacing_m),
            support=self.support,
        )  # fmt: skip

    @classmethod
    def load(cls, path: str | Path) -> "NominalSurface":
        """Read a surface written by :meth:`save` (no pickle); ValueError names what is wrong."""
        fields = ("points", "normals", "colour", "geometry_tol", "colour_tol")
        z = read_versioned_npz(path, SURFACE_FORMAT, SURFACE_VERSION, (*fields, "spacing_m"), "nominal surface")
        arrays = {k: np.asarray(z[k], dtype=np.float32) for k in fields}
        support = np.asarray(z["support"], dtype=np.int32) if "support" in z else None
        return cls(**arrays, spacing_m=float(z["spacing_m"]), support=support)


# ---------------------------------------------------------------------------------------------
# Building


@dataclass
class _Samples:
    points: np.ndarray  # M x 3 world
    colours: np.ndarray  # M x 3 in [0, 1]
    view: np.ndarray  # M int


def _samples(frames: list[Frame]) -> _Samples:
    pts, cols, views = [], [], []
    for i, f in enumerate(frames):
        if f.depth is None or f.c2w is None:
            continue
        p, flat = backproject_depth(f.depth, f.c2w, f.intrinsics)
        pts.append(p)
        cols.append(np.asarray(f.image).reshape(-1, 3)[flat].astype(np.float32) / 255.0)
        views.append(np.full(len(p), i, dtype=np.int32))
    if not pts:
        raise ValueError("the nominal surface needs posed frames with depth")
    return _Samples(np.concatenate(pts), np.concatenate(cols), np.concatenate(views))


def _grid_points(samples: _Samples, spacing: float, cameras: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean sample per grid cell, smoothed over neighbours; PCA normals oriented towards a camera that saw them;
    support = the most distinct views that saw any cell among the neighbours."""
    key = np.floor(samples.points / spacing).astype(np.int64)
    _, inv = np.unique(key, axis=0, return_inverse=True)
    inv = inv.ravel()
    n = int(inv.max()) + 1
    count = np.bincount(inv, minlength=n).astype(np.float64)
    cells = np.stack([np.bincount(inv, samples.points[:, k], n) for k in range(3)], 1) / count[:, None]
    tree = cKDTree(cells)
    _, nn = tree.query(cells, k=min(NORMAL_NEIGHBOURS, n))
    nb = cells[nn]
    centre = nb.mean(axis=1)
    d = nb - centre[:, None]
    _, vecs = np.linalg.eigh(np.einsum("nki,nkj->nij", d, d))
    normals = vecs[:, :, 0]
    seen_from = np.zeros(n, dtype=np.int64)
    seen_from[inv] = samples.view
    flip = np.einsum("ij,ij->i", normals, cameras[seen_from] - centre) < 0
    normals[flip] *= -1
    pairs = np.unique(inv.astype(np.int64) * (int(samples.view.max()) + 1) + samples.view)
    views_per_cell = np.bincount(pairs // (int(samples.view.max()) + 1), minlength=n)
    return centre, normals, views_per_cell[nn].max(axis=1)


def _colour_mean(points: np.ndarray, samples: _Samples, radius: float) -> np.ndarray:
    """Mean colour of the samples within ``radius`` of each point (every view that saw it)."""
    tree = cKDTree(samples.points)
    d, j = tree.query(points, k=8, distance_upper_bound=radius)
    ok = np.isfinite(d)
    w = ok.astype(np.float64)
    cols = samples.colours[np.where(ok, j, 0)]
    mean = (cols * w[..., None]).sum(1) / np.maximum(w.sum(1), 1)[:, None]
    no = w.sum(1) == 0
    if no.any():  # nearest sample whatever its distance
        _, j1 = tree.query(points[no])
        mean[no] = samples.colours[j1]
    return mean


def build_nominal_surface(frames: list[Frame], spacing_m: float, folds: int = 3, tolerance_quantile: float = 1.0) -> NominalSurface:
    """Fuse posed golden frames with depth into a :class:`NominalSurface` in the world (= recipe) frame.

    Tolerances, nominal data only: the frames are split into ``folds``; a surface is built from the other folds
    and every held-out depth sample's residuals (distance along the normal, colour after the shading correction)
    are gathered on its nearest point; a point's tolerance is the ``tolerance_quantile`` of what it gathered,
    taken as the maximum over its neighbours (a point seen by few held-out samples borrows from around it), and
    at least the floors :data:`MIN_GEOMETRY_TOL_M` / :data:`MIN_COLOUR_TOL`.
    """
    frames = [f for f in frames if f.depth is not None and f.c2w is not None]
    if len(frames) < 2:
        raise ValueError("the nominal surface needs at least 2 posed frames with depth")
    cameras = np.stack([np.asarray(f.c2w)[:3, 3] for f in frames])
    samples = _samples(frames)
    points, normals, support = _grid_points(samples, spacing_m, cameras)
    colour = _colour_mean(points, samples, 1.5 * spacing_m)
    geo_res = np.zeros(len(points))
    col_res = np.zeros(len(points))
    folds = max(2, min(folds, len(frames)))
    full_tree = cKDTree(points.astype(np.float32))  # the same tree the final surface queries
    for fold in range(folds):
        held = [f for i, f in enumerate(frames) if i % folds == fold]
        kept_idx = [i for i in range(len(frames)) if i % folds != fold]
        kept = _Samples(*(a[np.isin(samples.view, kept_idx)] for a in (samples.points, samples.colours, samples.view)))
        p_fold, n_fold, s_fold = _grid_points(kept, spacing_m, cameras)
        c_fold = _colour_mean(p_fold, kept, 1.5 * spacing_m)
        ones = np.ones(len(p_fold), np.float32)
        fold_surface = NominalSurface(p_fold.astype(np.float32), n_fold.astype(np.float32), c_fold.astype(np.float32), ones, ones, spacing_m, s_fold)
        for f in held:
            res = _raw_residuals(fold_surface, f, np.eye(4), tolerances=True)
            if res is None:
                continue
            j = full_tree.query(res.points_part)[1]  # gathered on the full surface's nearest point
            np.maximum.at(geo_res, j, np.maximum(res.extra, res.inside))
            np.maximum.at(col_res, j, res.colour)
    _, nn = full_tree.query(points, k=min(NORMAL_NEIGHBOURS, len(points)))
    geometry_tol = np.maximum(geo_res[nn].max(axis=1), MIN_GEOMETRY_TOL_M)
    colour_tol = np.maximum(col_res[nn].max(axis=1), MIN_COLOUR_TOL)
    return NominalSurface(
        points.astype(np.float32), normals.astype(np.float32), colour.astype(np.float32),
        geometry_tol.astype(np.float32), colour_tol.astype(np.float32), float(spacing_m), support, _tree=full_tree,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Inspection


@dataclass
class _Raw:
    flat: np.ndarray  # M pixel indices with depth
    points_part: np.ndarray  # M x 3 in the recipe frame
    nearest: np.ndarray  # M surface point indices
    extra: np.ndarray  # M metres in front of the surface (or away from it sideways)
    inside: np.ndarray  # M metres behind the surface
    matched: np.ndarray  # M bool: on the surface (within 2 spacings)
    # tolerances=True (building tolerances): M colour residual (colour_difference) after the shading correction
    colour: np.ndarray | None = None
    # tolerances=False (inspection): M x 3 log(observed / corrected golden colour), highlight removed (0 where not
    # valid), and M bool valid = matched and not clipped
    log_ratio: np.ndarray | None = None
    colour_valid: np.ndarray | None = None
    # with references: M, the range of the references' log brightness at the sample (0 where fewer than two saw it)
    reference_spread: np.ndarray | None = None


def _shading_correction(normals: np.ndarray, observed: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Per-sample RGB gain: the median observed / reference ratio of the samples whose normal falls in the same
    bin (light direction and intensity changes scale each surface orientation differently)."""
    ratio = observed / np.maximum(reference, 0.02)
    good = (reference > 0.04).all(axis=1)
    global_gain = np.median(ratio[good], axis=0) if good.sum() >= 16 else np.ones(3)
    b = np.clip(((normals + 1.0) * 0.5 * SHADING_BINS).astype(np.int64), 0, SHADING_BINS - 1)
    key = (b[:, 0] * SHADING_BINS + b[:, 1]) * SHADING_BINS + b[:, 2]
    bin_gain = np.tile(global_gain, (SHADING_BINS**3, 1))
    order = np.argsort(key[good], kind="stable")  # the good samples grouped by bin
    keys, first, counts = np.unique(key[good][order], return_index=True, return_counts=True)
    grouped = ratio[good][order]
    for k, i, c in zip(keys, first, counts):
        if c >= 32:
            bin_gain[k] = np.median(grouped[i : i + c], axis=0)
    return np.clip(bin_gain[key], 0.5, 2.0)


def chromaticity(rgb: np.ndarray) -> np.ndarray:
    """N x 3 RGB in [0, 1] -> N x 3 chromaticity (each colour divided by its sum; near-black kept finite)."""
    return rgb / np.maximum(rgb.sum(axis=1, keepdims=True), 0.03)


def colour_difference(observed: np.ndarray, reference: np.ndarray, enclosure: np.ndarray | None = None) -> np.ndarray:
    """Colour residual of N RGB pairs in [0, 1]: the chromaticity difference (hue and saturation, what a stain or a
    scratch changes) in full, the relative brightness difference at :data:`BRIGHTNESS_WEIGHT` (a shadow moved by a
    turned light changes brightness, not chromaticity), less where the surface is enclosed (``enclosure``, see
    :attr:`NominalSurface.enclosure`: cast shadows fall there)."""
    so = observed.sum(axis=1, keepdims=True)
    sr = reference.sum(axis=1, keepdims=True)
    chroma = np.abs(chromaticity(observed) - chromaticity(reference)).max(axis=1) * CHROMA_SCALE
    weight = BRIGHTNESS_WEIGHT if enclosure is None else BRIGHTNESS_WEIGHT * np.clip(1.0 - 3.0 * enclosure, 0.0, 1.0)
    brightness = np.abs(so[:, 0] - sr[:, 0]) / np.maximum(sr[:, 0], 0.1) * weight
    return np.maximum(chroma, brightness)


def _raw_residuals(
    surface: NominalSurface,
    frame: Frame,
    T_world_part: np.ndarray,
    tolerances: bool = False,
    references: Sequence[ReferenceView] = (),
    highlight_sigma_px: float = 2.0,
) -> _Raw | None:
    """Per-sample residuals of a posed view; the colour as what the tolerances gather (``tolerances=True``) or as
    the log ratio inspection maps (otherwise), against the golden surface colour or, given ``references`` (views of
    nominal parts from the same pose), against the closest of them (:func:`_closest_reference_colour`), less the white light
    its surroundings share (:func:`broad_white_light` over ``highlight_sigma_px``)."""
    if frame.depth is None or frame.c2w is None:
        return None
    pw, flat = backproject_depth(frame.depth, frame.c2w, frame.intrinsics)
    if len(pw) == 0:
        return None
    T_part_world = np.linalg.inv(np.asarray(T_world_part, dtype=np.float64))
    q = transform_points(T_part_world, pw)
    camera = transform_points(T_part_world, np.asarray(frame.c2w, dtype=np.float64)[None, :3, 3])[0]
    dist, j = surface.tree.query(q)
    n = surface.normals[j].astype(np.float64)
    signed = np.einsum("ij,ij->i", n, q - surface.points[j])
    lateral = np.sqrt(np.maximum(dist**2 - signed**2, 0.0))
    near = lateral <= 2.0 * surface.spacing_m
    trusted = surface.support[j] >= MIN_SUPPORT  # too few golden views saw it: no evidence either way
    matched = near & trusted
    # Off the surface sideways: extra material when the surface nearest to it is well known (a burr on a face),
    # nothing when it is not (a region the golden views barely saw).
    extra = np.where(matched, np.maximum(signed, 0.0), np.where(near | ~trusted, 0.0, dist))
    # Behind the surface counts only where that surface faces the camera: the camera looked through where the
    # surface should be. Behind a surface facing away it saw a region no golden view covered (a vessel's inner wall).
    facing = np.einsum("ij,ij->i", n, camera[None, :] - q) > 0
    inside = np.where(matched & facing, np.maximum(-signed, 0.0), 0.0)
    observed = np.asarray(frame.image).reshape(-1, 3)[flat].astype(np.float64) / 255.0
    n_world = n @ np.asarray(T_world_part, dtype=np.float64)[:3, :3].T
    if tolerances or not references:  # compared with the golden surface colour
        reference = surface.colour[j].astype(np.float64)
        gain = _shading_correction(n_world[matched], observed[matched], reference[matched]) if matched.sum() >= 16 else np.ones((int(matched.sum()), 3))
    if tolerances:
        colour = np.zeros(len(flat))
        colour[matched] = colour_difference(observed[matched], gain * reference[matched], surface.enclosure[j[matched]])
        return _Raw(flat, q, j, extra, inside, matched, colour=colour)
    valid = matched & (observed.max(axis=1) < SATURATED_LEVEL)
    spread = None
    log_ratio = np.zeros((len(flat), 3))
    if references:
        closest, seen, spread = _closest_reference_colour(q, observed, n_world, matched, references)
        valid &= seen
        shape = (frame.intrinsics.height, frame.intrinsics.width)
        white = broad_white_light(observed, closest, seen, flat, shape, highlight_sigma_px)  # clipped pixels count here
        log_ratio[valid] = log_colour_ratio(observed[valid] - white[valid, None], closest[valid])
    else:
        log_ratio[valid] = highlight_free_log_ratio(observed[valid], gain[valid[matched]] * reference[valid])
    return _Raw(flat, q, j, extra, inside, matched, log_ratio=log_ratio, colour_valid=valid, reference_spread=spread)


def _closest_reference_colour(
    q: np.ndarray, observed: np.ndarray, n_world: np.ndarray, matched: np.ndarray, references: Sequence[ReferenceView]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """M x 3 colour of each sample (``q``: M x 3 in the recipe frame) at the same surface point in the reference view
    where it is closest (the smallest summed absolute :func:`log_colour_ratio`; ones where no reference saw the point),
    M bool: some reference saw the point (it projects into that view, in front of nothing: the view's depth there
    agrees within :data:`REFERENCE_DEPTH_AGREEMENT_M`), and M float: the range of the references' log brightness at the
    point (0 where fewer than two saw it; see :data:`REFERENCE_SPREAD_LOG`). Each reference's colour gets the shading
    correction first (its light may be a little brighter or turned). The caller takes the white light of a highlight
    out of the comparison (:func:`broad_white_light`)."""
    best_cost = np.full(len(q), np.inf)
    closest = np.ones((len(q), 3))
    lo, hi = np.full(len(q), np.inf), np.full(len(q), -np.inf)  # each sample's lowest and highest reference brightness
    for ref in references:
        K = ref.intrinsics
        uv, z = project_points(transform_points(ref.T_world_part, q), ref.c2w, K)
        u, v = uv[:, 0] - 0.5, uv[:, 1] - 0.5  # pixel centres at +0.5
        inside = np.isfinite(u) & np.isfinite(v) & (u >= 0) & (v >= 0) & (u <= K.width - 1) & (v <= K.height - 1) & (z > 0)
        ui = np.clip(np.round(np.nan_to_num(u)).astype(np.int64), 0, K.width - 1)
        vi = np.clip(np.round(np.nan_to_num(v)).astype(np.int64), 0, K.height - 1)
        d = ref.depth[vi, ui]
        seen = matched & inside & (d > 0) & (np.abs(d - z) < REFERENCE_DEPTH_AGREEMENT_M)
        if seen.sum() < 16:
            continue
        colour = sample_bilinear(np.asarray(ref.image, dtype=np.float32) / 255.0, u[seen], v[seen]).astype(np.float64)
        gain = _shading_correction(n_world[seen], observed[seen], colour)
        corrected = gain * colour
        cost = np.abs(log_colour_ratio(observed[seen], corrected)).sum(axis=1)
        idx = np.flatnonzero(seen)
        better = cost < best_cost[idx]
        best_cost[idx[better]] = cost[better]
        closest[idx[better]] = corrected[better]
        brightness = np.log(corrected + LOG_EPS).mean(axis=1)  # this reference's log brightness
        lo[idx] = np.minimum(lo[idx], brightness)
        hi[idx] = np.maximum(hi[idx], brightness)
    return closest, np.isfinite(best_cost), np.where(hi > lo, hi - lo, 0.0)


_SAMPLE_ROW = 1024  # points per row of the maps sample_bilinear gives cv2.remap


def sample_bilinear(image: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """M x C: ``image`` (H x W x C float32) bilinearly sampled at the M pixel positions (u, v) (pixel centres at
    integers, 0 outside the image; NaN reads as 0). ``cv2.remap`` takes a map of under 32767 rows and columns, so
    the M points go in as rows of :data:`_SAMPLE_ROW` (a view of 512 x 512 pixels has more than 32767 on the part)."""
    n = len(u)
    rows = max(1, -(-n // _SAMPLE_ROW))
    maps = [np.pad(np.nan_to_num(np.asarray(a, dtype=np.float32)), (0, rows * _SAMPLE_ROW - n)).reshape(rows, _SAMPLE_ROW) for a in (u, v)]
    return cv2.remap(image, maps[0], maps[1], cv2.INTER_LINEAR).reshape(rows * _SAMPLE_ROW, -1)[:n]


def broad_white_light(observed: np.ndarray, reference: np.ndarray, valid: np.ndarray, flat: np.ndarray, shape: tuple[int, int], sigma_px: float) -> np.ndarray:
    """M: the white light each of M samples (pixels ``flat`` of an image of ``shape``) holds beyond its reference colour
    (:func:`white_light`) that its surroundings share:
    its Gaussian mean over ``sigma_px`` (over the ``valid`` samples), at most the sample's own. A specular highlight
    the references do not hold (the part's own light) is a broad patch of added white light and is taken out; a
    scratch a pixel wide that brightens every channel (pale wood, bright steel) is not shared by its surroundings
    and stays."""
    white = np.where(valid, white_light(observed, reference), 0.0)
    image, weight = np.zeros(shape[0] * shape[1], np.float32), np.zeros(shape[0] * shape[1], np.float32)
    image[flat], weight[flat] = white, valid
    shared = _masked_blur(image.reshape(1, *shape), weight.reshape(shape), sigma_px).reshape(-1)[flat]
    return np.minimum(white, shared)


def white_light(observed: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """N: the largest white light N RGB observations hold beyond their reference colours (the smallest per-channel
    excess, >= 0)."""
    return np.maximum((observed - reference).min(axis=1), 0.0)


def log_colour_ratio(observed: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """N x 3 ``log((observed + eps) / (reference + eps))`` per RGB channel (``eps`` = :data:`LOG_EPS`)."""
    return np.log((observed + LOG_EPS) / (reference + LOG_EPS))


def highlight_free_log_ratio(observed: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """N x 3 ``log((observed - s + eps) / (reference + eps))`` per RGB channel, where ``s >= 0`` is the largest
    white light the observation holds beyond the reference (the smallest per-channel excess): a specular highlight
    adds the light's colour (white) to every channel (the dichromatic reflection model), a stain or a scratch
    changes the channels unequally or darkens them, which stays."""
    return log_colour_ratio(observed - white_light(observed, reference)[:, None], reference)


def _masked_blur(values: np.ndarray, weight: np.ndarray, sigma_px: float) -> np.ndarray:
    """C x H x W Gaussian mean of ``values`` over the pixels where ``weight`` (H x W, 0/1) is set."""
    weight = np.asarray(weight, dtype=np.float32)
    stacked = np.concatenate([np.asarray(values, dtype=np.float32) * weight, weight[None]]).transpose(1, 2, 0)
    blurred = gaussian_blur(stacked, sigma_px).transpose(2, 0, 1)  # the weighted values and the weight in one pass
    return blurred[:-1] / np.maximum(blurred[-1], 1e-3)


def _local_contrast(values: np.ndarray, weight: np.ndarray, sigma_px: float, baseline_px: float) -> np.ndarray:
    """C x H x W: the Gaussian mean of ``values`` over ``sigma_px`` less its mean over ``baseline_px``, both over
    the pixels where ``weight`` (H x W, 0/1) is set."""
    return _masked_blur(values, weight, sigma_px) - _masked_blur(values, weight, baseline_px)


def colour_contrast(log_ratio: np.ndarray, valid: np.ndarray, sigma_px: float, baseline_px: float) -> np.ndarray:
    """H x W colour evidence from a 3 x H x W map of per-pixel log colour ratios (observed / golden) and the
    H x W mask of measured pixels: the ratio averaged over ``sigma_px`` (pixel-scale texture misregistration
    is zero-mean and averages out, a stain does not) less its average over ``baseline_px`` (a light that is
    brighter, turned or warmer changes the ratio smoothly); the larger of the brightness change (the mean over
    channels) and the chromaticity change (the norm of what is left). 0.1 ~ a 10 % local change."""
    w = valid.astype(np.float32)
    if not w.any():
        return np.zeros(valid.shape, np.float32)
    d = _local_contrast(np.asarray(log_ratio, dtype=np.float32), w, sigma_px, baseline_px)
    brightness = d.mean(axis=0)
    chroma = np.sqrt(((d - brightness) ** 2).sum(axis=0))
    return (np.maximum(np.abs(brightness), chroma) * valid).astype(np.float32)


def geometry_contrast(signed: np.ndarray, observed: np.ndarray, sigma_px: float, baseline_px: float) -> tuple[np.ndarray, np.ndarray]:
    """H x W extra-material and missing-material evidence from the H x W signed distance of each observed pixel
    to the nominal surface (in units of the point's geometry tolerance, positive in front of the surface) and the
    H x W mask of observed pixels: the signed distance averaged over ``sigma_px`` (per-pixel depth noise is zero
    mean and averages out, a dent or a burr does not) less its average over ``baseline_px`` (a part placed a
    fraction of a millimetre off tilts the residual smoothly across a whole face); the positive part is extra
    material, the negative part material inside the surface. Both 0 where nothing was observed."""
    w = np.asarray(observed, dtype=np.float32)
    if not w.any():
        zero = np.zeros(w.shape, np.float32)
        return zero, zero.copy()
    local = _local_contrast(np.asarray(signed, dtype=np.float32)[None], w, sigma_px, baseline_px)[0] * w
    return np.maximum(local, 0.0).astype(np.float32), np.maximum(-local, 0.0).astype(np.float32)


def reference_disagreement(spread: np.ndarray, sigma_px: float) -> np.ndarray:
    """H x W: how far the reference views disagree in brightness around each pixel (``spread``: per pixel, the range
    of the references' log brightness at that surface point), the highest within REFERENCE_SPREAD_RADIUS_PX,
    smoothed over ``sigma_px``: a cast shadow whose edge moves with each part's light."""
    k = 2 * REFERENCE_SPREAD_RADIUS_PX + 1
    return gaussian_blur(maximum_filter(spread, k), sigma_px)


def depth_range(depth: np.ndarray, radius_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Lowest and highest valid (> 0) depth within ``radius_px`` of each pixel (inf / 0 where there is none)."""
    d = np.asarray(depth, dtype=np.float32)
    valid = d > 0
    kernel = np.ones((2 * radius_px + 1,) * 2, np.uint8)
    far = np.float32(1e6)
    lo = cv2.erode(np.where(valid, d, far).astype(np.float32), kernel)
    hi = cv2.dilate(np.where(valid, d, 0.0).astype(np.float32), kernel)
    return np.where(lo < far, lo, np.inf).astype(np.float32), hi


def expected_depth(surface: NominalSurface, c2w: np.ndarray, K: Intrinsics, T_world_part: np.ndarray) -> np.ndarray:
    """H x W float32: the depth at which the camera ``c2w`` should see the nominal surface placed at ``T_world_part``,
    0 where it should see none. A z-buffer of the surface points the golden views saw well (support >= MIN_SUPPORT)
    that face the camera, one pixel each; a pixel no point fell in takes the nearest depth of its 3 x 3 neighbours (the
    grid spacing is about a pixel's footprint), and the outline is eroded back by a pixel (a morphological closing)."""
    points, normals = surface.trusted
    T = np.asarray(T_world_part, dtype=np.float64)
    c2w_part = invert_rigid(T) @ np.asarray(c2w, dtype=np.float64)  # the camera in the recipe frame: one transform per point
    facing = points[np.einsum("ij,ij->i", normals, c2w_part[None, :3, 3] - points) > 0]
    uv, z = project_points(facing, c2w_part, K)
    with np.errstate(invalid="ignore"):
        u, v = np.floor(uv[:, 0]), np.floor(uv[:, 1])
        inside = (z > 0) & (u >= 0) & (v >= 0) & (u < K.width) & (v < K.height)
    zbuf = np.full(K.height * K.width, np.inf, np.float32)
    np.minimum.at(zbuf, v[inside].astype(np.int64) * K.width + u[inside].astype(np.int64), z[inside].astype(np.float32))
    far = np.float32(1e6)
    kernel = np.ones((3, 3), np.uint8)
    zbuf = np.minimum(zbuf, far).reshape(K.height, K.width)
    closed = np.where(zbuf < far, zbuf, cv2.erode(zbuf, kernel))  # a gap takes the nearest depth of its 3 x 3 neighbours
    outline = cv2.erode((closed < far).astype(np.uint8), kernel).astype(bool)
    return np.where(outline, closed, 0.0).astype(np.float32)


def see_through(expected: np.ndarray, observed_depth: np.ndarray, gap_m: float, tolerance_px: int = SEE_THROUGH_TOLERANCE_PX) -> np.ndarray:
    """H x W bool: material missing in the line of sight. Pixels where the nominal surface should be seen
    (``expected`` > 0, :func:`expected_depth`), at least ``tolerance_px`` pixels inside its outline and away from its
    depth edges (a step larger than ``gap_m`` within ``tolerance_px``), where the camera saw nothing (a chunk gone from
    the silhouette) or a surface more than ``gap_m`` behind it (a chunk gone from an edge in front of the part)."""
    expected = np.asarray(expected, dtype=np.float32)
    observed = np.asarray(observed_depth, dtype=np.float32)
    core = cv2.erode((expected > 0).astype(np.uint8), np.ones((2 * tolerance_px + 1,) * 2, np.uint8)).astype(bool)
    lo, hi = depth_range(expected, tolerance_px)
    gap = np.where(observed > 0, observed - expected, np.inf)
    return core & (hi - lo <= gap_m) & (gap > gap_m)


@dataclass
class SurfaceResiduals:
    """Per-pixel evidence of one view (H x W float32, 0 where the camera saw no part)."""

    extra: np.ndarray  # material in front of / beside the nominal surface, in geometry tolerances
    inside: np.ndarray  # material missing: observed surface behind the nominal one, in geometry tolerances
    colour: np.ndarray  # colour unlike the golden part's: local log-ratio contrast (colour_contrast)
    observed: np.ndarray  # H x W bool: pixels with depth
    expected_depth: np.ndarray  # H x W float32: where the nominal surface should be seen (expected_depth), 0 = nowhere
    see_through: np.ndarray  # H x W bool: material missing in the line of sight (see_through)


def surface_residuals(
    surface: NominalSurface,
    frame: Frame,
    T_world_part: np.ndarray,
    colour_sigma_px: float = 2.5,
    colour_baseline_px: float = 10.0,
    references: Sequence[ReferenceView] = (),
    highlight_sigma_px: float = 2.0,
) -> SurfaceResiduals:
    """The three evidence maps of one posed view with depth (see the module docstring); the colour map is
    :func:`colour_contrast` at ``colour_sigma_px`` / ``colour_baseline_px`` of the log ratio to the golden surface
    colour or, given ``references`` (nominal parts' views from this view's pose, :mod:`agent.reference_views`), to
    the closest of them, less the white light the pixel's surroundings share over ``highlight_sigma_px``
    (:func:`broad_white_light`); pixels no reference saw are not measured."""
    H, W = frame.intrinsics.height, frame.intrinsics.width
    extra, inside = np.zeros(H * W, np.float32), np.zeros(H * W, np.float32)
    log_ratio, valid = np.zeros((3, H * W), np.float32), np.zeros(H * W, bool)
    raw = _raw_residuals(surface, frame, T_world_part, references=references, highlight_sigma_px=highlight_sigma_px)
    observed = np.zeros(H * W, bool)
    if raw is not None:
        gtol = surface.geometry_tol[raw.nearest]
        extra[raw.flat] = raw.extra / gtol
        inside[raw.flat] = raw.inside / gtol
        log_ratio[:, raw.flat] = raw.log_ratio.T
        valid[raw.flat] = raw.colour_valid
        observed[raw.flat] = True
    colour = colour_contrast(log_ratio.reshape(3, H, W), valid.reshape(H, W), colour_sigma_px, colour_baseline_px)
    if raw is not None and raw.reference_spread is not None and REFERENCE_SPREAD_LOG > 0:
        spread = np.zeros(H * W, np.float32)
        spread[raw.flat] = raw.reference_spread
        colour = colour / (1.0 + reference_disagreement(spread.reshape(H, W), colour_sigma_px) / REFERENCE_SPREAD_LOG)
    if frame.depth is None or frame.c2w is None:
        expected, missing = np.zeros((H, W), np.float32), np.zeros((H, W), bool)
    else:
        expected = expected_depth(surface, frame.c2w, frame.intrinsics, T_world_part)
        missing = see_through(expected, frame.depth, SEE_THROUGH_GAP_TOLS * surface.typical_geometry_tol)
    return SurfaceResiduals(extra.reshape(H, W), inside.reshape(H, W), colour, observed.reshape(H, W), expected, missing)


@dataclass
class PlacementFit:
    T_world_part: np.ndarray  # 4 x 4
    residual_m: float  # robust scale of the point-to-plane residuals (divided by the share of samples on the surface)
    inliers: int
    iterations: int


@dataclass(frozen=True)
class _MatchTarget:
    """Surface points with their normals and KD-tree: what ICP matches observed samples against."""

    points: np.ndarray
    normals: np.ndarray
    tree: cKDTree


def _icp(
    target: _MatchTarget, obs: np.ndarray, T: np.ndarray, dof: str, iterations: int, max_distance_m: float
) -> tuple[np.ndarray, float, int, int]:
    """Robust point-to-plane ICP from ``T`` (world -> recipe), until an iteration moves it by less than
    ICP_CONVERGED_M. Returns (T, robust residual scale, inliers, iterations)."""
    scale, inl, it = float("inf"), 0, 0
    for it in range(1, iterations + 1):
        q = transform_points(T, obs)
        dist, j = target.tree.query(q, distance_upper_bound=max_distance_m)
        ok = np.isfinite(dist)
        if ok.sum() < 50:
            return T, float("inf"), int(ok.sum()), it
        q, g, n = q[ok], target.points[j[ok]].astype(np.float64), target.normals[j[ok]].astype(np.float64)
        r = np.einsum("ij,ij->i", n, q - g)
        s = 1.4826 * np.median(np.abs(r)) + 1e-6
        w = 1.0 / (1.0 + (r / (2.0 * s)) ** 2)
        if dof == "planar":
            J = np.stack([n[:, 0], n[:, 1], n[:, 1] * q[:, 0] - n[:, 0] * q[:, 1]], axis=1)
        elif dof == "translation":  # x, y only (after the turn was fixed)
            J = n[:, :2]
        else:
            J = np.concatenate([n, np.cross(q, n)], axis=1)
        x = np.linalg.solve(J.T @ (J * w[:, None]) + 1e-9 * np.eye(J.shape[1]), -J.T @ (r * w))
        dT = np.eye(4)
        if dof == "planar":
            dT[:3, :3] = rotation_about_axis(np.array([0.0, 0.0, 1.0]), x[2])
            dT[:2, 3] = x[:2]
        elif dof == "translation":
            dT[:2, 3] = x[:2]
        else:
            angle = float(np.linalg.norm(x[3:]))
            if angle > 0:
                dT[:3, :3] = rotation_about_axis(x[3:] / angle, angle)
            dT[:3, 3] = x[:3]
        T = dT @ T
        # the score of a hypothesis: robust scale of the residuals, penalised by the share of samples off the surface
        scale, inl = s / max(ok.mean(), 1e-3), int(ok.sum())
        if np.abs(x).max() < ICP_CONVERGED_M:
            break
    return T, scale, inl, it


def fit_placement(
    surface: NominalSurface,
    frames: list[Frame],
    init: np.ndarray | None = None,
    dof: str = "planar",
    search_mm: float = 3.0,
    search_deg: float = 3.0,
    max_points: int = 5000,
    seed: int = 0,
    fine_iterations: int = FINE_ICP_ITERATIONS,
) -> PlacementFit:
    """The part's placement ``T_world_part`` (recipe frame -> world) by robust point-to-plane ICP of the frames'
    observed depth against the nominal surface. ``dof="planar"``: x, y and the turn about the world z axis (a part
    on the fixture); ``"full"``: all six.

    ICP finds the nearest minimum; small parts with repeated features have several within the fixture's play. So a
    coarse stage starts from ``init`` and from offsets of +-``search_mm`` in x and y and +-``search_deg`` about z
    (15 starts, 1000 samples each; both 0: ``init`` only, to refine a previous estimate), keeps the start whose
    samples lie closest to the surface (:func:`placement_distance`), and refines it with up to ``max_points`` samples
    (``fine_iterations`` ICP iterations, then the turn by colour and the translation). The coarse stage matches against
    the surface thinned to one point per PLACEMENT_COARSE_SPACINGS spacings (:attr:`NominalSurface.coarse`): placed as
    a part session does (3 fresh seeds x 3 recipes, 108 parts, 256 px), the errors after three views are those of
    matching every point (median 0.055 vs 0.051 mm and 0.037 vs 0.028 deg, at most 0.196 vs 0.178 mm and 0.355 vs
    0.356 deg, within the parts' spread both ways), and the first view's search about 60 ms shorter.
    Not the start with the smallest point-to-plane residuals: along a prism-like part (a bracket) ICP barely moves,
    and a placement slid a few millimetres along it leaves those residuals as small as in place (the samples beyond
    the surface's end still lie on its planes), while their distance to the surface grows. Measured at 256 px, 4
    seeds x 3 recipes, 252 parts after 3 views: the two bracket parts placed 2.7 mm off along the bracket by the
    residual ranking are placed within 0.05 mm, a vase turned 0.76 deg off within 0.11 deg, and no other part moved
    by more than 0.02 mm or 0.08 deg.
    Raises ValueError when the frames have too little depth on the part."""
    if dof not in ("planar", "full"):
        raise ValueError(f"dof must be 'planar' or 'full', got {dof!r}")
    if fine_iterations < 1:
        raise ValueError(f"fine_iterations must be >= 1, got {fine_iterations}")
    pts, cols = [], []
    for f in frames:
        if f.depth is not None and f.c2w is not None:
            p, flat = backproject_depth(f.depth, f.c2w, f.intrinsics)
            pts.append(p)
            cols.append(np.asarray(f.image).reshape(-1, 3)[flat].astype(np.float64) / 255.0)
    obs = np.concatenate(pts) if pts else np.zeros((0, 3))
    if len(obs) < 100:
        raise ValueError(f"placement needs depth on the part: {len(obs)} depth samples in {len(frames)} frames")
    obs_colour = np.concatenate(cols)
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(obs), max_points, replace=False) if len(obs) > max_points else np.arange(len(obs))
    fine, fine_colour = obs[pick], obs_colour[pick]
    coarse = fine[rng.choice(len(fine), 1000, replace=False)] if len(fine) > 1000 else fine
    T0 = np.linalg.inv(np.asarray(init, dtype=np.float64)) if init is not None else np.eye(4)  # world -> recipe
    starts = []
    centre = np.median(coarse, axis=0)
    offsets = [(0, 0, 0)] if search_mm == 0 and search_deg == 0 else [(0, 0, 0)] + [(sx * search_mm, sy * search_mm, 0) for sx, sy in ((1, 0), (-1, 0), (0, 1), (0, -1))] + [
        (sx * search_mm, sy * search_mm, a * search_deg) for a in (-1, 1) for sx, sy in ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))
    ]  # fmt: skip
    for dx, dy, dz_deg in offsets:
        d = np.eye(4)
        d[:3, :3] = rotation_about_axis(np.array([0.0, 0.0, 1.0]), math.radians(dz_deg))
        d[:3, 3] = centre - d[:3, :3] @ centre + np.array([dx, dy, 0.0]) / 1000.0
        starts.append(T0 @ d)
    far = max(0.01, 3.0 * search_mm / 1000.0)
    fits = [_icp(surface.coarse, coarse, T, dof, 10, far) for T in starts]
    best = min(fits, key=lambda r: placement_distance(surface, coarse, r[0]) if math.isfinite(r[1]) else math.inf)
    if not math.isfinite(best[1]):
        raise ValueError(f"placement failed: too few depth samples within {far * 1000:.0f} mm of the nominal surface")
    near = 4.0 * surface.spacing_m + 0.002
    T, scale, inl, it = _icp(surface.full, fine, best[0], dof, fine_iterations, near)
    if not math.isfinite(scale):
        raise ValueError("placement failed: the refined placement lost the nominal surface")
    if dof == "planar":
        T = _colour_turn(surface, fine, fine_colour, T, search_deg + 0.5, near)
        T, scale, inl, it2 = _icp(surface.full, fine, T, "translation", 10, near)
        it += it2
    return PlacementFit(np.linalg.inv(T), float(scale), inl, it)


def placement_distance(surface: NominalSurface, points: np.ndarray, T_recipe_world: np.ndarray) -> float:
    """Metres: the mean distance of the observed ``points`` (world frame), mapped by ``T_recipe_world`` into the recipe
    frame, to their nearest nominal surface points, each capped at PLACEMENT_DISTANCE_CAP_M. The cost that
    :func:`fit_placement` ranks its placement hypotheses by."""
    q = transform_points(np.asarray(T_recipe_world, dtype=np.float64), np.asarray(points, dtype=np.float64))
    dist, _ = surface.tree.query(q, distance_upper_bound=PLACEMENT_DISTANCE_CAP_M)
    return float(np.mean(np.minimum(dist, PLACEMENT_DISTANCE_CAP_M))) if len(q) else math.inf


def _colour_turn(surface: NominalSurface, obs: np.ndarray, colour: np.ndarray, T: np.ndarray, range_deg: float, near: float) -> np.ndarray:
    """Refine the turn about the part's vertical axis (through the nominal surface's centre, in the recipe frame) by a
    scan of the joint geometric and chromaticity cost (0.5 deg steps over +-``range_deg``, then 0.1 and 0.04 deg steps).
    Geometry alone cannot fix the turn of a part that is symmetric about that axis (a vase); its painted pattern can."""
    pick = np.linspace(0, len(obs) - 1, min(len(obs), 2000)).astype(np.int64)
    obs, colour = obs[pick], colour[pick]
    chroma = chromaticity(colour)
    centre = np.median(surface.points, axis=0).astype(np.float64)

    def turned(deg: float) -> np.ndarray:
        d = np.eye(4)
        d[:3, :3] = rotation_about_axis(np.array([0.0, 0.0, 1.0]), math.radians(deg))
        d[:3, 3] = centre - d[:3, :3] @ centre
        return d @ T

    def cost(deg: float) -> float:
        q = transform_points(turned(deg), obs)
        dist, j = surface.tree.query(q, distance_upper_bound=near)
        ok = np.isfinite(dist)
        if ok.sum() < 50:
            return float("inf")
        jj = j[ok]
        geo = np.abs(np.einsum("ij,ij->i", surface.normals[jj], q[ok] - surface.points[jj])) / surface.geometry_tol[jj]
        col = np.abs(chroma[ok] - chromaticity(surface.colour[jj].astype(np.float64))).max(axis=1) * CHROMA_SCALE / surface.colour_tol[jj]
        return float(np.mean(np.minimum(geo, 3.0)) + np.mean(np.minimum(col, 3.0))) / max(ok.mean(), 1e-3)

    best = min(np.arange(-range_deg, range_deg + 1e-9, 0.5), key=cost)
    best = min(np.arange(best - 0.4, best + 0.4 + 1e-9, 0.1), key=cost)
    best = min(np.arange(best - 0.08, best + 0.08 + 1e-9, 0.04), key=cost)
    return turned(float(best))
