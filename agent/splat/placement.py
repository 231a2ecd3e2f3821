"""Placement refinement: the part's rigid offset from the recipe frame, by gradient descent through the renderer.

Two entry points, both plain functions on tensors/arrays (no I/O):

- :func:`refine_placement`: cameras known (robot poses), the part sits in the fixture with a small unknown
  rigid offset. Estimates ``T_world_part`` (recipe frame -> world) jointly over all views given, warm-started
  from a previous estimate when views arrive one by one.
- :func:`estimate_single_image_pose`: one image, camera pose unknown (the MAD protocol). Coarse retrieval
  among the enrollment views by a global image descriptor, then the same refinement from the best few
  candidates; returns the camera-to-world pose in the recipe frame.

Parameterisation. The offset is a 6-vector ``xi = (axis-angle w, translation t)`` applied *about the part's
centre* c (world frame, at the initial estimate): ``T = Tr(c) P(xi) Tr(-c) T_init`` with ``P(xi) x = R(w) x + t``.
About the world origin, a rotation of the part also moves its centre by ``R c - c`` (for a part 0.2 m from the
origin, 1 degree moves it 3.5 mm), so rotation and translation gradients are strongly coupled and Adam's
per-coordinate steps zig-zag; about the centre, rotating leaves the centre in place and the two blocks are
nearly independent. The Gaussians are moved by :func:`agent.splat.rasterize`'s ``object_pose``.

Loss per view, per pixel (images downsampled by ``PlacementConfig.scales``, coarse to fine):

- photometric ``0.8 |R - I| + 0.2 (1 - SSIM(R, I))`` (SplatPose's weights; SSIM per pixel, 3DGS's window), with the render composited
  on the view's backdrop colour and scaled by a per-view, per-channel gain fitted in closed form (lighting
  of the cell varies from part to part);
- silhouette ``|alpha - F|``, F the observed foreground coverage: depth > 0 where the frame has depth (the
  backdrop is beyond the depth sensor's range), else :func:`agent.splat.init.backdrop_mask` (colour distance
  to the backdrop colour estimated from the image border);
- depth ``min(|D_render - D| / (depth_scale_px * footprint), 1)`` where both the render and the frame see the
  surface; footprint = metres per pixel at the level (median depth / focal), so the depth residual is measured
  in pixels like the other two terms and coarse levels are not dominated by their blurred depth edges.

Robustness to the anomalies themselves: per view, the ``trim_fraction`` largest pixel residuals inside the
region of interest (observed or rendered foreground) are dropped from the loss (trimmed least absolute
deviations), so a defect (a stain, missing material) cannot pull the pose; the depth residual is also
capped. Each coarse-to-fine level runs Adam with a cosine-decayed step size and stops early once the pose
has stopped moving.

Incremental use (views arriving one by one): ``refine_placement(model, views[:k], init=previous.T_world_part)``.
A warm start runs only the finer levels (``warm_scales``) with smaller steps, and each Adam step renders at most
``views_per_step`` views (the newest one plus the earlier ones in turn), so an update costs about the same
whatever k is while the estimate still uses every view.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Sequence

import cv2
import numpy as np
import torch
from torch import Tensor

from agent import geometry
from agent.capture import Frame
from agent.splat.init import backdrop_mask
from agent.splat.losses import ssim_map
from agent.splat.model import GaussianModel
from agent.splat.pose import pose_from_vector


@dataclass(frozen=True)
class PlacementConfig:
    """Options of :func:`refine_placement`. Step sizes are Adam's initial steps per coordinate."""

    scales: tuple[int, ...] = (4, 2, 1)  # image downsampling factors, coarse to fine
    min_level_size: int = 48  # levels whose smaller image side would fall below this many pixels are skipped
    steps: tuple[int, ...] = (40, 30, 20)  # maximum Adam steps per level
    lr_rotation_deg: float = 0.6
    lr_translation_mm: float = 1.0
    # with a warm start (``init`` given: the estimate from the part's previous views) only these levels run,
    # with the step sizes scaled by warm_lr_factor: the estimate is already close
    warm_scales: tuple[int, ...] = (2, 1)
    warm_steps: tuple[int, ...] = (15, 10)
    warm_lr_factor: float = 0.3
    # views rendered per Adam step (None: all). With more views, each step takes the newest view (the last in
    # ``views``) plus the others in turn (a fixed shuffled cycle), so every view keeps contributing while the
    # cost of a step stays bounded as views accumulate.
    views_per_step: int | None = 4
    lr_final_fraction: float = 0.1  # cosine decay of the step size within a level down to this fraction
    ssim_weight: float = 0.2  # photometric = (1 - w) L1 + w (1 - SSIM)
    silhouette_weight: float = 1.0
    depth_weight: float = 0.5
    depth_scale_px: float = 2.0  # depth residual unit, in pixel footprints (depth / focal) at the level; capped at 1
    trim_fraction: float = 0.05  # per view, share of the largest pixel residuals left out of the loss
    patience: int = 6  # a level stops when over this many steps the pose moved less than the tolerances
    tolerance_mm: float = 0.05
    tolerance_deg: float = 0.02
    max_translation_m: float = 0.05  # a result farther than this from the initial estimate raises
    backend: str = "auto"
    # torch CPU threads during the refinement, restored afterwards (None: leave torch's setting). One thread, as
    # in agent.splat.train: each step is many small ops, and OpenMP threads on a busy 2-core machine are slower.
    torch_threads: int | None = 1

    def __post_init__(self) -> None:
        for scales, steps in ((self.scales, self.steps), (self.warm_scales, self.warm_steps)):
            if not scales or len(scales) != len(steps):
                raise ValueError(f"PlacementConfig: scales {scales} and steps {steps} must be non-empty and equally long")
            if any(int(s) != s or s < 1 for s in scales) or any(int(n) != n or n < 0 for n in steps):
                raise ValueError(f"PlacementConfig: scales {scales} must be integers >= 1 and steps {steps} integers >= 0")
        if self.views_per_step is not None and self.views_per_step < 1:
            raise ValueError(f"PlacementConfig: views_per_step must be >= 1 or None, got {self.views_per_step}")
        if not (0 < self.warm_lr_factor <= 1):
            raise ValueError(f"PlacementConfig: warm_lr_factor must be in (0, 1], got {self.warm_lr_factor}")
        if not (0.0 <= self.trim_fraction < 0.5):
            raise ValueError(f"PlacementConfig: trim_fraction must be in [0, 0.5), got {self.trim_fraction}")
        if not (0.0 <= self.ssim_weight <= 1.0):
            raise ValueError(f"PlacementConfig: ssim_weight must be in [0, 1], got {self.ssim_weight}")
        if self.lr_rotation_deg <= 0 or self.lr_translation_mm <= 0 or self.depth_scale_px <= 0:
            raise ValueError("PlacementConfig: step sizes and depth_scale_px must be positive")
        if self.patience < 2:
            raise ValueError(f"PlacementConfig: patience must be >= 2, got {self.patience}")


