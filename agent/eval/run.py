"""``agent eval``: enrol and inspect a whole dataset, and compute every metric of ../shared/spec/metrics.md.

Cell protocol (:func:`evaluate_cell_dataset`): per object, a recipe is enrolled from its first train capture (the
golden part) with :func:`agent.pipeline.enroll`, the other train captures being its teach-in parts (nominal parts run
through the cell, which set the threshold: :func:`agent.pipeline.calibrate_on_teach_in`); the recipe is kept in
``work_dir/recipes/`` and reused while the captures' content hashes and the enrollment settings match. Every test capture is inspected with :class:`agent.pipeline.RecipeInspector`, and
I-AUROC, accuracy at the recipe's threshold (with false-reject and escape rates), P-AUROC and AU-PRO@0.3 over all
views' maps, V-AUPRO@1% over the anomaly volumes and the per-view / last-view-to-verdict latency are reported, per
object and per defect type (that type's parts against all good parts), then averaged over objects.

Mad protocol (:func:`evaluate_mad_dataset`): per object, a reference is built from the posed train views (which
have no depth: visual-hull initialisation, trained unless ``fast``), a memory bank from the train images, and the
channel calibration from leave-views-out folds. The pipeline has no single-image inspection API, so each test image
(one instance, pose unknown) is scored here by composing the public pieces: :func:`estimate_single_image_pose` ->
render -> the three-channel map of :mod:`agent.anomaly` -> image score = maximum of the combined map.

Baseline ``patchcore-max``: single-view PatchCore with the same backbone: a memory bank of the golden views'
features only (no renders, no reference), per-view map = bank distance upsampled and blurred
(:func:`agent.memory_bank.anomaly_maps`), fused with the ``max`` rule at the recipe's voxel size. It has no rendered
depth, so it back-projects through the capture's own depth (the simulator writes depth); part score = maximum of the
volume (of the maps where no view has depth). Its threshold is chosen like the recipe's, on nominal data only:
leave-views-out maps of the golden views, nominal pseudo-parts, ``1 - target_false_reject_rate`` quantile x margin,
or, with teach-in parts, the same quantile of their baseline part scores x ``teach_in_margin`` (the recipe's rule).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from agent import anomaly
from agent.capture import Capture, Frame
from agent.datasets import cell_objects, list_cell_dataset, load_mad_object, mad_objects
from agent.eval import metrics
from agent.eval.report import OURS, SPLATPOSE_MAD_SIM, EvalReport, Latency, MethodResult, ObjectResult, PartRecord
from agent.features import PatchFeatureExtractor, get_extractor
from agent.fusion import SparseVolume, VoxelAccumulator
from agent.memory_bank import MemoryBank, anomaly_maps, patch_rows
from agent.pipeline import EnrollConfig, RecipeInspector, build_bank, enroll, fused_part_score, inspect_capture, nominal_threshold
from agent.recipe import Recipe, RecipeError, load_recipe, save_recipe
from agent.splat.placement import SingleImagePoseConfig, estimate_single_image_pose
from agent import machine

BASELINES = ("patchcore-max",)
PROTOCOLS = ("cell", "mad")
Progress = Callable[[str, int, int], None]  # (stage description, done, total)


def _noop(stage: str, done: int, total: int) -> None:
    pass


@dataclass
class EvalOptions:
    """What to evaluate and how. ``enroll`` is the enrollment config; ``fast`` switches it to fast mode and
    ``expected_views`` (None: the number of views of the object's first test capture) overrides its views."""

    objects: list[str] | None = None  # None: every object of the dataset
    baseline: str | None = None  # one of BASELINES
    fast: bool = False
    work_dir: Path = Path("eval-work")
    voxel_size_m: float | None = None  # V-AUPRO evaluation voxel; None: the recipe's voxel size
    expected_views: int | None = None
    enroll: EnrollConfig = field(default_factory=EnrollConfig)
    refine_placement: bool = True
    backend: str = "auto"  # rasterizer backend of inspection
    mad_pose: SingleImagePoseConfig = field(default_factory=SingleImagePoseConfig)

    def __post_init__(self) -> None:
        self.work_dir = Path(self.work_dir)
        if self.baseline is not None and self.baseline not in BASELINES:
            raise ValueError(f"--baseline must be one of {list(BASELINES)}, got {self.baseline!r}")
        if self.voxel_size_m is not None and not (math.isfinite(self.voxel_size_m) and 0 < self.voxel_size_m < 1):
            raise ValueError(f"voxel_size_m must be in (0, 1) metres, got {self.voxel_size_m}")
        if self.expected_views is not None and self.expected_views < 1:
            raise ValueError(f"expected_views must be >= 1, got {self.expected_views}")

    def enroll_config(self, n_views: int) -> EnrollConfig:
        mode = "fast" if self.fast else self.enroll.model_mode
        return replace(self.enroll, model_mode=mode, expected_views=self.expected_views or n_views)

    def to_json(self) -> dict:
        data = asdict(self)
        data["work_dir"] = str(self.work_dir)
        return data


# ---------------------------------------------------------------------------------------------
# Machine details


def machine_details(image_sizes: set[tuple[int, int]]) -> dict:
    """The machine (agent.machine.machine_details) plus the image sizes evaluated."""
    return machine.machine_details(image_size=", ".join(f"{w}x{h}" for w, h in sorted(image_sizes)) or "-")


# ---------------------------------------------------------------------------------------------
# Collecting one method's outcomes on one object


@dataclass
class _Instance:
    """What one inspected instance leaves for the metrics."""

    record: PartRecord
    maps: list[np.ndarray]  # per view, H x W
    masks: list[np.ndarray | None]  # per view, None where unknown
    volume: SparseVolume | None = None
    surface_points: np.ndarray | None = None
    defect_ids: np.ndarray | None = None
    view_ms: list[float] = field(default_factory=list)
    last_to_verdict_ms: float | None = None
    stage_ms: dict[str, list[float]] = field(default_factory=dict)


def _safe(fn, *args, **kwargs) -> float | None:
    """A metric's value, or None where it is undefined for the data (ValueError from agent.eval.metrics)."""
    try:
        value = float(fn(*args, **kwargs))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _pixel_metrics(instances: list[_Instance]) -> dict[str, float | None]:
    maps, masks = [], []
    for inst in instances:
        for m, k in zip(inst.maps, inst.masks):
            if k is not None:
                maps.append(m)
                masks.append(k)
    if not maps:
        return {"p_auroc": None, "au_pro_0.3": None}
    return {"p_auroc": _safe(metrics.pixel_auroc, maps, masks), "au_pro_0.3": _safe(metrics.au_pro, maps, masks, 0.3)}


def _v_aupro(instances: list[_Instance], voxel_size: float) -> float | None:
    usable = [i for i in instances if i.volume is not None and len(i.volume) and i.surface_points is not None and i.defect_ids is not None]
    if not usable:
        return None
    return _safe(metrics.v_aupro, [i.volume for i in usable], [i.surface_points for i in usable], [i.defect_ids for i in usable], voxel_size, 0.01)


def _scored(instances: list[_Instance]) -> tuple[np.ndarray, np.ndarray]:
    done = [i for i in instances if i.record.score is not None]
    return np.array([i.record.score for i in done], dtype=np.float64), np.array([i.record.label for i in done], dtype=bool)


def _located(instances: list[_Instance], threshold: float | None) -> dict[str, float | None]:
    """Beyond the spec: whether the evidence that fails a defective part lies at its defect (within
    :data:`agent.eval.metrics.LOCATE_RADIUS_M` of its ground-truth points). ``i_auroc_located``: I-AUROC with each
    defective part scored by its evidence there only (the smaller of its score and its highest voxel near the
    defect: a part failed by evidence elsewhere ranks by what it shows at the defect); ``located_rate``: the share of
    defective parts with a voxel at or over ``threshold`` near the defect. Parts without ground-truth points or a
    volume are left out; None where no defective part is left."""
    scored = [i for i in instances if i.record.score is not None]
    good = [i.record.score for i in scored if i.record.label == 0]
    bad = [i for i in scored if i.record.label == 1 and i.volume is not None and i.surface_points is not None
           and i.defect_ids is not None and (i.defect_ids > 0).any()]  # fmt: skip
    if not bad:
        return {"i_auroc_located": None, "located_rate": None}
    near = [None if i.record.defect_peak is None else min(i.record.defect_peak, i.record.score) for i in bad]
    out: dict[str, float | None] = {"i_auroc_located": _safe(metrics.located_auroc, good, near) if good else None}
    if threshold is not None:
        out["located_rate"] = float(np.mean([p is not None and p >= threshold for p in near]))
    return out


def _latency(instances: list[_Instance]) -> Latency:
    views = np.array([ms for i in instances for ms in i.view_ms], dtype=np.float64)
    last = np.array([i.last_to_verdict_ms for i in instances if i.last_to_verdict_ms is not None], dtype=np.float64)
    stages: dict[str, list[float]] = {}
    for i in instances:
        for k, v in i.stage_ms.items():
            stages.setdefault(k, []).extend(v)
    return Latency(
        n_views=len(views),
        per_view_ms_mean=float(views.mean()) if len(views) else None,
        per_view_ms_p50=float(np.percentile(views, 50)) if len(views) else None,
        per_view_ms_p95=float(np.percentile(views, 95)) if len(views) else None,
        last_view_to_verdict_ms_mean=float(last.mean()) if len(last) else None,
        last_view_to_verdict_ms_p95=float(np.percentile(last, 95)) if len(last) else None,
        stage_ms_mean={k: float(np.mean(v)) for k, v in stages.items() if v},
    )


def _method_result(instances: list[_Instance], threshold: float | None, voxel_size: float | None, notes: list[str]) -> MethodResult:
    """Every metric of one method on one object, overall and per defect type."""
    scores, labels = _scored(instances)
    out: dict[str, float | None] = {"i_auroc": _safe(metrics.image_auroc, scores, labels) if len(scores) else None}
    out.update(_pixel_metrics(instances))
    if voxel_size is not None:
        out["v_aupro_0.01"] = _v_aupro(instances, voxel_size)
    if threshold is not None:
        if len(scores):
            acc = metrics.accuracy_at_threshold(scores, labels, threshold)
            out.update(accuracy=acc.accuracy, false_reject_rate=acc.false_reject_rate, escape_rate=acc.escape_rate)
        else:
            out.update(accuracy=None, false_reject_rate=None, escape_rate=None)
    if voxel_size is not None:
        out.update(_located(instances, threshold))
    good = [i for i in instances if i.record.label == 0]
    per_type: dict[str, dict[str, float | None]] = {}
    for kind in sorted({i.record.category for i in instances if i.record.label == 1}):
        subset = good + [i for i in instances if i.record.category == kind]
        s, lab = _scored(subset)
        values: dict[str, float | None] = {"i_auroc": _safe(metrics.image_auroc, s, lab) if len(s) else None}
        values.update(_pixel_metrics(subset))
        if voxel_size is not None:
            values["v_aupro_0.01"] = _v_aupro(subset, voxel_size)
            values["i_auroc_located"] = _located(subset, None)["i_auroc_located"]
        values["n"] = float(len(subset) - len(good))
        per_type[kind] = values
    incomplete = sum(i.record.score is None for i in instances)
    if incomplete:
        notes = notes + [f"{incomplete} instance(s) incomplete (no score): left out of the part-level metrics"]
    return MethodResult(out, per_type, [i.record for i in instances], _latency(instances), threshold, notes)


def _mean_over_objects(objects: list[ObjectResult]) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for obj in objects:
        for name, res in obj.methods.items():
            for key, value in res.metrics.items():
                out.setdefault(name, {}).setdefault(key, [])  # type: ignore[arg-type]
                if value is not None:
                    out[name][key].append(value)  # type: ignore[union-attr]
    return {name: {k: (float(np.mean(v)) if v else None) for k, v in m.items()} for name, m in out.items()}  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Recipes in the work dir


def capture_hash(folder: str | os.PathLike) -> str:
    """sha256 over the relative paths and bytes of every file of a capture folder (sorted)."""
    folder = Path(folder)
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode() + b"\0")
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def enrolled_recipe(
    name: str,
    golden: Capture,
    golden_dir: Path,
    config: EnrollConfig,
    work_dir: Path,
    extractor: PatchFeatureExtractor,
    progress: Progress = _noop,
    teach_in: list[Capture] | None = None,
) -> tuple[Recipe, dict]:
    """The recipe of ``name`` from ``work_dir/recipes/``, enrolled again unless the capture hashes (golden and teach-in)
    and settings match."""
    recipes_dir = work_dir / "recipes"
    stamp_path = work_dir / f"{name}.enroll.json"
    key = {"capture_hash": capture_hash(golden_dir), "capture": str(golden_dir), "config": asdict(config),
           "teach_in_hashes": [capture_hash(c.root) for c in teach_in or []]}  # fmt: skip
    compared = ("capture_hash", "config", "teach_in_hashes")
    if stamp_path.is_file() and (recipes_dir / name).is_dir():
        try:
            stamp = json.loads(stamp_path.read_text(encoding="utf-8"))
            if {k: stamp.get(k, []) for k in compared} == {k: key[k] for k in compared}:
                recipe = load_recipe(recipes_dir / name)
                return recipe, {**stamp, "reused": True}
        except (json.JSONDecodeError, RecipeError):
            pass
    t0 = time.perf_counter()
    recipe = enroll(golden, name, config, progress, extractor, teach_in=teach_in or ())
    seconds = time.perf_counter() - t0
    save_recipe(recipe, recipes_dir)
    stamp = {**key, "enroll_seconds": seconds, "version": recipe.version}
    stamp_path.write_text(json.dumps(stamp, indent=1) + "\n", encoding="utf-8")
    return recipe, {**stamp, "reused": False}


