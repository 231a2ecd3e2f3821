"""Per-view anomaly maps: three kinds of evidence against the reference, combined on a nominal-fitted scale.

Channels (:data:`agent.recipe.CHANNELS`), each an H x W float32 map, blurred with the same Gaussian:

``memory``    PatchCore: distance of each patch feature of the observed image to the nearest feature of
              the memory bank (golden views plus renders of the reference around the enrollment trajectory).
``reference`` pose-conditioned PatchCore: for each patch of the observed image, the distance of its
              (L2-normalised) feature to the nearest feature of the reference rendered at the refined placement
              within a ``REFERENCE_WINDOW`` x ``REFERENCE_WINDOW`` patch neighbourhood
              (:func:`reference_patch_distance`); the render is composited over the observed image where it
              is transparent, with a per-channel colour gain fitted in closed form for the cell's lighting.
``geometry``  missing/extra material: where the rendered reference covers a pixel and the camera sees no
              part (missing), where the camera sees part and the reference does not (extra), and the
              depth difference (in units of ``depth_scale_m``, capped at 3) where both see the surface.
              Silhouettes and depths are compared with a tolerance of ``tolerance_px`` pixels.

:func:`combine_channels` scales each channel by an offset and a scale fitted on nominal views only
(:func:`fit_channel_calibration`), weights it (:data:`CHANNEL_WEIGHTS`: geometry is secondary) and takes the
maximum over channels: memory and reference reach 1 at the worst pixel seen on nominal data, geometry counts
only where its evidence is well above anything nominal.

Views with depth are scored against the recipe's nominal surface instead (:func:`surface_channel_maps`,
:data:`SURFACE_CHANNELS`): extra material, material inside the surface, colour, and material missing in the line
of sight; :func:`combine_surface_channels` divides each by its typical peak on nominal views, takes the maximum and
widens it by a pixel (:func:`localisation_tolerance`).

Plain functions on arrays/tensors, no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import cv2
import numpy as np
import torch

from agent.capture import Frame
from agent.features import PatchFeatureExtractor
from agent.filters import gaussian_blur, maximum_filter
from agent.geometry import Intrinsics
from agent.memory_bank import MemoryBank, anomaly_maps
from agent.reference_views import ReferenceView
from agent.splat.init import backdrop_mask
from agent.splat.model import GaussianModel, Ks_from_intrinsics, viewmats_from_c2w
from agent.surface import NominalSurface, depth_range, geometry_contrast, surface_residuals

# The geometry channel's scale is never fitted below this (1 = one full pixel of missing material after
# the blur): on nominal views it is often nearly zero everywhere, and a tiny fitted scale would turn the
# smallest placement error at inspection into a high score.
MIN_GEOMETRY_SCALE = 0.2
DEPTH_EVIDENCE_CAP = 3.0
# Weights of (memory, reference, geometry) in the combined map. Geometry is secondary: it counts only where it
# reaches 3x its nominal peak. Measured on simulated cell data (128 px, 3 objects, 3 good + 5 defective each):
# at weight 1 the geometry channel fires on good parts at inspection (placement residuals of 2-4 mm on
# init_from_depth references) more than on most defects. The memory channel keeps weight 1: it is what finds
# large colour defects (tests/test_pipeline.py) that the windowed reference channel under-scores.
CHANNEL_WEIGHTS = (1.0, 1.0, 1.0 / 3.0)
REFERENCE_WINDOW = 3  # patches: the reference channel tolerates +-1 patch (stride 8 px) of misalignment


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
    """Per-channel gain g, the median of observed / reference over pixels both see well (lighting changes).

    The median, not a least-squares fit: a defect covering a minority of the part must not change the gain
    (and so the whole reference)."""
    sel = (reference.alpha > 0.95) & np.asarray(foreground, dtype=bool)
    if sel.sum() < 16:
        return np.ones(3, np.float32)
    o = np.asarray(observed, dtype=np.float32)[sel] / 255.0
    r = reference.rgb[sel] / reference.alpha[sel][:, None]
    gain = np.array([np.median(o[r[:, c] > 0.02, c] / r[r[:, c] > 0.02, c]) if (r[:, c] > 0.02).sum() >= 16 else 1.0 for c in range(3)])
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
    """Missing / extra material evidence, H x W float32 (before the blur); see the module docstring.

    Both tests tolerate a misalignment of ``tolerance_px`` pixels: silhouettes are compared after erosion and
    dilation by it, and an observed depth is compared with the range of reference depths within it.
    """
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
        lo, hi = depth_range(reference.depth, tolerance_px)
        lo = np.where(np.isfinite(lo), lo, hi)  # no reference depth near: ``both`` excludes the pixel anyway
        diff = np.maximum(np.maximum(obs_depth - hi, lo - obs_depth), 0.0) / depth_scale_m
        diff = np.where(both, np.minimum(diff, DEPTH_EVIDENCE_CAP), 0.0).astype(np.float32)
        diff = cv2.medianBlur(diff, 3)  # single noisy pixels on depth edges are not material
        evidence = np.maximum(evidence, diff)
    return evidence


def reference_patch_distance(observed: torch.Tensor, reference: torch.Tensor, window: int = 3) -> np.ndarray:
    """Pose-conditioned PatchCore: for each observed patch feature, the distance to the nearest patch feature
    of the rendered reference within a ``window`` x ``window`` patch neighbourhood at the same place
    (``[1, D, h, w]`` each -> ``[h, w]`` float32, in [0, 2]). Features are L2-normalised per patch first, so a
    global gain change of the image matters little. The window absorbs placement and rendering misalignment of
    up to ``window // 2`` patches; the reference's border patches are repeated at the image edge."""
    if observed.shape != reference.shape or observed.ndim != 4 or observed.shape[0] != 1:
        raise ValueError(f"observed and reference features must both be [1, D, h, w], got {tuple(observed.shape)} and {tuple(reference.shape)}")
    if window < 1 or window % 2 == 0:
        raise ValueError(f"window must be odd and >= 1, got {window}")
    _, D, h, w = observed.shape
    pad = window // 2
    obs = torch.nn.functional.normalize(observed.float(), dim=1)
    ref = torch.nn.functional.normalize(reference.float(), dim=1)
    if pad:
        ref = torch.nn.functional.pad(ref, (pad, pad, pad, pad), mode="replicate")
    candidates = torch.nn.functional.unfold(ref, window).view(D, window * window, h * w)
    d2 = (obs.reshape(D, 1, h * w) - candidates).square().sum(0).min(0).values
    return d2.clamp_min(0).sqrt().view(h, w).cpu().numpy().astype(np.float32)