@dataclass
class PlacementResult:
    """The estimated placement ``T_world_part`` (recipe frame -> world) and how it was reached."""

    T_world_part: np.ndarray  # 4x4 float64
    translation_m: tuple[float, float, float]  # T_world_part[:3, 3]
    rotation_deg: float  # geodesic angle of T_world_part's rotation
    loss_history: list[float]  # total loss at every Adam step, all levels in order
    iterations: int  # Adam steps taken over all levels
    ms: float  # wall time
    final_loss: float  # loss of the last step (finest level, at the pose before that step's small update)
    level_iterations: list[int] = field(default_factory=list)  # steps taken per level


@dataclass
class SingleImagePoseResult:
    """The camera pose of one image in the recipe frame (OpenGL camera-to-world)."""

    c2w: np.ndarray  # 4x4 float64
    candidate: str  # name of the enrollment view the winning refinement started from
    candidates: list[tuple[str, float]]  # retrieved (name, descriptor similarity), best first
    losses: list[float]  # final refinement loss per candidate, same order
    ms: float


@dataclass(frozen=True)
class SingleImagePoseConfig:
    """Options of :func:`estimate_single_image_pose`."""

    n_candidates: int = 3  # enrollment views refined from (best descriptor similarity first)
    descriptor_size: int = 24  # global descriptor: the foreground crop resized to this many pixels square
    refine: PlacementConfig = PlacementConfig(
        scales=(8, 4, 2, 1), steps=(60, 50, 40, 30), lr_rotation_deg=2.0, lr_translation_mm=3.0, max_translation_m=0.2
    )


# ---------------------------------------------------------------------------------------------
# Observations at one image scale