# ---------------------------------------------------------------------------------------------
# Baseline: single-view PatchCore, max fusion


def _image_features(extractor: PatchFeatureExtractor, image: np.ndarray):
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.uint8)).float().div_(255.0)[None]
    with torch.no_grad():
        return extractor(x)


def patchcore_map(extractor: PatchFeatureExtractor, bank: MemoryBank, image: np.ndarray, sigma_px: float) -> np.ndarray:
    """H x W float32 PatchCore map of one image: bank distance per patch, upsampled and blurred."""
    feats = _image_features(extractor, image)
    return anomaly_maps(bank.score_patches(feats.features), image.shape[:2], feats.stride, sigma_px)[0]


class PatchCoreMaxBaseline:
    """Single-view PatchCore on the golden views, max voxel fusion through the capture's depth (see the module doc)."""

    def __init__(self, golden: Capture, extractor: PatchFeatureExtractor, config: EnrollConfig, voxel_size: float, progress: Progress = _noop):
        self.extractor = extractor
        self.voxel_size = voxel_size
        frames = golden.frames
        self.sigma = anomaly.map_sigma_px(frames[0].intrinsics.width)
        feats = []
        for i, f in enumerate(frames):
            progress("baseline: golden features", i, len(frames))
            feats.append(_image_features(extractor, f.image))
        rows = [patch_rows(p.features) for p in feats]
        meta = {"backbone": config.backbone, "stride": str(extractor.stride)}
        self.bank = MemoryBank.build(np.concatenate(rows), fraction=config.bank_fraction, seed=config.seed, metadata=meta)
        # Threshold on nominal data: leave-views-out maps, then nominal pseudo-parts fused like a part.
        n = len(frames)
        folds = min(config.folds, n)
        maps: list[np.ndarray] = [None] * n  # type: ignore[list-item]
        for fold in range(folds):
            progress("baseline: calibration", fold, folds)
            kept = [i for i in range(n) if i % folds != fold]
            fold_bank = MemoryBank.build(np.concatenate([rows[i] for i in kept]), fraction=config.bank_fraction, seed=config.seed, metadata=meta)
            for i in range(fold, n, folds):
                maps[i] = anomaly_maps(fold_bank.score_patches(feats[i].features), frames[i].image.shape[:2], feats[i].stride, self.sigma)[0]
        rng = np.random.default_rng(config.seed)
        k = min(config.expected_views, n)
        scores = []
        for _ in range(config.pseudo_parts):
            pick = sorted(rng.choice(n, size=k, replace=False))
            scores.append(fused_part_score([maps[i] for i in pick], [frames[i].depth for i in pick], [frames[i] for i in pick], voxel_size, "max"))
        self.threshold = float(np.quantile(scores, 1.0 - config.target_false_reject_rate)) * config.threshold_margin
        progress("baseline: calibration", folds, folds)

    def calibrate_on_teach_in(self, captures: list[Capture], config: EnrollConfig) -> None:
        """The threshold from nominal teach-in parts, by the recipe's rule (:func:`agent.pipeline.calibrate_on_teach_in`)."""
        if captures:
            scores = [self.inspect(c)[0] for c in captures]
            self.threshold = nominal_threshold(scores, config.target_false_reject_rate, config.teach_in_margin)

    def inspect(self, capture: Capture) -> tuple[float, list[np.ndarray], SparseVolume | None, list[float], float]:
        """(part score, per-view maps, fused volume or None, per-view ms, last-view-to-verdict ms)."""
        acc = VoxelAccumulator(self.voxel_size, rule="max")
        maps, view_ms = [], []
        for f in capture.frames:
            t = time.perf_counter()
            m = patchcore_map(self.extractor, self.bank, f.image, self.sigma)
            if f.depth is not None and f.c2w is not None and (f.depth > 0).any():
                acc.add_view(m, f.depth, f.c2w, f.intrinsics, f.name)
            maps.append(m)
            view_ms.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        volume = acc.volume() if acc.view_ids else None
        score = float(volume.score.max()) if volume is not None and len(volume) else float(max(m.max() for m in maps))
        last = view_ms[-1] + (time.perf_counter() - t) * 1000
        return score, maps, volume, view_ms, last