def channel_maps(
    extractor: PatchFeatureExtractor,
    bank: MemoryBank,
    observed: np.ndarray,
    reference_rgb: np.ndarray,
    geometry: np.ndarray,
    sigma_px: float,
    window: int = REFERENCE_WINDOW,
) -> np.ndarray:
    """The three raw channel maps [3, H, W] float32 for one view (see the module docstring)."""
    H, W = observed.shape[:2]
    obs = torch.from_numpy(np.ascontiguousarray(observed, dtype=np.uint8)).float().div_(255.0)
    ref = torch.from_numpy(np.ascontiguousarray(reference_rgb, dtype=np.float32))
    feats = extractor(torch.stack([obs, ref]))  # one batch of two: faster than two calls
    obs_feats, ref_feats = feats.features[:1], feats.features[1:]
    memory = anomaly_maps(bank.score_patches(obs_feats), (H, W), feats.stride, sigma_px)[0]
    reference = anomaly_maps(reference_patch_distance(obs_feats, ref_feats, window), (H, W), feats.stride, sigma_px)
    geometry = gaussian_blur(geometry, sigma_px)
    return np.stack([memory, reference, geometry]).astype(np.float32)


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
    """H x W float32: ``max_c w[c] (maps[c] - offset[c]) / scale[c]`` with ``w`` = :data:`CHANNEL_WEIGHTS`."""
    maps = np.asarray(maps, dtype=np.float32)
    off = np.asarray(offset, dtype=np.float32)[:, None, None]
    sc = np.asarray(scale, dtype=np.float32)[:, None, None]
    w = np.asarray(CHANNEL_WEIGHTS, dtype=np.float32)[:, None, None]
    return (w * (maps - off) / sc).max(axis=0)


# ---------------------------------------------------------------------------------------------
# Surface scoring (views with depth against the recipe's nominal surface)

