"""The inspection core: enroll a recipe from a golden capture, and inspect parts view by view.

Enrollment (:func:`enroll`):

1. Reference model: :func:`agent.splat.train.train_gaussians` (``model_mode="train"``) or, fast,
   :func:`agent.splat.init.init_from_depth` (``"fast"``).
2. Memory bank: patch features of the golden views plus of renders of the reference from poses around the
   enrollment trajectory (each golden camera turned about the vertical through the part by up to half the
   azimuth step, the part shifted/turned by the placement jitter), greedy coreset, faiss.
3. Calibration, nominal data only, leave-views-out: the golden views are split into ``folds``; for each
   fold a reference (init_from_depth) and a bank are built from the other views and the held-out views are
   scored. The channel offsets/scales are fitted on these maps (:func:`agent.anomaly.fit_channel_calibration`);
   then ``pseudo_parts`` random sets of ``expected_views`` held-out views are fused like a part, and the
   raw threshold is the ``1 - target_false_reject_rate`` quantile of their part scores times ``margin``.
   Scores are divided by it, so the verdict threshold is 1.0.
4. Teach-in (:func:`calibrate_on_teach_in`, when nominal teach-in captures are given): each is inspected like any
   part with the recipe so far, and the threshold becomes the ``1 - target_false_reject_rate`` quantile of their raw
   part scores times ``teach_in_margin``. Held-out golden views lack their own viewpoint in the reference and score
   2-5x above good parts; teach-in parts are scored exactly as parts will be. With two or more teach-in parts their
   views become reference views (:mod:`agent.reference_views`), the colour reference of views from the same pose,
   calibrated leaving one part out (threshold margin ``reference_margin``).

Inspection (:class:`RecipeInspector` -> :class:`PartSession`, the :mod:`agent.inspection` seam): per view,
placement refinement (:func:`agent.splat.placement.refine_placement`, warm-started from the recipe placement, over
the latest ``placement_views`` views, then frozen; a cold start over every level drifted by ~1 cm on 96 px views), projected on the fixture's degrees of
freedom (x, y, turn about z), the reference rendered at that placement, the three-channel anomaly map
(:mod:`agent.anomaly`: the pose-conditioned reference channel primary, memory bank and geometry secondary),
back-projected with the rendered depth into the voxel accumulator (:mod:`agent.fusion`).
At the end: defects = connected components of voxels >= 1.0 with at least ``min_defect_voxels`` voxels; part score =
the highest threshold at which there would be one (:func:`agent.fusion.part_score`), so a part fails exactly when its
verdict names a defect.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Literal, Sequence

import numpy as np
import torch

from agent import __version__, anomaly
from agent.capture import Capture, Frame
from agent.contract import ContractError
from agent.features import DEFAULT_EXTRACTOR, PatchFeatureExtractor, get_extractor
from agent.fusion import SurfaceEvidenceAccumulator, VoxelAccumulator, find_defects, part_score
from agent.geometry import Intrinsics, check_rigid, rotation_about_axis, rotation_angle_deg
from agent.inspection import InspectionResult, ViewResult
from agent.memory_bank import MemoryBank, patch_rows
from agent.recipe import Calibration, Recipe, RecipeSettings
from agent.reference_views import ReferenceViews
from agent.splat.init import init_from_depth
from agent.splat.model import GaussianModel
from agent.splat.placement import PlacementConfig, refine_placement
from agent.surface import FINE_ICP_ITERATIONS, NominalSurface, build_nominal_surface, fit_placement

Progress = Callable[[str, int, int], None]  # (stage description, done, total)
# Teach-in parts needed for reference views (agent.reference_views): their calibration leaves one part out.
MIN_REFERENCE_PARTS = 2
# A teach-in part whose leave-one-part-out surface score exceeds this many times the median of the other parts' is not
# nominal to calibrate on (:func:`teach_in_outliers`): it was misplaced in the fixture or by the placement, or it has a
# defect. Measured nominal spreads (the highest against the others' median): 1.5-2.4x over 3 recipes x 3 seeds at
# 256 px; a bracket teach-in part placed 2.6 mm off along its length (seed 9090, before fit_placement ranked its
# hypotheses by distance to the surface): 9.2x, which set a threshold ten times too high, so that every bracket part
# of that seed would have passed.
TEACH_IN_OUTLIER_FACTOR = 4.0
# Floor of the fused geometry scale (calibration.surface_fused_geometry_scale): teach-in parts whose fused geometry is 0
# everywhere must not divide by 0.
MIN_FUSED_SCALE = 1e-3
# Views scored before the placement froze that one later view scores again at the frozen placement (PartSession): a
# part's views that refine the placement take about 1 s on 2 cores at 256 px (the bracket), the later ones 150-180 ms,
# and a view's map about 140 ms, so the views 1 and 2 rescored on view 3 are left to views 4 and 5.
RESCORES_PER_VIEW = 1
# ICP iterations of the fine stage on a part's first view when later views refine the placement (placement_views > 1;
# otherwise, and on those later views, FINE_ICP_ITERATIONS). The first view's placement only has to find the basin and
# score that view provisionally; views 2 and 3 refine it from there and view 1 is scored again at the frozen placement.
# Measured with the placement harness (each part placed as PartSession does, against gt/pose.json; 3 fresh seeds x 3
# recipes, 108 parts, 256 px): errors after view 3 median 0.055 mm / 0.037 deg, at most 0.196 mm / 0.285 deg, as with
# 20 iterations; the first view's placement 270-320 ms instead of 380-460 ms. Fewer samples on the first view instead
# (2000 of 5000) left a bracket 2.4 mm along its length and a vase turned 2 deg: not that.
FIRST_VIEW_FINE_ITERATIONS = 8


@dataclass
class EnrollConfig:
    """Settings of :func:`enroll` (those that the recipe keeps go to recipe.toml)."""

    backbone: str = DEFAULT_EXTRACTOR
    model_mode: Literal["train", "fast"] = "train"
    train_iterations: int = 1500
    init_points: int = 20_000
    bank_fraction: float = 0.1
    enrich_renders: int = 24  # renders of the reference around the enrollment trajectory added to the bank
    jitter_mm: float = 3.0  # placement variation the bank's renders cover
    jitter_deg: float = 3.0
    folds: int = 3
    pseudo_parts: int = 40
    voxel_size_m: float | None = None  # None: 2.5 x the median pixel footprint on the part
    expected_views: int = 12
    min_views: int | None = None  # None: half the expected views (at least 1)
    fusion_rule: str = "topk"
    min_defect_voxels: int = 1  # 2 cost 5 points of I-AUROC: small defects are often one voxel (session 9, seed 21)
    target_false_reject_rate: float = 0.01
    threshold_margin: float = 1.25
    # margin over the teach-in parts' quantile (with a handful of teach-in parts the quantile is their maximum)
    teach_in_margin: float = 1.75
    # margin over the teach-in parts' leave-one-part-out scores when their views are the colour reference
    # (agent.reference_views): scored against one part fewer than inspection, those scores already run high. Chosen on
    # the tuning seed (seed 21, 3 recipes x 8 good + 10 defective parts, 3 teach-in parts): false rejects / escapes
    # 0 / 37 % at 1.0, 0 / 40 % at 1.1, 0 / 47 % at 1.25, 0 / 63 % at 1.75.
    reference_margin: float = 1.1
    placement_views: int = 3
    depth_scale_m: float = 0.003
    surface: bool = True  # build the nominal surface (agent.surface) when every golden view has depth
    # leave-views-out folds of the surface threshold: each fold's surface lacks 1/folds of the golden views, and so
    # the regions only those views saw; more folds, fewer such gaps (measured: 3 folds put the threshold 2-3x above
    # the scores of good parts)
    surface_folds: int = 6
    seed: int = 0

    def __post_init__(self) -> None:
        if self.model_mode not in ("train", "fast"):
            raise ValueError(f"EnrollConfig: model_mode must be train or fast, got {self.model_mode!r}")
        if self.folds < 2 or self.surface_folds < 2:
            raise ValueError(f"EnrollConfig: folds and surface_folds must be >= 2, got {self.folds}, {self.surface_folds}")
        if self.pseudo_parts < 1 or self.enrich_renders < 0 or self.train_iterations < 1:
            raise ValueError("EnrollConfig: pseudo_parts and train_iterations must be >= 1, enrich_renders >= 0")
        if min(self.threshold_margin, self.teach_in_margin, self.reference_margin) <= 0:
            raise ValueError(f"EnrollConfig: threshold_margin, teach_in_margin and reference_margin must be > 0, got "
                             f"{self.threshold_margin}, {self.teach_in_margin}, {self.reference_margin}")  # fmt: skip
        if not 0 < self.bank_fraction <= 1:
            raise ValueError(f"EnrollConfig: bank_fraction must be in (0, 1], got {self.bank_fraction}")


def _noop(stage: str, done: int, total: int) -> None:
    pass


def fused_part_score(
    maps: Sequence[np.ndarray], depths: Sequence[np.ndarray], frames: Sequence[Frame], voxel_size: float, rule: str, min_voxels: int = 1
) -> float:
    """The part score of views' anomaly maps, each fused through its depth map from its frame's camera:
    :func:`agent.fusion.part_score` of the volume (its maximum with ``min_voxels`` 1)."""
    acc = VoxelAccumulator(voxel_size, rule=rule)
    for m, d, f in zip(maps, depths, frames):
        acc.add_view(m, d, f.c2w, f.intrinsics, f.name)
    return part_score(acc.volume(), min_voxels)


def nominal_threshold(scores: Sequence[float], target_false_reject_rate: float, margin: float) -> float:
    """A raw part-score threshold from nominal part scores: their ``1 - target_false_reject_rate`` quantile (at least
    1e-6) times ``margin``."""
    return max(float(np.quantile(scores, 1.0 - target_false_reject_rate)), 1e-6) * margin


# ---------------------------------------------------------------------------------------------
# Shared per-view steps


@dataclass
class _Scorer:
    """What scoring one view needs: backbone, bank, reference and the calibration's map settings."""

    extractor: PatchFeatureExtractor
    bank: MemoryBank
    model: GaussianModel
    depth_scale_m: float
    backend: str = "auto"

    def channels(self, frame: Frame, T_world_part: np.ndarray | None) -> tuple[np.ndarray, anomaly.ReferenceView]:
        """Raw channel maps [3, H, W] of a posed view and the reference rendered for it."""
        ref = anomaly.render_reference(self.model, frame.c2w, frame.intrinsics, T_world_part, self.backend)
        fg = anomaly.observed_foreground(frame)
        gain = anomaly.colour_gain(frame.image, ref, fg)
        composite = ref.composite(frame.image, gain)
        geometry = anomaly.geometry_evidence(fg, frame.depth, ref, self.depth_scale_m)
        sigma = anomaly.map_sigma_px(frame.intrinsics.width)
        return anomaly.channel_maps(self.extractor, self.bank, frame.image, composite, geometry, sigma), ref