# ---------------------------------------------------------------------------------------------
# Cell protocol


def _masks_of(capture: Capture, label: int) -> list[np.ndarray | None]:
    out = []
    for f in capture.frames:
        if f.mask is not None:
            out.append(np.asarray(f.mask, dtype=bool))
        else:
            out.append(np.zeros(f.image.shape[:2], bool) if label == 0 else None)
    return out


def _gt_arrays(capture: Capture) -> tuple[np.ndarray | None, np.ndarray | None]:
    gt = capture.gt
    if gt is None or gt.surface_points is None or gt.defect_ids is None:
        return None, None
    return np.asarray(gt.surface_points), np.asarray(gt.defect_ids)


def _defect_evidence(volume: SparseVolume | None, label: int, points: np.ndarray | None, ids: np.ndarray | None) -> tuple[float | None, float | None]:
    """A defective part's highest voxel near its defect and elsewhere (:func:`agent.eval.metrics.evidence_near`);
    (None, None) for a good part or where the volume or the ground truth is missing."""
    if not label or volume is None or points is None or ids is None or not (ids > 0).any():
        return None, None
    return metrics.evidence_near(volume, points[ids > 0])


def _select_objects(available: list[str], wanted: list[str] | None, root: Path) -> list[str]:
    if not wanted:
        return available
    unknown = [o for o in wanted if o not in available]
    if unknown:
        raise ValueError(f"{root}: no object {', '.join(unknown)} in the dataset; it has {', '.join(available) or 'none'}")
    return list(dict.fromkeys(wanted))