SURFACE_CHANNELS = ("extra", "inside", "colour", "missing")
# Each channel is divided by its typical peak on held-out golden views (the channel scale, fitted at enrollment), so
# all four weigh the same. The colour scale is at least COLOUR_SCALE_FLOOR (a 15 % local colour or brightness
# change): the golden views share one lighting, so they cannot show how much a cell's light varies between parts
# (intensity, turned lights, moved shadows). Measured on the tuning seed (3 recipes x 6 good + 10 defective parts,
# 256 px): part-level I-AUROC 0.94 with the floor at 0.1, 0.96 at 0.15.
SURFACE_CHANNEL_WEIGHTS = (1.0, 1.0, 1.0, 1.0)
COLOUR_SCALE_FLOOR = 0.15
GEOMETRY_SCALE_FLOORS = (0.1, 0.1)  # extra, inside: a tenth of the points' nominal tolerance
# The missing channel is the share of pixels the camera sees through the nominal surface (agent.surface.see_through)
# in a Gaussian window of MISSING_SIGMA map sigmas (1.5 px at 256 px): a chunk gone from an outline is only 5-8 px
# across on a small part. Its scale is at least MISSING_SCALE_FLOOR (a quarter of the window). Measured with `agent
# eval` on the tuning seed (seed 21, 3 recipes, 8 good + 10 defective parts, 3 teach-in parts, 256 px), before -> with
# the channel: P-AUROC of the missing-material parts vase 0.890 -> 0.975, bracket 0.864 -> 0.912 (their notch pixels
# had no depth, so no score), stool 0.852 either way (its chunks cover 1-23 pixels of a view); mean P-AUROC 0.958 ->
# 0.965, I-AUROC 0.921 -> 0.929 (bracket missing 0.81 -> 0.94). With a 2 px margin in from the outline instead of 1,
# the missing parts' P-AUROC gained a third to a half as much (measured with a fixed 3 mm gap); a 3 px window scored
# like 1.5 px. Fusing the pixels that the camera saw through at the surface's depth even where it saw a far surface
# cost a stool part 0.05 of its score. The floor set the scale on all three recipes; as a fixed scale 0.15 scored the
# same I-AUROC there (bracket / vase / stool 0.900 / 0.913 / 0.975), 0.1 less (0.856 / 0.900 / 0.975: good parts'
# stray see-through pixels), 0.4 less on the bracket (0.875).
MISSING_SIGMA = 0.375
MISSING_SCALE_FLOOR = 0.25
MISSING_FUSION_LEVEL = 0.01  # below this share the pixel is not fused through the nominal surface's depth
SURFACE_SCALE_FLOORS = (*GEOMETRY_SCALE_FLOORS, COLOUR_SCALE_FLOOR, MISSING_SCALE_FLOOR)
# The geometry channels average the signed distance to the surface over GEOMETRY_SIGMA map sigmas (3 px at 256 px)
# and subtract its average over GEOMETRY_BASELINE map sigmas (40 px). Before, the positive and negative parts were
# each blurred over 1 px: depth noise (0.5 mm on parts whose tolerance is 0.4 mm) then set the floor of every good
# part. Averaging the signed distance cancels the noise; what is left on good parts is a smooth tilt from placement
# errors of 0.1-0.2 mm, which the baseline takes out (dents, burrs and missing chunks are 6-13 px across). Measured
# on two tuning seeds (3 recipes, 14 good + 25 defective parts each, 256 px): mean I-AUROC 0.861 -> 0.906 (average
# only) -> 0.915 (with the baseline); without the baseline sigma 2 px 0.871, 4 px 0.885; baseline 24 px 0.910.
# Nearly every good part's highest voxel is one view's noise at an outline, where the average holds fewer pixels.
# Scaling the contrast by the square root of the window's share of observed pixels (constant noise units) was
# measured on seed 21 and not kept: I-AUROC bracket / vase / stool 0.900 / 0.913 / 0.975 -> 0.850 / 0.887 / 0.938
# (defects at outlines lose as much). Nor is that noise the teach-in parts': dividing the geometry evidence by the
# teach-in parts' own geometry evidence from the same pose (their maximum, max-filtered over 1 px, where it exceeds
# 0.5 on the verdict scale) scored bracket / vase / stool 0.900 / 0.938 / 0.925 against 0.900 / 0.913 / 0.975, and
# subtracting it scored lower everywhere (seed 21, session 9): outline noise does not repeat from part to part.
GEOMETRY_SIGMA = 0.75
GEOMETRY_BASELINE = 10.0
# Colour against the teach-in parts' views from the same pose (agent.reference_views) was averaged over 1.5 px at
# 256 px. Measured on the tuning seed (seed 21, 3 recipes, 8 good + 10 defective parts, 3 teach-in parts): part-level
# I-AUROC against the golden surface colour 0.75 / 0.71 / 0.96 (vase / stool / bracket); against reference views 0.90 /
# 0.96 / 0.975 at 1.5 px, 0.86 / 0.86 / 0.99 at 2.5 px. Also measured there and not kept (vase / bracket I-AUROC,
# against 0.913 / 0.875): the closest reference within +-0.5 px of the projection 0.925 / 0.738; oriented line
# filters (4-8 px long, max over 8 directions) as a fourth channel 0.888 / -; a thin brightness band-pass as a fourth
# channel 0.925 / 0.738-0.863; the reference's own highlight taken out too 0.75 / 0.81. Thin scratches stay at the
# noise floor at 256 px (a bracket scratch covers 10-30 pixels of a view).
# Also measured and not kept (session 10): instead of the closest reference per pixel, a local mix of the references
# fitted to the part's own light (weights by least squares over a 6 px Gaussian window, a small ridge towards their
# mean), meant to explain shadow and highlight edges moved by the light, which are most good parts' highest colour
# evidence (a highlight band on the vase, a cast shadow on the stool's legs). On the tuning seed I-AUROC bracket / vase /
# stool 0.900 / 0.913 / 0.975 -> 0.900 / 0.913 / 1.000 (vase scratches on the colour alone 0.47 / 0.58 -> 0.70 / 0.72
# of the highest good part); on the bench's fresh seed (4248) 0.688 / 0.850 / 0.875 -> 0.675 / 0.825 / 0.887, mean
# 0.804 -> 0.796, with two good vases over the threshold (1.26): it did not carry over.
# Against reference views only the white light a pixel's surroundings share is taken out (a broad highlight of the
# part's own light), over REFERENCE_HIGHLIGHT_SIGMA map sigmas (2 px at 256 px; agent.surface.broad_white_light), so a
# pale scratch a pixel wide keeps its evidence, and a narrower average keeps more of it: 0.25 map sigmas (1 px at
# 256 px). Measured with the harness of `agent eval` (the teach-in calibration redone for each variant, 3 recipes x 8
# good + 10 defective parts, 3 teach-in parts, 256 px), mean I-AUROC over the 3 recipes, seeds 7001 / 9311 / 12077 /
# 15731 / 16871:
#   all white light taken out, 1.5 px (before)       0.888 / 0.850 / 0.825 / 0.925 / 0.817 (mean 0.861)
#   none taken out, 1.5 px                           0.929 / 0.896 / 0.817 /   -   / 0.775
#   none taken out, 1 px                             0.938 / 0.908 / 0.825 / 0.925 / 0.775 (mean 0.874)
#   none taken out, 0.5 px                           0.871 / 0.858 / 0.788 /   -   /   -
#   the broad white light taken out, 1 px (now)      0.908 / 0.892 / 0.842 / 0.938 / 0.808 (mean 0.878)
#   all taken out, 1 px                                -   /   -   /   -   /   -   / 0.804
# Taking out none is best on the bracket (its scratched and cut steel is white: 0.850 -> 0.913 on seed 7001) and worst
# where a part's own light puts a highlight on varnish or glaze that no reference holds (seed 16871's good stools).
# Also measured (at 1.5 px): taking out only the white light beyond the spread of the channels' excess (a near-grey one) 0.904 /
# 0.854; only as much as the references' own colours differ by (within 3 px) 0.929 / 0.883 / 0.821.
# Also measured and not kept (session 19, the same harness and seeds; this code: 0.908 / 0.892 / 0.842 / 0.938 / 0.808):
# 89-94 % of the stool's nominal colour peaks lie within 3 px of a depth edge (a pixel on an outline mixes the part with
# what lies behind it, and a placement a tenth of a pixel off mixes it differently); measuring colour only on pixels
# whose 3 x 3 neighbours all have depth within 4 typical tolerances, in the part's view and in the reference's, with the
# 1 px mean shrunk where under half its weight is measured, lowers the stool's colour scale from 0.185 to 0.116 but
# scored 0.938 / 0.867 / 0.838 / 0.921 / 0.829 (mean 0.879): a missing chunk or a burr on an edge loses its colour, and
# the bracket's faces seen at a grazing angle step by more than that per pixel (its stains lost most views); only
# outlines against no depth 0.925 / 0.900 / 0.833 / 0.925 / 0.737. The brightness change weighted 0.5 against the
# chromaticity change (a part's own light or shadow changes brightness only) 0.925 / 0.867 / - / - / 0.800. A scratch's
# own colour is 0.03-0.27 of the threshold in every view that sees it, under the good parts' highest voxel (0.2-1.2).
# A finer image does not lift them either (session 20): at 512 px (every blur scaled with the image, so the same on the
# part) seed 12077's stool / vase scored I-AUROC 0.725 / 0.900 against 0.825 / 0.938 at 256 px; the scratched parts
# 0.23 / 0.24 (stool) and 0.89 / 1.06 (vase) against good parts up to 0.76 and 1.55 (bench/results/inspection_512px.json).
# A colour scale per robot pose (the median of the teach-in views' colour peaks at that pose) instead of one per recipe,
# seed 12077 at 256 px: 0.908 -> 0.875 as the larger of the two, 0.858 alone (the stool 0.825 -> 0.712 / 0.675): a good
# part's colour peak moves from pose to pose with its own light (0.04-0.29 per view, no pose always high).
REFERENCE_COLOUR_SIGMA = 0.25
REFERENCE_HIGHLIGHT_SIGMA = 0.5
# The colour scale against reference views is at least this (a 3 % local change).
REFERENCE_COLOUR_SCALE_FLOOR = 0.03
REFERENCE_SCALE_FLOORS = (*GEOMETRY_SCALE_FLOORS, REFERENCE_COLOUR_SCALE_FLOOR, MISSING_SCALE_FLOOR)
# The combined surface map's localisation tolerance (:func:`localisation_tolerance`), in map sigmas: 1 px each at 256 px.
LOCALISATION_RADIUS = 0.25
LOCALISATION_SIGMA = 0.25