def _check_enrollment_capture(capture: Capture) -> Intrinsics:
    if not capture.frames:
        raise ValueError("the enrollment capture has no frames")
    K0 = capture.frames[0].intrinsics
    for f in capture.frames:
        if f.c2w is None:
            raise ValueError(f"enrollment frame {f.name} has no camera pose (transform_matrix); enrollment needs posed views")
        if (f.intrinsics.width, f.intrinsics.height) != (K0.width, K0.height):
            raise ValueError(f"enrollment frame {f.name} is {f.intrinsics.width}x{f.intrinsics.height}, frame "
                             f"{capture.frames[0].name} is {K0.width}x{K0.height}; all views must have one size")  # fmt: skip
    if not any(f.depth is not None for f in capture.frames):
        raise ValueError("the enrollment capture has no depth maps; enrollment of the cell protocol needs depth")
    return K0


def auto_voxel_size(capture: Capture) -> float:
    """2.5 x the median pixel footprint (depth / focal length) on the part, rounded to 0.5 mm, at least 1 mm."""
    foot = []
    for f in capture.frames:
        if f.depth is not None and (f.depth > 0).any():
            foot.append(np.median(f.depth[f.depth > 0]) * 2.0 / (f.intrinsics.fx + f.intrinsics.fy))
    if not foot:
        raise ValueError("cannot choose a voxel size: no frame has depth")
    return max(0.001, round(2.5 * float(np.median(foot)) / 0.0005) * 0.0005)