def evaluate_cell_dataset(root: str | os.PathLike, options: EvalOptions = EvalOptions(), progress: Progress = _noop) -> EvalReport:
    """Enrol and inspect every object of a "cell" dataset; every metric per object and defect type (module doc)."""
    t_start = time.perf_counter()
    root = Path(root)
    items = list_cell_dataset(root)
    objects = _select_objects(cell_objects(root), options.objects, root)
    options.work_dir.mkdir(parents=True, exist_ok=True)
    extractor = get_extractor(options.enroll.backbone, device="cpu")
    sizes: set[tuple[int, int]] = set()
    results, notes = [], []
    for obj in objects:
        train = [it for it in items if it.object == obj and it.split == "train"]
        tests = [it for it in items if it.object == obj and it.split == "test"]
        if not train:
            raise ValueError(f"{root / obj / 'train'}: object {obj} has no train capture to enrol from")
        if not tests:
            raise ValueError(f"{root / obj / 'test'}: object {obj} has no test captures")
        golden = train[0].load()
        teach_in = [it.load() for it in train[1:]]
        notes.append(f"{obj}: enrolled from train/{train[0].capture_id}; threshold from "
                     + (f"{len(teach_in)} teach-in parts (train/{', train/'.join(it.capture_id for it in train[1:])})" if teach_in else "leave-views-out (no teach-in parts)"))
        n_views = len(tests[0].load().frames)
        config = options.enroll_config(n_views)
        recipe, recipe_info = enrolled_recipe(obj, golden, train[0].path, config, options.work_dir, extractor,
                                              lambda s, d, t, obj=obj: progress(f"{obj}: {s}", d, t),
                                              teach_in=teach_in)  # fmt: skip
        voxel = recipe.settings.voxel_size_m
        eval_voxel = options.voxel_size_m or voxel
        inspector = RecipeInspector(recipe, extractor, refine=options.refine_placement, backend=options.backend)
        baseline = None
        if options.baseline == "patchcore-max":
            baseline = PatchCoreMaxBaseline(golden, extractor, config, voxel, lambda s, d, t, obj=obj: progress(f"{obj}: {s}", d, t))
            baseline.calibrate_on_teach_in(teach_in, config)
        ours: list[_Instance] = []
        base: list[_Instance] = []
        for n, item in enumerate(tests):
            progress(f"{obj}: inspecting test parts", n, len(tests))
            capture = item.load()
            label = int(item.category != "good")
            masks = _masks_of(capture, label)
            points, ids = _gt_arrays(capture)
            sizes.update((f.intrinsics.width, f.intrinsics.height) for f in capture.frames)
            part_id = f"{item.category}-{item.capture_id}"
            t0 = time.perf_counter()
            result, session = inspect_capture(inspector, capture, part_id)
            seconds = time.perf_counter() - t0
            views = session.view_results
            stage: dict[str, list[float]] = {}
            for v in views:
                for k, ms in v.timings_ms.items():
                    stage.setdefault(k, []).append(ms)
            stage.setdefault("finalise", []).append(result.finalise_ms)
            our_volume = result.volume if result.score is not None else None
            record = PartRecord(item.capture_id, item.category, label, result.score, result.verdict, result.n_views,
                                [float(v.view_score) for v in views], seconds, *_defect_evidence(our_volume, label, points, ids))  # fmt: skip
            ours.append(_Instance(
                record, [v.anomaly_map for v in views], masks, our_volume, points, ids,
                [v.latency_ms for v in views], (views[-1].latency_ms + result.finalise_ms) if views else None, stage,
            ))  # fmt: skip
            if baseline is not None:
                t0 = time.perf_counter()
                score, maps, volume, view_ms, last = baseline.inspect(capture)
                seconds = time.perf_counter() - t0
                record = PartRecord(item.capture_id, item.category, label, score, "fail" if score >= baseline.threshold else "pass",
                                    len(maps), [float(m.max()) for m in maps], seconds, *_defect_evidence(volume, label, points, ids))  # fmt: skip
                base.append(_Instance(record, maps, masks, volume, points, ids, view_ms, last))
        progress(f"{obj}: inspecting test parts", len(tests), len(tests))
        methods = {OURS: _method_result(ours, 1.0, eval_voxel, [])}
        if baseline is not None:
            depth_note = "fused through the capture's own depth (no rendered depth in this baseline)"
            methods[options.baseline] = _method_result(base, baseline.threshold, eval_voxel, [depth_note])  # type: ignore[index]
        info = {
            "version": recipe.version, "voxel_size_m": voxel, "eval_voxel_size_m": eval_voxel, "train_capture": train[0].capture_id,
            "model_mode": recipe.settings.model_mode, "expected_views": recipe.settings.expected_views,
            "enroll_seconds": recipe_info.get("enroll_seconds"), "reused": recipe_info.get("reused"),
            "raw_threshold": recipe.calibration.raw_threshold, "surface_raw_threshold": recipe.calibration.surface_raw_threshold,
            "threshold_source": recipe.calibration.threshold_source(surface=recipe.calibration.surface_raw_threshold is not None),
            "teach_in_captures": [it.capture_id for it in train[1:]],
        }  # fmt: skip
        results.append(ObjectResult(obj, methods, info))
    if options.baseline:
        notes.append("patchcore-max: single-view PatchCore (golden views only, same backbone), max fusion through the "
                     "capture's depth; threshold from nominal data by the recipe's rule (teach-in parts, else leave-views-out "
                     "pseudo-parts)")  # fmt: skip
    notes.append("I-AUROC per defect type: that type's parts vs all good parts; V-AUPRO pools good and defective parts")
    notes.append(f"beyond metrics.md: i_auroc_located scores each defective part by its evidence within {metrics.LOCATE_RADIUS_M * 100:.0f} cm "
                 "of its true defect only; located_rate is the share of defective parts with a voxel at or over the threshold there")
    return EvalReport(
        protocol="cell", dataset=str(root), created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        machine=machine_details(sizes), options=options.to_json(), objects=results, mean=_mean_over_objects(results),
        notes=notes, seconds=time.perf_counter() - t_start,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Mad protocol


@dataclass
class MadScorer:
    """Reference, bank and channel calibration of one MAD object; scores single images of unknown pose."""

    extractor: PatchFeatureExtractor
    model: object  # GaussianModel
    bank: MemoryBank
    train: Capture
    offset: np.ndarray
    scale: np.ndarray
    depth_scale_m: float
    pose_config: SingleImagePoseConfig
    backend: str = "auto"

    def channels(self, frame: Frame, model=None, bank: MemoryBank | None = None) -> np.ndarray:
        ref = anomaly.render_reference(model or self.model, frame.c2w, frame.intrinsics, None, self.backend)
        fg = anomaly.observed_foreground(frame)
        composite = ref.composite(frame.image, anomaly.colour_gain(frame.image, ref, fg))
        geometry = anomaly.geometry_evidence(fg, None, ref, self.depth_scale_m)
        return anomaly.channel_maps(self.extractor, bank or self.bank, frame.image, composite, geometry, anomaly.map_sigma_px(frame.intrinsics.width))

    def score_image(self, image: np.ndarray, name: str) -> tuple[np.ndarray, float]:
        """(combined map H x W, ms): pose estimate -> render -> channel maps -> calibrated combination."""
        t0 = time.perf_counter()
        K = self.train.frames[0].intrinsics
        if image.shape[:2] != (K.height, K.width):
            raise ValueError(f"test image {name} is {image.shape[1]}x{image.shape[0]}, the train views are {K.width}x{K.height}")
        pose = estimate_single_image_pose(self.model, image, K, self.train.frames, self.pose_config)
        frame = Frame(name=name, image=image, intrinsics=K, c2w=pose.c2w)
        combined = anomaly.combine_channels(self.channels(frame), self.offset, self.scale)
        return combined, (time.perf_counter() - t0) * 1000


def build_mad_scorer(train: Capture, extractor: PatchFeatureExtractor, config: EnrollConfig, options: EvalOptions, progress: Progress = _noop) -> MadScorer:
    """Reference (visual hull, trained unless fast), bank of the train images, leave-views-out calibration."""
    from agent.splat.init import init_from_visual_hull

    rng = np.random.default_rng(config.seed)
    if config.model_mode == "fast":
        progress("reference model (visual hull)", 0, 1)
        model = init_from_visual_hull(train, config.init_points, rng)
    else:
        from agent.splat.train import TrainConfig, train_gaussians

        tc = TrainConfig(iterations=config.train_iterations, init_points=config.init_points, init="visual_hull", seed=config.seed)
        model, _ = train_gaussians(train, tc, lambda p: progress("reference model (training)", p.step, p.iterations))
    images = [f.image for f in train.frames]
    bank = build_bank(extractor, images, config.bank_fraction, config.seed, config.backbone)
    scorer = MadScorer(extractor, model, bank, train, np.zeros(3), np.ones(3), config.depth_scale_m, options.mad_pose, options.backend)
    n = len(train.frames)
    folds = min(config.folds, n)
    maps = []
    for fold in range(folds):
        progress("calibration: leave-views-out", fold, folds)
        kept = [i for i in range(n) if i % folds != fold]
        sub = Capture([train.frames[i] for i in kept], None, train.root)
        fold_model = init_from_visual_hull(sub, config.init_points, np.random.default_rng(config.seed))
        fold_bank = build_bank(extractor, [images[i] for i in kept], config.bank_fraction, config.seed, config.backbone)
        maps += [scorer.channels(train.frames[i], fold_model, fold_bank) for i in range(fold, n, folds)]
    progress("calibration: leave-views-out", folds, folds)
    scorer.offset, scorer.scale = anomaly.fit_channel_calibration(maps)
    return scorer


def evaluate_mad_dataset(root: str | os.PathLike, options: EvalOptions = EvalOptions(), progress: Progress = _noop) -> EvalReport:
    """Per MAD object: enrol from train/good (posed), score each test image (one instance, pose unknown).

    I-AUROC, P-AUROC and AU-PRO@0.3, per object and per defect category, beside SplatPose's MAD-Sim figures.
    """
    t_start = time.perf_counter()
    root = Path(root)
    objects = _select_objects(mad_objects(root), options.objects, root)
    if not objects:
        raise ValueError(f"{root}: no MAD object folders (with a transforms.json) found")
    extractor = get_extractor(options.enroll.backbone, device="cpu")
    sizes: set[tuple[int, int]] = set()
    results = []
    for obj in objects:
        mad = load_mad_object(root / obj)
        if not mad.test:
            raise ValueError(f"{root / obj / 'test'}: object {obj} has no test images")
        config = options.enroll_config(1)
        say = lambda s, d, t, obj=obj: progress(f"{obj}: {s}", d, t)  # noqa: E731
        t0 = time.perf_counter()
        scorer = build_mad_scorer(mad.train, extractor, config, options, say)
        enroll_seconds = time.perf_counter() - t0
        base_bank, sigma = None, anomaly.map_sigma_px(mad.train.frames[0].intrinsics.width)
        if options.baseline == "patchcore-max":
            base_bank = build_bank(extractor, [f.image for f in mad.train.frames], config.bank_fraction, config.seed, config.backbone)
        ours: list[_Instance] = []
        base: list[_Instance] = []
        for n, item in enumerate(mad.test):
            say("scoring test images", n, len(mad.test))
            image, mask = item.load()
            sizes.add((image.shape[1], image.shape[0]))
            label = int(item.is_defective)
            combined, ms = scorer.score_image(image, f"{item.category}/{item.name}")
            record = PartRecord(item.name, item.category, label, float(combined.max()), "-", 1, [float(combined.max())], ms / 1000)
            ours.append(_Instance(record, [combined], [mask], view_ms=[ms], last_to_verdict_ms=ms))
            if base_bank is not None:
                t = time.perf_counter()
                m = patchcore_map(extractor, base_bank, image, sigma)
                ms = (time.perf_counter() - t) * 1000
                base.append(_Instance(PartRecord(item.name, item.category, label, float(m.max()), "-", 1, [float(m.max())], ms / 1000),
                                      [m], [mask], view_ms=[ms], last_to_verdict_ms=ms))  # fmt: skip
        say("scoring test images", len(mad.test), len(mad.test))
        methods = {OURS: _method_result(ours, None, None, ["single-image path composed in agent.eval.run (pose estimate -> render -> map)"])}
        if base_bank is not None:
            methods[options.baseline] = _method_result(base, None, None, ["single-view PatchCore, image score = max of the map"])  # type: ignore[index]
        info = {"model_mode": config.model_mode, "enroll_seconds": enroll_seconds, "train_views": len(mad.train.frames),
                "gaussians": len(scorer.model)}  # fmt: skip
        results.append(ObjectResult(obj, methods, info))
    notes = [
        "mad: the pipeline has no single-image inspection API; each test image is scored in agent.eval.run by "
        "estimate_single_image_pose -> render -> three-channel map -> max (no threshold: no accuracy)",
        "mad: train views have no depth; reference from the visual hull (trained unless --fast); calibration from "
        "leave-views-out folds (visual-hull fold models, fold banks)",
        "reference figures are SplatPose's MAD-Sim means, for orientation only (different data)",
    ]
    return EvalReport(
        protocol="mad", dataset=str(root), created_utc=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        machine=machine_details(sizes), options=options.to_json(), objects=results, mean=_mean_over_objects(results),
        references={"SplatPose (MAD-Sim)": SPLATPOSE_MAD_SIM}, notes=notes, seconds=time.perf_counter() - t_start,
    )  # fmt: skip


def evaluate_dataset(root: str | os.PathLike, protocol: str, options: EvalOptions = EvalOptions(), progress: Progress = _noop) -> EvalReport:
    """Dispatch on ``protocol`` ("cell" or "mad")."""
    if protocol == "cell":
        return evaluate_cell_dataset(root, options, progress)
    if protocol == "mad":
        return evaluate_mad_dataset(root, options, progress)
    raise ValueError(f"protocol must be one of {list(PROTOCOLS)}, got {protocol!r}")
