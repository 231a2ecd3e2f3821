"""Per-view anomaly maps: three kinds of evidence against the reference, combined on a nominal-fitted scale.

Channels (:data:`agent.recipe.CHANNELS`), each an H x W float32 map, blurred with the same Gaussian:

``memory``    PatchCore: distance of each patch feature of the observed image to the nearest feature of
              the memory bank (golden views plus renders of the reference around the enrollment trajectory).
``feature``   SplatPose's render-and-compare: per-stage squared difference of L2-normalised backbone
              features of the observed image and of the reference rendered at the refined placement
              (composited over the observed image where the render is transparent, with a per-channel
              colour gain fitted in closed form for the cell's lighting).
``geometry``  missing/extra material: where the rendered reference covers a pixel and the camera sees no
              part (missing), where the camera sees part and the reference does not (extra), and the
              depth difference (in units of ``depth_scale_m``, capped at 3) where both see the surface.
              Silhouettes are compared with a tolerance of ``tolerance_px`` pixels.

:func:`combine_channels` scales each channel by an offset and a scale fitted on nominal views only
(:func:`fit_channel_calibration`) and takes the maximum over channels: a defect that shows in any one kind of
evidence scores, and each channel reaches 1 at the worst pixel seen on nominal data.

Plain functions on arrays/tensors, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
import scipy.ndimage
import torch

from agent.capture import Frame
from agent.features import PatchFeatureExtractor, stage_difference_map
from agent.geometry import Intrinsics
from agent.memory_bank import MemoryBank, anomaly_maps
from agent.splat.init import backdrop_mask
from agent.splat.model import GaussianModel, Ks_from_intrinsics, viewmats_from_c2w

# The geometry channel's scale is never fitted below this (1 = one full pixel of missing material after
# the blur): on nominal views it is often nearly zero everywhere, and a tiny fitted scale would turn the
# smallest placement error at inspection into a high score.
MIN_GEOMETRY_SCALE = 0.2
DEPTH_EVIDENCE_CAP = 3.0


def map_sigma_px(width: int) -> float:
    """Blur of the channel maps: PatchCore's sigma 4 at 256 px wide, scaled with the image (>= 1 px)."""
    return max(1.0, 4.0 * width / 256.0)


def observed_foreground(frame: Frame) -> np.ndarray:
    """H x W bool: the part as the camera sees it. Depth > 0 where the frame has depth (the backdrop is
    beyond the sensor's range), else a colour-distance test against the backdrop."""
    if frame.depth is not None:
        return np.asarray(frame.depth) > 0
    return backdrop_mask(frame.image)


def backdrop_colour(image: np.ndarray, foreground: np.ndarray) -> np.ndarray:
    """Median RGB in [0, 1] of the pixels off the part (of the image border when there are none)."""
    img = np.asarray(image, dtype=np.float32) / 255.0
    off = ~np.asarray(foreground, dtype=bool)
    if off.sum() < 16:
        off = np.zeros_like(off)
        off[:2], off[-2:], off[:, :2], off[:, -2:] = True, True, True, True
    return np.median(img[off], axis=0)


@dataclass
class ReferenceView:
    """The reference rendered for one view: premultiplied colour, coverage and depth (0 where uncovered)."""

    rgb: np.ndarray  # H x W x 3 float32, premultiplied by alpha (rendered over black)
    alpha: np.ndarray  # H x W float32
    depth: np.ndarray  # H x W float32 metres, 0 where alpha < 0.5

    def composite(self, background: np.ndarray, gain: np.ndarray | None = None) -> np.ndarray:
        """H x W x 3 float32 in [0, 1]: the render over ``background`` (an image or one colour)."""
        rgb = self.rgb if gain is None else self.rgb * gain[None, None, :]
        bg = np.asarray(background, dtype=np.float32)
        if bg.ndim == 3 and bg.dtype != np.float32:
            bg = bg.astype(np.float32)
        if bg.ndim == 3 and bg.max() > 1.0:
            bg = bg / 255.0
        return np.clip(rgb + (1.0 - self.alpha[..., None]) * bg, 0.0, 1.0).astype(np.float32)


def render_reference(
    model: GaussianModel, c2w: np.ndarray, K: Intrinsics, T_world_part: np.ndarray | None = None, backend: str = "auto"
) -> ReferenceView:
    """Render the reference model placed at ``T_world_part`` (None = the recipe placement) into one camera."""
    with torch.no_grad():
        pose = None if T_world_part is None else torch.as_tensor(np.asarray(T_world_part), dtype=model.means.dtype)
        out = model.render(
            viewmats_from_c2w(c2w, dtype=model.means.dtype), Ks_from_intrinsics(K, dtype=model.means.dtype),
            K.width, K.height, object_pose=pose, backend=backend,
        )  # fmt: skip
    alpha = out.alpha[0, ..., 0].float().cpu().numpy()
    depth = out.depth[0, ..., 0].float().cpu().numpy()
    depth = np.where(alpha >= 0.5, depth, 0.0).astype(np.float32)
    return ReferenceView(out.rgb[0].float().cpu().numpy(), alpha, depth)