def _features(extractor: PatchFeatureExtractor, images: list[np.ndarray], batch: int = 8) -> np.ndarray:
    rows = []
    for i in range(0, len(images), batch):
        x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images[i : i + batch]]))
        if x.max() > 1.0:
            x = x / 255.0
        rows.append(patch_rows(extractor(x).features))
    return np.concatenate(rows)


def _model_centre(model: GaussianModel) -> np.ndarray:
    return model.means.detach().double().median(dim=0).values.cpu().numpy()


def around_trajectory_poses(
    poses: list[np.ndarray], centre: np.ndarray, count: int, jitter_mm: float, jitter_deg: float, rng: np.random.Generator
) -> list[tuple[np.ndarray, np.ndarray]]:
    """``count`` (camera c2w, object pose) pairs around the enrollment trajectory (see the module docstring)."""
    n_rings = max(1, len({round(float(np.degrees(np.arcsin(np.clip((T[2, 3] - centre[2]) / max(np.linalg.norm(T[:3, 3] - centre), 1e-9), -1, 1)))))
                          for T in poses}))  # fmt: skip
    half_step = math.radians(180.0 / max(1, len(poses) // n_rings))
    out = []
    for k in range(count):
        c2w = np.asarray(poses[k % len(poses)], dtype=np.float64)
        turn = np.eye(4)
        turn[:3, :3] = rotation_about_axis(np.array([0.0, 0.0, 1.0]), rng.uniform(-half_step, half_step))
        shift = np.eye(4)
        shift[:3, 3] = centre
        camera = shift @ turn @ np.linalg.inv(shift) @ c2w
        obj = np.eye(4)
        obj[:3, :3] = rotation_about_axis(np.array([0.0, 0.0, 1.0]), math.radians(rng.uniform(-jitter_deg, jitter_deg)))
        obj[:3, 3] = centre - obj[:3, :3] @ centre
        obj[:2, 3] += rng.uniform(-jitter_mm, jitter_mm, size=2) / 1000.0
        out.append((check_rigid(camera), obj))
    return out


# ---------------------------------------------------------------------------------------------
# Enrollment


def build_reference(capture: Capture, config: EnrollConfig, progress: Progress = _noop) -> GaussianModel:
    """The Gaussian reference of the golden part (trained, or init_from_depth in fast mode)."""
    if config.model_mode == "fast":
        progress("reference model (init_from_depth)", 0, 1)
        model = init_from_depth(capture, max_points=config.init_points, rng=np.random.default_rng(config.seed))
        progress("reference model (init_from_depth)", 1, 1)
        return model
    from agent.splat.train import TrainConfig, train_gaussians

    train_config = TrainConfig(iterations=config.train_iterations, init_points=config.init_points, seed=config.seed)
    model, _ = train_gaussians(capture, train_config, lambda p: progress("reference model (training)", p.step, p.iterations))
    return model


def build_bank(
    extractor: PatchFeatureExtractor,
    images: list[np.ndarray],
    fraction: float,
    seed: int,
    backbone: str,
) -> MemoryBank:
    rows = _features(extractor, images)
    return MemoryBank.build(rows, fraction=fraction, seed=seed, metadata={"backbone": backbone, "stride": str(extractor.stride)})


def enroll(
    capture: Capture,
    name: str,
    config: EnrollConfig = EnrollConfig(),
    progress: Progress = _noop,
    extractor: PatchFeatureExtractor | None = None,
    teach_in: Sequence[Capture] = (),
) -> Recipe:
    """Enroll a recipe from one golden capture (posed views with depth), its threshold from the ``teach_in`` captures
    when there are any (:func:`calibrate_on_teach_in`). The result is not yet saved."""
    K = _check_enrollment_capture(capture)
    for i, part in enumerate(teach_in):  # before the long steps: a bad teach-in capture fails at once
        _check_teach_in_capture(part, K, i)
    rng = np.random.default_rng(config.seed)
    extractor = extractor or get_extractor(config.backbone, device="cpu")
    if extractor.name != config.backbone:
        raise ValueError(f"the extractor is {extractor.name!r} but the config asks for {config.backbone!r}")
    voxel_size = config.voxel_size_m or auto_voxel_size(capture)
    expected = config.expected_views
    min_views = config.min_views or max(1, expected // 2)
    sigma = anomaly.map_sigma_px(K.width)

    model = build_reference(capture, config, progress)

    # Memory bank: golden views + renders around the enrollment trajectory.
    fgs = [anomaly.observed_foreground(f) for f in capture.frames]
    backdrop = np.median([anomaly.backdrop_colour(f.image, m) for f, m in zip(capture.frames, fgs)], axis=0)
    images = [f.image for f in capture.frames]
    centre = _model_centre(model)
    pairs = around_trajectory_poses([f.c2w for f in capture.frames], centre, config.enrich_renders, config.jitter_mm, config.jitter_deg, rng)
    for i, (c2w, obj) in enumerate(pairs):
        progress("bank: renders around the trajectory", i, len(pairs))
        ref = anomaly.render_reference(model, c2w, K, obj)
        images.append(ref.composite(backdrop))
    progress("bank: features + coreset", 0, 1)
    bank = build_bank(extractor, images, config.bank_fraction, config.seed, config.backbone)
    progress("bank: features + coreset", 1, 1)

    # Calibration on held-out golden views.
    n = len(capture.frames)
    folds = min(config.folds, n)
    maps: list[anomaly.SurfaceMaps] = [None] * n  # type: ignore[list-item]
    depths: list[np.ndarray] = [None] * n  # type: ignore[list-item]
    for fold in range(folds):
        progress("calibration: leave-views-out", fold, folds)
        held = list(range(fold, n, folds))
        kept = [i for i in range(n) if i % folds != fold]
        fold_model = init_from_depth(capture, max_points=config.init_points, frame_indices=kept, rng=np.random.default_rng(config.seed))
        fold_bank = build_bank(extractor, [capture.frames[i].image for i in kept], config.bank_fraction, config.seed, config.backbone)
        scorer = _Scorer(extractor, fold_bank, fold_model, config.depth_scale_m)
        for i in held:
            maps[i], ref = scorer.channels(capture.frames[i], None)
            depths[i] = ref.depth
    progress("calibration: leave-views-out", folds, folds)
    offset, scale = anomaly.fit_channel_calibration(maps)
    combined = [anomaly.combine_channels(m, offset, scale) for m in maps]
    part_scores = []
    k = min(expected, n)
    for p in range(config.pseudo_parts):
        progress("calibration: nominal pseudo-parts", p, config.pseudo_parts)
        pick = sorted(rng.choice(n, size=k, replace=False))
        part_scores.append(fused_part_score([combined[i] for i in pick], [depths[i] for i in pick], [capture.frames[i] for i in pick],
                                            voxel_size, config.fusion_rule, config.min_defect_voxels))  # fmt: skip
    progress("calibration: nominal pseudo-parts", config.pseudo_parts, config.pseudo_parts)
    quantile = float(np.quantile(part_scores, 1.0 - config.target_false_reject_rate))
    raw_threshold = nominal_threshold(part_scores, config.target_false_reject_rate, config.threshold_margin)

    surface, surface_threshold, surface_scores, channel_scale = None, None, [], [1.0] * len(anomaly.SURFACE_CHANNELS)
    if config.surface and all(f.depth is not None for f in capture.frames):
        surface, surface_threshold, surface_scores, channel_scale = build_surface(capture, voxel_size, expected, config, rng, progress)

    settings = RecipeSettings(
        name=name, camera=K, voxel_size_m=float(voxel_size), backbone=config.backbone, expected_views=expected,
        min_views=min_views, fusion_rule=config.fusion_rule, min_defect_voxels=config.min_defect_voxels,
        target_false_reject_rate=config.target_false_reject_rate, threshold_margin=config.threshold_margin,
        placement_views=config.placement_views, model_mode=config.model_mode,
        created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"), agent_version=__version__,
    )  # fmt: skip
    calibration = Calibration(
        channel_offset=offset.tolist(), channel_scale=scale.tolist(), raw_threshold=raw_threshold,
        nominal_part_scores=part_scores, backdrop_rgb=[float(v) for v in np.clip(backdrop, 0, 1)],
        enrollment_poses=[np.asarray(f.c2w) for f in capture.frames], enrollment_frames=[f.name for f in capture.frames],
        geometry_depth_scale_m=config.depth_scale_m, map_sigma_px=sigma, folds=folds,
        notes={"bank_rows": len(bank), "enrich_renders": config.enrich_renders, "n_gaussians": len(model),
               "quantile": quantile, "train_iterations": config.train_iterations if config.model_mode == "train" else 0,
               "surface_points": 0 if surface is None else len(surface)},
        surface_raw_threshold=surface_threshold, surface_nominal_part_scores=surface_scores, surface_channel_scale=channel_scale,
        part_score_min_voxels=config.min_defect_voxels,
    )  # fmt: skip
    settings.validate()
    calibration.validate()
    recipe = Recipe(settings, model, bank, calibration, surface)
    if teach_in:
        calibrate_on_teach_in(recipe, teach_in, config, progress, extractor)
    return recipe


def _check_teach_in_capture(capture: Capture, K: Intrinsics, index: int) -> None:
    where = f"teach-in capture {index}" + (f" ({capture.root})" if capture.root else "")
    if not capture.frames:
        raise ValueError(f"{where} has no frames")
    for f in capture.frames:
        if f.c2w is None:
            raise ValueError(f"{where}: frame {f.name!r} has no camera pose")
        if (f.intrinsics.width, f.intrinsics.height) != (K.width, K.height):
            raise ValueError(f"{where}: frame {f.name!r} is {f.intrinsics.width}x{f.intrinsics.height}, the golden views are {K.width}x{K.height}")
    with_depth = sum(f.depth is not None for f in capture.frames)
    if 0 < with_depth < len(capture.frames):
        raise ValueError(f"{where}: {with_depth} of {len(capture.frames)} frames have depth; a teach-in part needs depth on every frame or on none")


def calibrate_on_teach_in(
    recipe: Recipe,
    captures: Sequence[Capture],
    config: EnrollConfig,
    progress: Progress = _noop,
    extractor: PatchFeatureExtractor | None = None,
) -> None:
    """Set the recipe's part-score threshold from teach-in runs: nominal parts (the golden part again, or other
    known-good parts) placed in the fixture and run through the cell like any part. Each is inspected with the recipe
    as enrolled so far; the raw threshold of the path that scored it (surface when its views have depth and the recipe
    has a surface, else features) becomes the ``1 - target_false_reject_rate`` quantile of their raw part scores times
    ``teach_in_margin``. The leave-views-out thresholds stay in ``calibration.notes``.

    With at least :data:`MIN_REFERENCE_PARTS` parts scored on the surface, their views become the recipe's reference
    views (:mod:`agent.reference_views`): a view taken from the pose of a teach-in view is compared in colour with
    those views instead of the golden surface colour. The colour scale and the part scores that set the threshold are
    then measured leave-one-part-out (:func:`_reference_view_calibration`) and the margin is ``reference_margin``. A part
    whose score is an outlier among them (:func:`teach_in_outliers`) is left out of both, when enough parts remain, and
    named in ``calibration.notes["teach_in_excluded"]``.
    Changes ``recipe`` in place (before it is saved: the threshold is part of the recipe version)."""
    if recipe.version:
        raise ValueError(f"recipe {recipe.name} is already saved (version {recipe.version}); teach-in belongs to enrollment")
    cal = recipe.calibration
    inspector = RecipeInspector(recipe, extractor)
    surface_scores: list[float] = []
    feature_scores: list[float] = []
    surface_parts: list[tuple[Capture, np.ndarray]] = []  # scored on the surface, with the placement found
    surface_index: list[int] = []  # their positions in ``captures``
    for i, capture in enumerate(captures):
        progress("calibration: teach-in parts", i, len(captures))
        _check_teach_in_capture(capture, recipe.settings.camera, i)
        result, session = inspect_capture(inspector, capture, f"teach-in-{i}")
        if result.verdict == "incomplete":
            raise ValueError(f"teach-in capture {i} has {result.n_views} views; the recipe needs at least {recipe.settings.min_views}")
        if inspector.scores_on_surface(capture.frames[0]):
            surface_scores.append(result.score * cal.surface_raw_threshold)
            surface_parts.append((capture, session.T_world_part))
            surface_index.append(i)
        else:
            feature_scores.append(result.score * cal.raw_threshold)
    progress("calibration: teach-in parts", len(captures), len(captures))
    if len(surface_parts) >= MIN_REFERENCE_PARTS:
        recipe.references = ReferenceViews.from_parts([(c.frames, T) for c, T in surface_parts], recipe.settings.camera)
        surface_scores = _reference_view_calibration(recipe, surface_parts, progress)
        odd = teach_in_outliers(surface_scores)
        if odd and len(surface_parts) - len(odd) >= MIN_REFERENCE_PARTS:
            cal.notes["teach_in_excluded"] = [
                {"teach_in_part": surface_index[i], "capture": str(surface_parts[i][0].root or ""), "raw_score": float(surface_scores[i]),
                 "others_median": float(np.median(np.delete(np.asarray(surface_scores), i)))} for i in odd
            ]  # fmt: skip
            surface_parts = [p for i, p in enumerate(surface_parts) if i not in odd]
            recipe.references = ReferenceViews.from_parts([(c.frames, T) for c, T in surface_parts], recipe.settings.camera)
            surface_scores = _reference_view_calibration(recipe, surface_parts, progress)
    if surface_scores:
        cal.notes["surface_leave_views_out_raw_threshold"] = cal.surface_raw_threshold
        margin = config.reference_margin if recipe.references is not None else config.teach_in_margin
        cal.surface_raw_threshold = nominal_threshold(surface_scores, config.target_false_reject_rate, margin)
        cal.surface_teach_in_part_scores = surface_scores
    if feature_scores:
        cal.notes["leave_views_out_raw_threshold"] = cal.raw_threshold
        cal.raw_threshold = nominal_threshold(feature_scores, config.target_false_reject_rate, config.teach_in_margin)
        cal.teach_in_part_scores = feature_scores
    cal.notes["teach_in_margin"] = config.teach_in_margin
    if recipe.references is not None:
        cal.notes["reference_margin"] = config.reference_margin
    cal.validate()


def teach_in_outliers(scores: Sequence[float], factor: float = TEACH_IN_OUTLIER_FACTOR) -> list[int]:
    """Indices of the teach-in parts whose score exceeds ``factor`` times the median of the other parts' scores (the odd
    one out among nominal instances is not nominal). Needs at least 3 parts: of two, neither can be told odd."""
    s = np.asarray(scores, dtype=np.float64)
    if len(s) < 3:
        return []
    return [i for i in range(len(s)) if s[i] > factor * np.median(np.delete(s, i))]


def _reference_view_calibration(recipe: Recipe, parts: list[tuple[Capture, np.ndarray]], progress: Progress = _noop) -> list[float]:
    """Set the channel scales of views compared with reference views (``calibration.reference_channel_scale``) and
    return the teach-in parts' raw part scores on that path, leave-one-part-out: each teach-in part's views are
    compared with the other parts' views (at the placement its inspection found). A channel's scale is the median of
    its peaks over those views (the colour's over the views some other part's view matched), at least the floors of
    the golden views' scales (:func:`build_surface`): the same rule as there, on parts run like any part. The parts'
    views are then fused as inspection fuses them (:class:`agent.fusion.SurfaceEvidenceAccumulator`), and the
    median of their fused geometry peaks becomes ``calibration.surface_fused_geometry_scale`` (at least
    :data:`MIN_FUSED_SCALE`; the fused appearance stays on the views' channel scales); the part scores are of the
    volumes at that scale."""
    surface, cal, s = recipe.surface, recipe.calibration, recipe.settings
    assert surface is not None and recipe.references is not None
    maps: list[list[np.ndarray]] = []
    with_refs: list[list[bool]] = []
    for i, (capture, T) in enumerate(parts):
        progress("calibration: reference views (leave-one-part-out)", i, len(parts))
        refs = [recipe.references.matching(f.c2w, exclude_part=i) for f in capture.frames]
        maps.append([anomaly.surface_channel_maps(surface, f, T, r) for f, r in zip(capture.frames, refs)])
        with_refs.append([bool(r) for r in refs])
    progress("calibration: reference views (leave-one-part-out)", len(parts), len(parts))
    views = [(m, ok) for part_maps, flags in zip(maps, with_refs) for m, ok in zip(part_maps, flags)]
    if not any(ok for _, ok in views):
        raise ValueError("reference views: no teach-in view was taken from the pose of another teach-in part's view; "
                         "teach-in parts must be photographed from the inspection poses")  # fmt: skip
    floors = anomaly.REFERENCE_SCALE_FLOORS
    colour = anomaly.SURFACE_CHANNELS.index("colour")
    cal.reference_channel_scale = [
        max(float(np.median([m.channels[c].max() for m, ok in views if ok or c != colour])), floors[c]) for c in range(len(floors))
    ]  # fmt: skip
    accumulators = []
    for (capture, _), part_maps, flags in zip(parts, maps, with_refs):
        acc = SurfaceEvidenceAccumulator(s.voxel_size_m, rule=s.fusion_rule)
        for f, m, ok in zip(capture.frames, part_maps, flags):
            acc.add_view(*anomaly.split_surface_evidence(m.channels, cal.surface_scale(ok)), m.fusion_depth, f.c2w, f.intrinsics, f.name)
        accumulators.append(acc)
    geometry_peaks = [float(geometry.max()) if len(geometry) else 0.0 for _, geometry in (acc.evidence() for acc in accumulators)]
    cal.surface_fused_geometry_scale = max(float(np.median(geometry_peaks)), MIN_FUSED_SCALE)
    scores = []
    for acc in accumulators:
        acc.geometry_scale = cal.surface_fused_geometry_scale
        scores.append(part_score(acc.volume(), s.min_defect_voxels))
    return scores


def surface_spacing(voxel_size_m: float) -> float:
    """Grid spacing of the nominal surface: the pixel footprint on the part (the voxel is 2.5 footprints)."""
    return voxel_size_m / 2.5


def build_surface(
    capture: Capture, voxel_size: float, expected: int, config: EnrollConfig, rng: np.random.Generator, progress: Progress = _noop
) -> tuple[NominalSurface, float, list[float], list[float]]:
    """The nominal surface of the golden capture, its part-score threshold, the nominal pseudo-part scores and the
    channel scales, nominal data only.

    Threshold: the golden views are split into ``surface_folds``; a surface is built without each fold and its views are
    scored against it (as inspection views, at the recipe placement); ``pseudo_parts`` random sets of ``expected``
    held-out views are fused like parts; the raw threshold is their ``1 - target_false_reject_rate`` quantile times
    ``threshold_margin``."""
    spacing = surface_spacing(voxel_size)
    frames = capture.frames
    n = len(frames)
    folds = min(config.surface_folds, n)
    maps: list[anomaly.SurfaceMaps] = [None] * n  # type: ignore[list-item]
    progress("surface: leave-views-out", 0, folds + 1)
    surface = build_nominal_surface(frames, spacing, folds=config.folds)
    for fold in range(folds):
        progress("surface: leave-views-out", fold + 1, folds + 1)
        held = list(range(fold, n, folds))
        fold_surface = build_nominal_surface([frames[i] for i in range(n) if i % folds != fold], spacing, folds=config.folds)
        for i in held:
            maps[i] = anomaly.surface_channel_maps(fold_surface, frames[i], np.eye(4))
    progress("surface: leave-views-out", folds + 1, folds + 1)
    # each channel's typical peak on a held-out view (the median of the per-view maxima), so no channel dominates
    floors = anomaly.SURFACE_SCALE_FLOORS
    channel_scale = [max(float(np.median([m.channels[c].max() for m in maps])), floors[c]) for c in range(len(floors))]
    combined = [anomaly.combine_surface_channels(m.channels, channel_scale) for m in maps]
    scores = []
    k = min(expected, n)
    for _ in range(config.pseudo_parts):
        pick = sorted(rng.choice(n, size=k, replace=False))
        scores.append(fused_part_score([combined[i] for i in pick], [maps[i].fusion_depth for i in pick], [frames[i] for i in pick],
                                       voxel_size, config.fusion_rule, config.min_defect_voxels))  # fmt: skip
    threshold = nominal_threshold(scores, config.target_false_reject_rate, config.threshold_margin)
    return surface, threshold, scores, channel_scale


# ---------------------------------------------------------------------------------------------
# Inspection


FAST_PLACEMENT = PlacementConfig(scales=(4, 2), steps=(30, 15))  # CPU budget; the fixture leaves only a few mm / degrees


def planar_placement(T: np.ndarray) -> np.ndarray:
    """The part rests on the fixture plane (z up): keep the x/y translation and the turn about z of ``T``,
    drop z translation, roll and pitch (refinement on CPU-sized images drifts in these, measured ~3 mm in z)."""
    T = np.asarray(T, dtype=np.float64)
    yaw = math.atan2(T[1, 0], T[0, 0])
    out = np.eye(4)
    out[:3, :3] = rotation_about_axis(np.array([0.0, 0.0, 1.0]), yaw)
    out[:2, 3] = T[:2, 3]
    return out


class RecipeInspector:
    """An enrolled recipe ready to inspect parts (implements :class:`agent.inspection.Inspector`).

    ``refine_placement=False`` keeps the recipe placement (the baseline and tests of the seam).
    """

    def __init__(
        self,
        recipe: Recipe,
        extractor: PatchFeatureExtractor | None = None,
        placement: PlacementConfig = FAST_PLACEMENT,
        refine: bool = True,
        backend: str = "auto",
    ):
        self.recipe = recipe
        s, c = recipe.settings, recipe.calibration
        self.name = s.name
        self.version = recipe.version
        self.expected_views = s.expected_views
        self.min_views = s.min_views
        self.intrinsics = s.camera
        self.placement = placement
        self.refine = refine
        extractor = extractor or get_extractor(s.backbone, device="cpu")
        if extractor.name != s.backbone:
            raise ValueError(f"recipe {s.name} uses backbone {s.backbone!r}, the extractor is {extractor.name!r}")
        self.scorer = _Scorer(extractor, recipe.bank, recipe.model, c.geometry_depth_scale_m, backend)
        if recipe.surface is not None:
            recipe.surface.build_search_structures()

    def scores_on_surface(self, frame: Frame) -> bool:
        """Whether ``frame`` is scored against the nominal surface (it has depth and the recipe a calibrated surface);
        else by the feature path."""
        return self.recipe.surface is not None and frame.depth is not None and self.recipe.calibration.surface_raw_threshold is not None

    def start_part(self, part_id: str) -> "PartSession":
        return PartSession(self, part_id)


@dataclass
class _ViewEvidence:
    """One view's scores: the anomaly map on the verdict scale (what the view reports), the depth it is fused through,
    and, when the recipe fuses the surface evidence in two parts, the view's appearance and signed geometry maps
    (:func:`agent.anomaly.split_surface_evidence`, raw units)."""

    score_map: np.ndarray
    fusion_depth: np.ndarray
    appearance: np.ndarray | None = None
    geometry: np.ndarray | None = None


class PartSession:
    """One part, fed view by view (implements :class:`agent.inspection.PartInspection`).

    The placement is refined over the first ``placement_views`` views, then frozen. The views scored before it was
    frozen are scored again at the frozen placement (when it moved since), and only those maps are fused (their
    :attr:`view_results` are replaced and :meth:`finalise` reports them as ``revised_views``; the result
    :meth:`add_view` returned for them was provisional): compared with a sharp reference, a placement a few tenths of
    a millimetre off reads as colour edges. That scoring again is spread over the views after the freeze, at most
    :data:`RESCORES_PER_VIEW` each, and none on a view that refined the placement (those are a part's slowest);
    :meth:`finalise` does what is left. Views are fused in their order either way, so the verdict is the same."""

    def __init__(self, inspector: RecipeInspector, part_id: str):
        self.inspector = inspector
        self.part_id = part_id
        s, cal = inspector.recipe.settings, inspector.recipe.calibration
        self.accumulator: VoxelAccumulator | SurfaceEvidenceAccumulator
        if cal.surface_fused_geometry_scale is not None and cal.surface_raw_threshold is not None:
            self.accumulator = SurfaceEvidenceAccumulator(
                s.voxel_size_m, rule=s.fusion_rule, appearance_scale=cal.surface_raw_threshold,
                geometry_scale=cal.surface_fused_geometry_scale * cal.surface_raw_threshold,
            )  # fmt: skip
        else:
            self.accumulator = VoxelAccumulator(s.voxel_size_m, rule=s.fusion_rule)
        self.views: list[Frame] = []
        self.T_world_part = np.eye(4)
        self.placement_ok = False
        self.view_results: list[ViewResult] = []
        # views not yet fused: (index, the placement it was scored at, its evidence); fused once the placement is frozen
        self._unfused: list[tuple[int, np.ndarray, _ViewEvidence]] = []
        self._revised: set[int] = set()  # views whose result changed after add_view returned it

    @property
    def placement_frozen(self) -> bool:
        return not self.inspector.refine or len(self.views) >= self.inspector.recipe.settings.placement_views

    def add_view(self, frame: Frame) -> ViewResult:
        t0 = time.perf_counter()
        if frame.c2w is None:
            raise ContractError("no_pose", f"frame {frame.name!r} has no camera pose")
        if frame.image.shape[:2] != (frame.intrinsics.height, frame.intrinsics.width):
            raise ContractError("bad_image_size", f"frame {frame.name!r} is {frame.image.shape[1]}x{frame.image.shape[0]}, its intrinsics say {frame.intrinsics.width}x{frame.intrinsics.height}")
        if any(v.name == frame.name for v in self.views):
            raise ValueError(f"frame {frame.name!r} was already added to part {self.part_id!r}")
        timings: dict[str, float] = {}
        self.views.append(frame)
        refines = self.inspector.refine and len(self.views) <= self.inspector.recipe.settings.placement_views
        if refines:
            t = time.perf_counter()
            self._place(frame)
            timings["placement"] = (time.perf_counter() - t) * 1000
        t = time.perf_counter()
        evidence = self._score(frame)
        timings["anomaly_map"] = (time.perf_counter() - t) * 1000
        self._unfused.append((len(self.view_results), self.T_world_part.copy(), evidence))
        score_map = evidence.score_map
        self.view_results.append(ViewResult(frame.name, float(score_map.max()), 0.0, score_map.astype(np.float32), timings))
        if self.placement_frozen:
            t = time.perf_counter()
            self._fuse_unfused(rescores=0 if refines else RESCORES_PER_VIEW)
            timings["fusion"] = (time.perf_counter() - t) * 1000
        result = self.view_results[-1]
        result.latency_ms = (time.perf_counter() - t0) * 1000
        return result

    def _fuse_unfused(self, rescores: float = math.inf) -> None:
        """Fuse the views not yet fused, in their order; those scored at another placement than the current one are
        scored again first, at most ``rescores`` of them (default: all); the fusion stops at the first view left stale."""
        while self._unfused:
            i, T_scored, evidence = self._unfused[0]
            frame, old = self.views[i], self.view_results[i]
            if not np.array_equal(T_scored, self.T_world_part):
                if rescores <= 0:
                    return
                rescores -= 1
                t = time.perf_counter()
                evidence = self._score(frame)
                timings = {**old.timings_ms, "rescore": (time.perf_counter() - t) * 1000}
                m = evidence.score_map
                self.view_results[i] = ViewResult(old.frame_id, float(m.max()), old.latency_ms, m.astype(np.float32), timings)
                self._revised.add(i)  # add_view returned it already (the view being added is scored at the current placement)
            if isinstance(self.accumulator, SurfaceEvidenceAccumulator):
                # a view scored by the feature path (no depth) adds its map, on the verdict scale, to the appearance
                appearance = evidence.score_map * self.accumulator.appearance_scale if evidence.appearance is None else evidence.appearance
                self.accumulator.add_view(appearance, evidence.geometry, evidence.fusion_depth, frame.c2w, frame.intrinsics, frame.name)
            else:
                self.accumulator.add_view(evidence.score_map, evidence.fusion_depth, frame.c2w, frame.intrinsics, frame.name)
            self._unfused.pop(0)

    def _place(self, frame: Frame) -> None:
        """Refine the placement over the views so far: ICP against the nominal surface (views with depth: a multi-start
        search on the first), else through the Gaussian renderer over the latest ``placement_views`` views. A failure
        keeps the previous estimate."""
        insp = self.inspector
        if insp.scores_on_surface(frame):
            first = not self.placement_ok
            try:
                later_views_refine = first and insp.recipe.settings.placement_views > 1
                fit = fit_placement(insp.recipe.surface, [v for v in self.views if v.depth is not None], init=self.T_world_part,
                                    search_mm=3.0 if first else 0.0, search_deg=3.0 if first else 0.0,
                                    fine_iterations=FIRST_VIEW_FINE_ITERATIONS if later_views_refine else FINE_ICP_ITERATIONS)  # fmt: skip
                self.T_world_part = planar_placement(fit.T_world_part)
                self.placement_ok = True
            except ValueError:  # too little depth on the part
                pass
        else:
            try:
                res = refine_placement(insp.recipe.model, self.views[-insp.recipe.settings.placement_views :], init=self.T_world_part, config=insp.placement)
                self.T_world_part = planar_placement(res.T_world_part)
                self.placement_ok = True
            except RuntimeError:  # diverged
                pass

    def _score(self, frame: Frame) -> "_ViewEvidence":
        """The view's anomaly map on the verdict scale at the current placement, and the depth it is fused through.
        With depth (and a recipe surface): the surface evidence, colour against the reference views from this pose
        when the recipe has some, fused through the observed depth (split into appearance and signed geometry when
        the recipe fuses them apart). Otherwise the feature/reference/geometry channels against the Gaussian reference
        rendered at the placement, fused through the rendered depth."""
        insp = self.inspector
        recipe, cal = insp.recipe, insp.recipe.calibration
        if insp.scores_on_surface(frame):
            refs = recipe.references.matching(frame.c2w) if recipe.references is not None else []
            maps = anomaly.surface_channel_maps(recipe.surface, frame, self.T_world_part, refs)
            scale = cal.surface_scale(bool(refs))
            score_map = anomaly.combine_surface_channels(maps.channels, scale) / cal.surface_raw_threshold
            if cal.surface_fused_geometry_scale is None:
                return _ViewEvidence(score_map, maps.fusion_depth)
            return _ViewEvidence(score_map, maps.fusion_depth, *anomaly.split_surface_evidence(maps.channels, scale))
        maps, ref = insp.scorer.channels(frame, self.T_world_part)
        return _ViewEvidence(anomaly.combine_channels(maps, cal.channel_offset, cal.channel_scale) / cal.raw_threshold, ref.depth)

    def finalise(self) -> InspectionResult:
        t0 = time.perf_counter()
        s = self.inspector.recipe.settings
        n = len(self.views)
        if n < s.min_views or n == 0:
            return InspectionResult("incomplete", None, 1.0, [], n, None, None, (time.perf_counter() - t0) * 1000)
        self._fuse_unfused()  # the views left stale, or fewer views than placement_views: fused at the placement so far
        if len(self.accumulator.view_ids) == 0:
            return InspectionResult("incomplete", None, 1.0, [], n, None, None, (time.perf_counter() - t0) * 1000)
        volume = self.accumulator.volume()
        score = part_score(volume, s.min_defect_voxels)  # >= 1.0 exactly when a defect of min_defect_voxels is found
        defects = find_defects(volume, 1.0, s.min_defect_voxels, self.accumulator.view_scores())
        T = self.T_world_part
        return InspectionResult(
            verdict="fail" if score >= 1.0 else "pass",
            score=score,
            threshold=1.0,
            defects=defects,
            n_views=n,
            placement_translation_m=tuple(float(v) for v in T[:3, 3]),
            placement_rotation_deg=rotation_angle_deg(T[:3, :3]),
            finalise_ms=(time.perf_counter() - t0) * 1000,
            volume=volume,
            revised_views=[self.view_results[i] for i in sorted(self._revised)],
        )


def inspect_capture(inspector: RecipeInspector, capture: Capture, part_id: str = "part") -> tuple[InspectionResult, PartSession]:
    """Run every frame of a capture through a part session; returns the result and the session (its views)."""
    session = inspector.start_part(part_id)
    for frame in capture.frames:
        session.add_view(frame)
    return session.finalise(), session