@dataclass
class _Level:
    """All views at one downsampling factor, as tensors ready for the loss."""

    images: Tensor  # [C,H,W,3] in [0, 1]
    coverage: Tensor  # [C,H,W] observed foreground fraction
    depth: Tensor  # [C,H,W] metres, 0 = no valid measurement
    footprint: Tensor  # [C] metres per pixel at the median observed depth (median depth / focal length)
    backgrounds: Tensor  # [C,3]
    viewmats: Tensor  # [C,4,4]
    Ks: Tensor  # [C,3,3]
    width: int
    height: int


def _subset(level: _Level, idx: list[int]) -> _Level:
    if len(idx) == level.images.shape[0]:
        return level
    i = torch.tensor(idx)
    return _Level(
        level.images[i], level.coverage[i], level.depth[i], level.footprint[i], level.backgrounds[i],
        level.viewmats[i], level.Ks[i], level.width, level.height,
    )  # fmt: skip


def _view_batches(n_views: int, per_step: int | None, n_steps: int) -> list[list[int]]:
    """Views of each step: all, or the newest plus the others in a fixed shuffled cycle."""
    if per_step is None or per_step >= n_views:
        return [list(range(n_views))] * n_steps
    others = np.random.default_rng(0).permutation(n_views - 1).tolist()
    take, out, pos = per_step - 1, [], 0
    for _ in range(n_steps):
        batch = [others[(pos + j) % len(others)] for j in range(take)]
        pos += take
        out.append(sorted(batch) + [n_views - 1])
    return out


def _foreground(frame: Frame) -> np.ndarray:
    if frame.depth is not None:
        return frame.depth > 0
    return backdrop_mask(frame.image)


def _backdrop_colour(image: np.ndarray, fg: np.ndarray) -> np.ndarray:
    """Median colour of the background pixels, [3] in [0, 1] (the whole border when nothing is background)."""
    bg = ~fg
    if bg.sum() < 16:
        bg = np.zeros_like(fg)
        bg[:2], bg[-2:], bg[:, :2], bg[:, -2:] = True, True, True, True
    return np.median(image[bg].astype(np.float64), axis=0) / 255.0