@dataclass
class SurfaceMaps:
    """The surface channels of one view and the depth their evidence belongs at."""

    channels: np.ndarray  # [4, H, W] float32, SURFACE_CHANNELS
    # H x W float32: the observed depth, and the nominal surface's where the camera saw nothing through it (the
    # missing material was there); 0 = no depth. What the view is fused through (agent.fusion.VoxelAccumulator.add_view).
    fusion_depth: np.ndarray


def surface_channel_maps(
    surface: NominalSurface, frame: Frame, T_world_part: np.ndarray, references: Sequence[ReferenceView] = ()
) -> SurfaceMaps:
    """[4, H, W] float32 channels: extra material and material inside the nominal surface (:func:`agent.surface.geometry_contrast`
    of the signed distance in units of the surface point's nominal tolerance: averaged over ``GEOMETRY_SIGMA *
    map_sigma_px`` against a baseline of ``GEOMETRY_BASELINE * map_sigma_px``, 3 and 40 px at 256 px), and colour
    (:func:`agent.surface.colour_contrast`: averaged over ``0.625 * map_sigma_px`` against a baseline of
    ``4 * map_sigma_px``, 2.5 and 16 px at 256 px; measured on the tuning seed, a baseline of 10 px scored the same
    and 24 px a little worse, 0.6 points of I-AUROC). Given ``references`` (nominal parts' views from this view's
    pose, :mod:`agent.reference_views`) the colour is compared with them instead of the golden surface colour and
    averaged over :data:`REFERENCE_COLOUR_SIGMA` map sigmas: a sharp reference leaves less to average out; and material
    missing in the line of sight (:func:`agent.surface.see_through`, averaged over :data:`MISSING_SIGMA` map sigmas).
    The fusion depth is the observed depth; where the camera saw nothing but should have seen the surface, it is the
    surface's, so that the missing evidence lands where the material should have been."""
    sigma = map_sigma_px(frame.intrinsics.width)
    colour_sigma = (REFERENCE_COLOUR_SIGMA if references else 0.625) * sigma
    r = surface_residuals(surface, frame, T_world_part, colour_sigma_px=colour_sigma, colour_baseline_px=4.0 * sigma, references=references,
                          highlight_sigma_px=REFERENCE_HIGHLIGHT_SIGMA * sigma)  # fmt: skip
    extra, inside = geometry_contrast(r.extra - r.inside, r.observed, GEOMETRY_SIGMA * sigma, GEOMETRY_BASELINE * sigma)
    missing = gaussian_blur(r.see_through.astype(np.float32), MISSING_SIGMA * sigma)
    depth = np.zeros(r.observed.shape, np.float32) if frame.depth is None else np.asarray(frame.depth, dtype=np.float32)
    unseen = (r.expected_depth > 0) & (depth <= 0) & (missing > MISSING_FUSION_LEVEL)
    return SurfaceMaps(np.stack([extra, inside, r.colour, missing]).astype(np.float32), np.where(unseen, r.expected_depth, depth))