def colour_gain(observed: np.ndarray, reference: ReferenceView, foreground: np.ndarray, limits=(0.7, 1.4)) -> np.ndarray:
    """Per-channel gain g minimising |g * reference - observed|^2 on pixels both see well (lighting changes)."""
    sel = (reference.alpha > 0.95) & np.asarray(foreground, dtype=bool)
    if sel.sum() < 16:
        return np.ones(3, np.float32)
    o = np.asarray(observed, dtype=np.float32)[sel] / 255.0
    r = reference.rgb[sel] / reference.alpha[sel][:, None]
    gain = (o * r).sum(0) / np.maximum((r * r).sum(0), 1e-6)
    return np.clip(gain, *limits).astype(np.float32)


def depth_edges(depth: np.ndarray, jump_m: float) -> np.ndarray:
    """H x W bool: pixels whose 3x3 neighbourhood spans a depth jump larger than ``jump_m`` (silhouettes and
    self-occlusion edges, where a small misalignment gives a large depth difference)."""
    d = np.asarray(depth, dtype=np.float32)
    valid = d > 0
    kernel = np.ones((3, 3), np.uint8)
    hi = cv2.dilate(np.where(valid, d, 0.0).astype(np.float32), kernel)
    lo = cv2.erode(np.where(valid, d, np.inf).astype(np.float32), kernel)
    return valid & (hi - lo > jump_m)


def geometry_evidence(
    observed_fg: np.ndarray,
    observed_depth: np.ndarray | None,
    reference: ReferenceView,
    depth_scale_m: float,
    tolerance_px: int = 1,
) -> np.ndarray:
    """Missing / extra material evidence, H x W float32 (before the blur); see the module docstring."""
    ref_fg = reference.alpha >= 0.5
    obs_fg = np.asarray(observed_fg, dtype=bool)
    kernel = np.ones((2 * tolerance_px + 1,) * 2, np.uint8)

    def erode(m):
        return cv2.erode(m.astype(np.uint8), kernel).astype(bool)

    def dilate(m):
        return cv2.dilate(m.astype(np.uint8), kernel).astype(bool)

    evidence = ((erode(ref_fg) & ~dilate(obs_fg)) | (erode(obs_fg) & ~dilate(ref_fg))).astype(np.float32)
    if observed_depth is not None:
        obs_depth = np.asarray(observed_depth, dtype=np.float32)
        both = erode(ref_fg & obs_fg) & ~depth_edges(reference.depth, 2 * depth_scale_m) & ~depth_edges(obs_depth, 2 * depth_scale_m)
        diff = np.abs(obs_depth - reference.depth) / depth_scale_m
        diff = np.where(both, np.minimum(diff, DEPTH_EVIDENCE_CAP), 0.0).astype(np.float32)
        diff = cv2.medianBlur(diff, 3)  # single noisy pixels on depth edges are not material
        evidence = np.maximum(evidence, diff)
    return evidence


def channel_maps(
    extractor: PatchFeatureExtractor,
    bank: MemoryBank,
    observed: np.ndarray,
    reference_rgb: np.ndarray,
    geometry: np.ndarray,
    sigma_px: float,
) -> np.ndarray:
    """The three raw channel maps [3, H, W] float32 for one view (see the module docstring)."""
    H, W = observed.shape[:2]
    obs = torch.from_numpy(np.ascontiguousarray(observed, dtype=np.uint8)).float().div_(255.0)
    ref = torch.from_numpy(np.ascontiguousarray(reference_rgb, dtype=np.float32))
    stages = extractor.stage_maps(torch.stack([obs, ref]))  # one batch of two: faster than two calls
    obs_stages = [s[:1] for s in stages]
    ref_stages = [s[1:] for s in stages]
    feats = extractor.features_from_stages(obs_stages)
    memory = anomaly_maps(bank.score_patches(feats.features), (H, W), feats.stride, sigma_px)[0]
    feature = stage_difference_map(obs_stages, ref_stages, extractor.stage_strides, (H, W))[0].cpu().numpy()
    feature = scipy.ndimage.gaussian_filter(feature, sigma_px)
    geometry = scipy.ndimage.gaussian_filter(np.asarray(geometry, dtype=np.float32), sigma_px)
    return np.stack([memory, feature, geometry]).astype(np.float32)


def fit_channel_calibration(nominal_maps: list[np.ndarray], quantile: float = 0.999) -> tuple[np.ndarray, np.ndarray]:
    """Offset (median) and scale (``quantile`` - median) of each channel over all pixels of nominal views.

    The geometry channel's scale is at least :data:`MIN_GEOMETRY_SCALE`.
    """
    if not nominal_maps:
        raise ValueError("fit_channel_calibration needs at least one nominal view")
    stacked = np.stack([np.asarray(m, dtype=np.float32).reshape(3, -1) for m in nominal_maps], axis=1).reshape(3, -1)
    offset = np.median(stacked, axis=1)
    scale = np.maximum(np.quantile(stacked, quantile, axis=1) - offset, 1e-6)
    scale[2] = max(scale[2], MIN_GEOMETRY_SCALE)
    return offset.astype(np.float64), scale.astype(np.float64)


def combine_channels(maps: np.ndarray, offset, scale) -> np.ndarray:
    """H x W float32: ``max_c (maps[c] - offset[c]) / scale[c]``."""
    maps = np.asarray(maps, dtype=np.float32)
    off = np.asarray(offset, dtype=np.float32)[:, None, None]
    sc = np.asarray(scale, dtype=np.float32)[:, None, None]
    return ((maps - off) / sc).max(axis=0)