def _downsample(frame: Frame, fg: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, geometry.Intrinsics]:
    """Area-averaged image and foreground coverage, block-mean depth of fully measured blocks, scaled intrinsics."""
    K = frame.intrinsics
    w, h = max(1, K.width // factor), max(1, K.height // factor)
    img = frame.image.astype(np.float32) / 255.0
    cov = fg.astype(np.float32)
    if frame.depth is not None:
        valid = (frame.depth > 0).astype(np.float32)
        dsum = frame.depth.astype(np.float32) * valid
    if (w, h) != (K.width, K.height):
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
        cov = cv2.resize(cov, (w, h), interpolation=cv2.INTER_AREA)
        if frame.depth is not None:
            valid = cv2.resize(valid, (w, h), interpolation=cv2.INTER_AREA)
            dsum = cv2.resize(dsum, (w, h), interpolation=cv2.INTER_AREA)
    if frame.depth is None:
        depth = np.zeros((h, w), np.float32)
    else:
        depth = np.where(valid > 0.999, dsum / np.maximum(valid, 1e-6), 0.0).astype(np.float32)
    return img, cov, depth, K.scaled(w, h)


def _check_views(views: Sequence[Frame], what: str) -> None:
    if not views:
        raise ValueError(f"{what} needs at least one view")
    for f in views:
        if f.c2w is None:
            raise ValueError(f"{what}: frame {f.name} has no camera pose (c2w)")
        geometry.check_rigid(f.c2w, what=f"frame {f.name} c2w")
        if f.image.ndim != 3 or f.image.shape[2] != 3 or f.image.dtype != np.uint8:
            raise ValueError(f"{what}: frame {f.name} image must be H x W x 3 uint8, got {f.image.shape} {f.image.dtype}")
        if f.image.shape[:2] != (f.intrinsics.height, f.intrinsics.width):
            raise ValueError(
                f"{what}: frame {f.name} image is {f.image.shape[1]}x{f.image.shape[0]} but its intrinsics say "
                f"{f.intrinsics.width}x{f.intrinsics.height}"
            )
        if f.depth is not None and f.depth.shape != f.image.shape[:2]:
            raise ValueError(f"{what}: frame {f.name} depth is {f.depth.shape}, its image {f.image.shape[:2]}")
    sizes = {(f.intrinsics.width, f.intrinsics.height) for f in views}
    if len(sizes) > 1:
        raise ValueError(f"{what}: all views must have the same image size, got {sorted(sizes)}")


def _levels(views: Sequence[Frame], scales: Sequence[int], dtype: torch.dtype) -> list[_Level]:
    fgs = [_foreground(f) for f in views]
    bgs = torch.tensor(np.stack([_backdrop_colour(f.image, m) for f, m in zip(views, fgs)]), dtype=dtype)
    viewmats = torch.tensor(np.stack([geometry.c2w_gl_to_w2c_cv(f.c2w) for f in views]), dtype=dtype)
    out = []
    for s in scales:
        parts = [_downsample(f, m, s) for f, m in zip(views, fgs)]
        Ks = torch.tensor(np.stack([p[3].matrix() for p in parts]), dtype=dtype)
        footprint = [
            float(np.median(p[2][p[2] > 0])) * 2 / (p[3].fx + p[3].fy) if (p[2] > 0).any() else 1.0 for p in parts
        ]  # views without depth never use it
        out.append(
            _Level(
                images=torch.tensor(np.stack([p[0] for p in parts]), dtype=dtype),
                coverage=torch.tensor(np.stack([p[1] for p in parts]), dtype=dtype),
                depth=torch.tensor(np.stack([p[2] for p in parts]), dtype=dtype),
                footprint=torch.tensor(footprint, dtype=dtype),
                backgrounds=bgs,
                viewmats=viewmats,
                Ks=Ks,
                width=parts[0][3].width,
                height=parts[0][3].height,
            )
        )
    return out


# ---------------------------------------------------------------------------------------------
# Loss


def _view_losses(model: GaussianModel, level: _Level, object_pose: Tensor, config: PlacementConfig) -> Tensor:
    """Trimmed mean pixel residual of each view [C] with the model placed at ``object_pose``."""
    out = model.render(
        level.viewmats, level.Ks, level.width, level.height,
        object_pose=object_pose, backgrounds=level.backgrounds, backend=config.backend,
    )  # fmt: skip
    alpha = out.alpha[..., 0]
    bg = level.backgrounds[:, None, None, :]
    # Per-view, per-channel gain of the part's colour (closed form, no gradient): lighting varies by part.
    with torch.no_grad():
        fg_r = (out.rgb - (1 - alpha[..., None]) * bg) * level.coverage[..., None]
        fg_i = (level.images - (1 - level.coverage[..., None]) * bg) * level.coverage[..., None]
        gain = ((fg_r * fg_i).sum((1, 2)) / (fg_r * fg_r).sum((1, 2)).clamp_min(1e-8)).clamp(0.5, 2.0)
    rgb = (out.rgb - (1 - alpha[..., None]) * bg) * gain[:, None, None, :] + (1 - alpha[..., None]) * bg
    w = config.ssim_weight
    residual = (1 - w) * (rgb - level.images).abs().mean(-1)
    if w > 0:
        residual = residual + w * (1 - ssim_map(rgb, level.images).mean(1))
    residual = residual + config.silhouette_weight * (alpha - level.coverage).abs()
    if config.depth_weight > 0:
        both = (level.depth > 0) & (alpha.detach() > 0.5)
        d = (out.depth[..., 0] - level.depth).abs() / (config.depth_scale_px * level.footprint[:, None, None])
        residual = residual + config.depth_weight * torch.where(both, d.clamp_max(1.0), torch.zeros_like(d))
    roi = (level.coverage > 0) | (alpha.detach() > 0.02)
    losses = []
    for c in range(residual.shape[0]):
        r = residual[c][roi[c]]
        if r.numel() == 0:
            losses.append(residual[c].sum() * 0)
            continue
        keep = r.numel() - int(config.trim_fraction * r.numel())
        losses.append(torch.topk(r, keep, largest=False, sorted=False).values.sum() / r.numel())
    return torch.stack(losses)


# ---------------------------------------------------------------------------------------------
# Refinement


def _model_centre(model: GaussianModel) -> np.ndarray:
    """Centre of the model's bounding box (1st-99th percentile of the means: floaters do not move it)."""
    m = model.means.detach().double()
    lo, hi = torch.quantile(m, 0.01, dim=0), torch.quantile(m, 0.99, dim=0)
    return ((lo + hi) / 2).numpy()


def _translation(c: np.ndarray) -> np.ndarray:
    T = np.eye(4)
    T[:3, 3] = c
    return T


def _compose(rot: Tensor, trans: Tensor, around: Tensor, T_init: Tensor) -> Tensor:
    """Tr(c) P(rot, trans) Tr(-c) T_init, differentiable in rot (rad) and trans (m)."""
    P = pose_from_vector(torch.cat([rot, trans]))
    return around @ P @ torch.linalg.inv(around) @ T_init


def refine_placement(
    model: GaussianModel,
    views: Sequence[Frame],
    init: np.ndarray | None = None,
    config: PlacementConfig = PlacementConfig(),
) -> PlacementResult:
    """Estimate ``T_world_part`` (recipe frame -> world) from posed views of a part in the fixture.

    ``init``: a starting estimate (e.g. the result for the previous views of the same part; warm start);
    None = the recipe placement (identity). All views are used jointly at every step. See the module
    docstring for the parameterisation and the loss.
    """
    _check_views(views, "refine_placement")
    threads = torch.get_num_threads()
    if config.torch_threads is not None:
        torch.set_num_threads(config.torch_threads)
    try:
        return _refine(model, views, init, config)
    finally:
        torch.set_num_threads(threads)


def _refine(model: GaussianModel, views: Sequence[Frame], init: np.ndarray | None, config: PlacementConfig) -> PlacementResult:
    t0 = time.perf_counter()
    T_init_np = np.eye(4) if init is None else geometry.check_rigid(init, what="refine_placement init")
    dtype = model.means.dtype
    model = model.to(dtype=dtype)  # detached copy: the model's own parameters never get gradients
    centre = geometry.transform_points(T_init_np, _model_centre(model)[None])[0]
    around = torch.tensor(_translation(centre), dtype=torch.float64)
    T_init = torch.tensor(T_init_np, dtype=torch.float64)
    rot = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    trans = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    lr_rot, lr_trans = math.radians(config.lr_rotation_deg), config.lr_translation_mm / 1000.0
    scales, steps = config.scales, config.steps
    if init is not None:
        scales, steps = config.warm_scales, config.warm_steps
        lr_rot, lr_trans = lr_rot * config.warm_lr_factor, lr_trans * config.warm_lr_factor
    history: list[float] = []
    level_iterations: list[int] = []
    side = min(views[0].intrinsics.width, views[0].intrinsics.height)
    plan = [(s, n) for s, n in zip(scales, steps) if side // s >= config.min_level_size] or [(1, steps[-1])]
    for level, n_steps in zip(_levels(views, [s for s, _ in plan], dtype), [n for _, n in plan]):
        opt = torch.optim.Adam([{"params": [rot], "lr": lr_rot}, {"params": [trans], "lr": lr_trans}])
        trail: list[np.ndarray] = []
        taken = 0
        batches = _view_batches(len(views), config.views_per_step, n_steps)
        for step in range(n_steps):
            decay = config.lr_final_fraction + (1 - config.lr_final_fraction) * 0.5 * (1 + math.cos(math.pi * step / max(n_steps - 1, 1)))
            opt.param_groups[0]["lr"], opt.param_groups[1]["lr"] = lr_rot * decay, lr_trans * decay
            opt.zero_grad(set_to_none=True)
            T = _compose(rot, trans, around, T_init)
            loss = _view_losses(model, _subset(level, batches[step]), T, config).mean()
            loss.backward()
            opt.step()
            taken += 1
            history.append(float(loss.detach()))
            trail.append(np.concatenate([rot.detach().numpy(), trans.detach().numpy()]))
            if len(trail) > config.patience:
                moved = trail[-1] - trail[-1 - config.patience]
                if (
                    math.degrees(np.linalg.norm(moved[:3])) < config.tolerance_deg
                    and np.linalg.norm(moved[3:]) * 1000 < config.tolerance_mm
                ):
                    break
        level_iterations.append(taken)
    with torch.no_grad():
        T = _compose(rot, trans, around, T_init)
    T_np = T.detach().numpy().copy()
    T_np[3] = [0.0, 0.0, 0.0, 1.0]
    moved_m = float(np.linalg.norm(T_np[:3, 3] - T_init_np[:3, 3]))
    if not np.all(np.isfinite(T_np)) or moved_m > config.max_translation_m:
        raise RuntimeError(
            f"placement refinement diverged: the estimate moved {moved_m * 1000:.1f} mm from the initial placement "
            f"(limit {config.max_translation_m * 1000:.0f} mm); check the camera poses and the recipe"
        )
    return PlacementResult(
        T_world_part=T_np,
        translation_m=tuple(float(v) for v in T_np[:3, 3]),
        rotation_deg=geometry.rotation_angle_deg(T_np[:3, :3]),
        loss_history=history,
        iterations=sum(level_iterations),
        ms=(time.perf_counter() - t0) * 1000.0,
        final_loss=history[-1] if history else float("nan"),
        level_iterations=level_iterations,
    )


# ---------------------------------------------------------------------------------------------
# Single image, unknown camera pose


def global_descriptor(image: np.ndarray, size: int = 24) -> np.ndarray:
    """A unit vector describing a whole view: the foreground's bounding box (square, on the backdrop colour),
    resized to ``size`` x ``size`` RGB, zero-mean. Crop-and-resize makes it insensitive to small shifts and
    scale changes of the part in the image; what remains is its outline and colour layout, i.e. the viewpoint."""
    fg = backdrop_mask(image)
    img = image.astype(np.float32) / 255.0
    if fg.any():
        rows, cols = np.nonzero(fg.any(1))[0], np.nonzero(fg.any(0))[0]
        cy, cx = (rows[0] + rows[-1] + 1) / 2, (cols[0] + cols[-1] + 1) / 2
        half = max(rows[-1] + 1 - rows[0], cols[-1] + 1 - cols[0]) / 2 + 1
        bg = _backdrop_colour(image, fg).astype(np.float32)
        M = np.array([[half / (size / 2), 0, cx - half], [0, half / (size / 2), cy - half]], dtype=np.float32)
        crop = cv2.warpAffine(
            img, M, (size, size), flags=cv2.INTER_AREA | cv2.WARP_INVERSE_MAP,
            borderMode=cv2.BORDER_CONSTANT, borderValue=tuple(float(v) for v in bg),
        )  # fmt: skip
    else:
        crop = cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    v = (crop - crop.mean()).reshape(-1)
    return v / max(float(np.linalg.norm(v)), 1e-9)


def estimate_single_image_pose(
    model: GaussianModel,
    image: np.ndarray,
    intrinsics: geometry.Intrinsics,
    enrollment_views: Sequence[Frame],
    config: SingleImagePoseConfig = SingleImagePoseConfig(),
) -> SingleImagePoseResult:
    """Camera-to-world pose (recipe frame, OpenGL) of a single image whose pose is unknown.

    1. Retrieval: the ``n_candidates`` enrollment views whose :func:`global_descriptor` is most similar.
    2. From each, :func:`refine_placement` of the model seen by a camera fixed at the candidate's pose
       (the image has no depth here: foreground from the backdrop colour). A refined object pose T with
       the camera at ``c2w_cand`` is the same picture as the camera at ``T^-1 c2w_cand`` with the part at
       rest, so the estimate is ``inv(T) @ c2w_cand``. The candidate with the lowest final loss wins.
    """
    if not enrollment_views:
        raise ValueError("estimate_single_image_pose needs enrollment views to retrieve from")
    if config.n_candidates < 1:
        raise ValueError(f"n_candidates must be >= 1, got {config.n_candidates}")
    t0 = time.perf_counter()
    query = Frame(name="query", image=np.asarray(image), intrinsics=intrinsics, c2w=np.eye(4))
    _check_views([query], "estimate_single_image_pose")
    intrinsics.validate()
    for f in enrollment_views:
        if f.c2w is None:
            raise ValueError(f"estimate_single_image_pose: enrollment view {f.name} has no camera pose")
    q = global_descriptor(query.image, config.descriptor_size)
    sims = np.array([float(q @ global_descriptor(f.image, config.descriptor_size)) for f in enrollment_views])
    order = np.argsort(-sims)[: config.n_candidates]
    best: tuple[float, np.ndarray, str] | None = None
    losses = []
    for i in order:
        cand = enrollment_views[int(i)]
        view = replace(query, name=f"query@{cand.name}", c2w=np.asarray(cand.c2w, dtype=np.float64))
        try:
            res = refine_placement(model, [view], None, config.refine)
        except RuntimeError:
            losses.append(float("inf"))
            continue
        losses.append(res.final_loss)
        if best is None or res.final_loss < best[0]:
            best = (res.final_loss, geometry.invert_rigid(res.T_world_part) @ view.c2w, cand.name)
    if best is None:
        raise RuntimeError("single-image pose: the refinement diverged from every retrieved candidate")
    return SingleImagePoseResult(
        c2w=best[1],
        candidate=best[2],
        candidates=[(enrollment_views[int(i)].name, float(sims[i])) for i in order],
        losses=losses,
        ms=(time.perf_counter() - t0) * 1000.0,
    )