def combine_surface_channels(maps: np.ndarray, scale=(1.0, 1.0, 1.0, 1.0)) -> np.ndarray:
    """H x W float32: ``max_c w[c] maps[c] / scale[c]`` over the surface channels (each in its own units: nominal
    tolerances, colour contrast, share of pixels seen through; ``scale`` = each channel's typical peak on held-out
    nominal views, so that none dominates;
    ``w`` = :data:`SURFACE_CHANNEL_WEIGHTS`), then widened to the map's localisation tolerance
    (:func:`localisation_tolerance`)."""
    sc = np.asarray(scale, dtype=np.float32)[:, None, None]
    w = np.asarray(SURFACE_CHANNEL_WEIGHTS, dtype=np.float32)[:, None, None]
    return localisation_tolerance((w * np.asarray(maps, dtype=np.float32) / sc).max(axis=0))


def split_surface_evidence(maps: np.ndarray, scale=(1.0, 1.0, 1.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """What a view adds to a :class:`agent.fusion.SurfaceEvidenceAccumulator`: H x W float32 appearance evidence
    (:func:`combine_surface_channels` of the colour and missing channels) and H x W float32 signed geometry evidence
    (extra material / its scale less material inside / its scale: the two are the positive and negative parts of one
    contrast, so at most one is non-zero at a pixel)."""
    maps = np.asarray(maps, dtype=np.float32)
    appearance = maps.copy()
    appearance[:2] = 0.0
    sc = np.asarray(scale, dtype=np.float32)
    geometry = maps[0] * (SURFACE_CHANNEL_WEIGHTS[0] / sc[0]) - maps[1] * (SURFACE_CHANNEL_WEIGHTS[1] / sc[1])
    return combine_surface_channels(appearance, scale), geometry.astype(np.float32)


def localisation_tolerance(score_map: np.ndarray) -> np.ndarray:
    """H x W float32: each pixel takes the highest score within :data:`LOCALISATION_RADIUS` map sigmas (a 3 x 3
    maximum at 256 px), smoothed over :data:`LOCALISATION_SIGMA` map sigmas (1 px at 256 px).

    The surface evidence exists only where the camera measured depth on the nominal surface, so a defect's outline
    pixels (depth edges, the see-through pixels of missing material, a thin scratch's sub-pixel border) score 0 or
    little even where the evidence next to them is high. A pixel-level map is only as precise as the placement and
    the depth edges anyway (about a pixel); this makes it say so. Measured with the harness of `agent eval` (surface
    maps of every test view, 256 px, 3 recipes x 8 good + 10 defective parts, 3 teach-in parts, the tuning seed 21 and
    the fresh seed 4248): P-AUROC 0.961 -> 0.980 (seed 4248: 0.956 -> 0.977), AU-PRO@0.3 0.776 -> 0.802, and
    part-level I-AUROC, the same maps fused, 0.867 -> 0.875; on the bench's fresh seed 6113 afterwards P-AUROC 0.970 ->
    0.982, V-AUPRO@1% 0.376 -> 0.395, I-AUROC 0.796 -> 0.783 (one pair per recipe). A 5 x 5 maximum scored the same
    P-AUROC; a 3 x 3 maximum with a 2 px blur P-AUROC 0.978 and I-AUROC 0.842, a 2 px blur alone 0.974 and 0.804 (it
    averages thin evidence away)."""
    score_map = np.asarray(score_map, dtype=np.float32)
    sigma = map_sigma_px(score_map.shape[1])
    radius = max(1, int(round(LOCALISATION_RADIUS * sigma)))
    return gaussian_blur(maximum_filter(score_map, 2 * radius + 1), LOCALISATION_SIGMA * sigma)
