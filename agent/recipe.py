"""Recipes on disk: what enrollment produces for one product, and how it is loaded and verified.

A recipe is a folder ``<recipes_dir>/<name>/``:

- ``recipe.toml``          settings: camera, voxel size, backbone, expected/min views, fusion rule, thresholds
- ``model.ply``            the Gaussian reference model (3DGS PLY layout, recipe frame = world at enrollment)
- ``memory_bank.safetensors`` the PatchCore memory bank (agent.memory_bank format)
- ``calibration.json``     per-channel normalisation of the anomaly map, the raw part-score threshold, the
                           nominal scores it came from, the enrollment camera poses and backdrop colour
- ``surface.npz``          optional (enrollment captures with depth): the golden part's measured surface with its
                           colour and nominal tolerances (:class:`agent.surface.NominalSurface`)
- ``reference_views.npz``  optional (teach-in parts with depth): the teach-in parts' views, images, depth, poses and
                           placements, the colour reference of views taken from the same poses
                           (:class:`agent.reference_views.ReferenceViews`)
- ``manifest.json``        ``{"files": {name: sha256}}`` of every artefact above

The recipe version is ``"sha256:" + sha256(manifest.json bytes)``: it changes when any artefact changes.
Loading reads only TOML, JSON, PLY, safetensors and npz without pickles (nothing is unpickled), verifies every hash of the
manifest, and raises :class:`RecipeError` naming the file and the problem for anything tampered or malformed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import tomli_w

from agent.anomaly import SURFACE_CHANNELS
from agent.geometry import Intrinsics, check_rigid
from agent.memory_bank import MemoryBank
from agent.splat.model import GaussianModel
from agent.errors import FileProblemError
from agent.reference_views import ReferenceViews
from agent.surface import NominalSurface

RECIPE_FILE = "recipe.toml"
MODEL_FILE = "model.ply"
BANK_FILE = "memory_bank.safetensors"
CALIBRATION_FILE = "calibration.json"
MANIFEST_FILE = "manifest.json"
SURFACE_FILE = "surface.npz"
REFERENCE_VIEWS_FILE = "reference_views.npz"
ARTEFACTS = (RECIPE_FILE, MODEL_FILE, BANK_FILE, CALIBRATION_FILE)
OPTIONAL_ARTEFACTS = (SURFACE_FILE, REFERENCE_VIEWS_FILE)
FORMAT_VERSION = 1
CHANNELS = ("memory", "reference", "geometry")  # the anomaly-map channels, in calibration order
RECIPES_ENV = "AGENT_RECIPES_DIR"
_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


class RecipeError(FileProblemError):
    """A recipe that cannot be used. ``str()`` is ``"<path>: <problem>"``."""


def default_recipes_dir() -> Path:
    """``$AGENT_RECIPES_DIR`` if set, else ``./recipes``."""
    return Path(os.environ.get(RECIPES_ENV) or "recipes")


def check_recipe_name(name: str) -> str:
    """A recipe name is an MQTT id: ``[A-Za-z0-9._-]{1,128}`` and not "." or ".."."""
    if not isinstance(name, str) or not _NAME.match(name) or name in (".", ".."):
        raise ValueError(f"recipe name must match [A-Za-z0-9._-]{{1,128}}, got {name!r}")
    return name


# ---------------------------------------------------------------------------------------------
# Contents


@dataclass
class RecipeSettings:
    """``recipe.toml``."""

    name: str
    camera: Intrinsics  # the recipe's camera, for frames that carry none
    voxel_size_m: float
    backbone: str
    expected_views: int
    min_views: int
    fusion_rule: str = "topk"
    min_defect_voxels: int = 1
    target_false_reject_rate: float = 0.01
    threshold_margin: float = 1.25
    placement_views: int = 3  # refinement uses the latest this many views of a part
    model_mode: str = "train"  # "train" (train_gaussians) or "fast" (init_from_depth only)
    created_utc: str = ""
    agent_version: str = ""

    def validate(self, where: str = RECIPE_FILE) -> None:
        """Raise ValueError naming the field that is wrong."""
        check_recipe_name(self.name)
        self.camera.validate()
        from agent.features import EXTRACTORS
        from agent.fusion import FUSION_RULES

        checks = [
            (math.isfinite(self.voxel_size_m) and 0 < self.voxel_size_m < 1, f"voxel_size_m must be in (0, 1) metres, got {self.voxel_size_m}"),
            (self.backbone in EXTRACTORS, f"backbone must be one of {sorted(EXTRACTORS)}, got {self.backbone!r}"),
            (self.expected_views >= 1, f"expected_views must be >= 1, got {self.expected_views}"),
            (1 <= self.min_views <= self.expected_views, f"min_views must be in [1, expected_views], got {self.min_views}"),
            (self.fusion_rule in FUSION_RULES, f"fusion_rule must be one of {list(FUSION_RULES)}, got {self.fusion_rule!r}"),
            (self.min_defect_voxels >= 1, f"min_defect_voxels must be >= 1, got {self.min_defect_voxels}"),
            (0 < self.target_false_reject_rate < 0.5, f"target_false_reject_rate must be in (0, 0.5), got {self.target_false_reject_rate}"),
            (math.isfinite(self.threshold_margin) and self.threshold_margin >= 1, f"threshold_margin must be >= 1, got {self.threshold_margin}"),
            (self.placement_views >= 1, f"placement_views must be >= 1, got {self.placement_views}"),
            (self.model_mode in ("train", "fast"), f"model_mode must be train or fast, got {self.model_mode!r}"),
        ]  # fmt: skip
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def to_toml(self) -> dict[str, Any]:
        K = self.camera
        return {
            "format_version": FORMAT_VERSION,
            "name": self.name,
            "created_utc": self.created_utc,
            "agent_version": self.agent_version,
            "camera": {"fx": K.fx, "fy": K.fy, "cx": K.cx, "cy": K.cy, "width": K.width, "height": K.height},
            "model": {"mode": self.model_mode},
            "features": {"backbone": self.backbone},
            "views": {"expected": self.expected_views, "min": self.min_views, "placement": self.placement_views},
            "fusion": {"voxel_size_m": self.voxel_size_m, "rule": self.fusion_rule, "min_defect_voxels": self.min_defect_voxels},
            "thresholds": {
                "target_false_reject_rate": self.target_false_reject_rate,
                "margin": self.threshold_margin,
                "verdict_threshold": 1.0,
            },
        }

    @classmethod
    def from_toml(cls, data: dict[str, Any], path: Path) -> "RecipeSettings":
        def get(table: str | None, key: str, kind: type | tuple[type, ...]) -> Any:
            scope = data if table is None else data.get(table)
            where = key if table is None else f"[{table}] {key}"
            if not isinstance(scope, dict) or key not in scope:
                raise RecipeError(path, f"missing {where}")
            value = scope[key]
            if isinstance(value, bool) or not isinstance(value, kind):
                raise RecipeError(path, f"{where} has the wrong type: {value!r}")
            return value

        version = get(None, "format_version", int)
        if version != FORMAT_VERSION:
            raise RecipeError(path, f"format_version is {version}, this agent reads {FORMAT_VERSION}")
        num = (int, float)
        try:
            camera = Intrinsics(
                float(get("camera", "fx", num)), float(get("camera", "fy", num)), float(get("camera", "cx", num)),
                float(get("camera", "cy", num)), get("camera", "width", int), get("camera", "height", int),
            )  # fmt: skip
            settings = cls(
                name=get(None, "name", str),
                camera=camera,
                voxel_size_m=float(get("fusion", "voxel_size_m", num)),
                backbone=get("features", "backbone", str),
                expected_views=get("views", "expected", int),
                min_views=get("views", "min", int),
                fusion_rule=get("fusion", "rule", str),
                min_defect_voxels=get("fusion", "min_defect_voxels", int),
                target_false_reject_rate=float(get("thresholds", "target_false_reject_rate", num)),
                threshold_margin=float(get("thresholds", "margin", num)),
                placement_views=get("views", "placement", int),
                model_mode=get("model", "mode", str),
                created_utc=get(None, "created_utc", str),
                agent_version=get(None, "agent_version", str),
            )
            settings.validate()
        except ValueError as e:
            if isinstance(e, RecipeError):
                raise
            raise RecipeError(path, str(e)) from None
        return settings


@dataclass
class Calibration:
    """``calibration.json``: how raw evidence becomes the verdict scale (fitted on nominal data only).

    A view's combined map is ``max_c w_c (channel_c - offset_c) / scale_c`` over :data:`CHANNELS`
    (``w`` = :data:`agent.anomaly.CHANNEL_WEIGHTS`); the part
    score is :func:`agent.fusion.part_score` of the fused volume of combined maps (the highest level at which a
    region of ``min_defect_voxels`` voxels exists) divided by ``raw_threshold`` (so the verdict threshold is 1.0). ``nominal_part_scores`` are the raw scores of the nominal pseudo-parts the threshold
    was chosen from (their quantile at ``1 - target_false_reject_rate`` times the margin).
    """

    channel_offset: list[float]
    channel_scale: list[float]
    raw_threshold: float
    nominal_part_scores: list[float]
    backdrop_rgb: list[float]  # median backdrop colour of the golden views, [0, 1]
    enrollment_poses: list[np.ndarray]  # OpenGL c2w of the golden views
    enrollment_frames: list[str]
    geometry_depth_scale_m: float
    map_sigma_px: float  # Gaussian blur of the channel maps at the recipe camera's size
    folds: int
    notes: dict[str, Any] = field(default_factory=dict)
    # Surface scoring (views with depth, recipes with a nominal surface): the raw part-score threshold of the
    # surface evidence and the nominal pseudo-part scores it came from; None when the recipe has no surface.
    surface_raw_threshold: float | None = None
    surface_nominal_part_scores: list[float] = field(default_factory=list)
    surface_channel_scale: list[float] = field(default_factory=lambda: [1.0] * len(SURFACE_CHANNELS))  # agent.anomaly.SURFACE_CHANNELS
    # Teach-in (agent.pipeline.calibrate_on_teach_in): the raw part scores of the nominal teach-in parts that set
    # raw_threshold (feature path) / surface_raw_threshold (surface path); empty: the threshold is leave-views-out.
    teach_in_part_scores: list[float] = field(default_factory=list)
    surface_teach_in_part_scores: list[float] = field(default_factory=list)
    # The surface channels' scales of a view whose colour is compared with the teach-in parts' reference views
    # (reference_views.npz) instead of the golden surface colour, measured on the teach-in parts; None: the recipe has
    # no reference views.
    reference_channel_scale: list[float] | None = None
    # The part scores above were agent.fusion.part_score over regions of this many voxels; it must equal the recipe's
    # min_defect_voxels (a recipe enrolled before the key existed was calibrated on the volume's maximum: 1).
    part_score_min_voxels: int = 1
    # The surface path's fused geometry (agent.fusion.SurfaceEvidenceAccumulator): the typical peak of the fused signed
    # geometry evidence on the teach-in parts, which it is divided by before it is compared with the fused appearance
    # (on the views' channel scales). None: the recipe fuses the combined view maps (enrolled before the split, or
    # without reference views).
    surface_fused_geometry_scale: float | None = None

    def surface_scale(self, with_references: bool) -> list[float]:
        """The surface channels' scales of a view whose colour was compared with reference views (``with_references``)
        or with the golden surface colour."""
        if with_references and self.reference_channel_scale is not None:
            return list(self.reference_channel_scale)
        return list(self.surface_channel_scale)

    def threshold_source(self, surface: bool) -> str:
        """Where the threshold of the surface (or feature) path came from: "teach-in" or "leave-views-out"."""
        return "teach-in" if (self.surface_teach_in_part_scores if surface else self.teach_in_part_scores) else "leave-views-out"

    def validate(self) -> None:
        n = len(CHANNELS)
        if len(self.channel_offset) != n or len(self.channel_scale) != n:
            raise ValueError(f"channel_offset and channel_scale must have {n} entries ({', '.join(CHANNELS)})")
        values = [*self.channel_offset, *self.channel_scale, self.raw_threshold, self.geometry_depth_scale_m, self.map_sigma_px]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
            raise ValueError("calibration numbers must be finite")
        if min(self.channel_scale) <= 0:
            raise ValueError(f"channel_scale must be > 0, got {self.channel_scale}")
        if self.raw_threshold <= 0:
            raise ValueError(f"raw_threshold must be > 0, got {self.raw_threshold}")
        if len(self.backdrop_rgb) != 3 or not all(0 <= v <= 1 for v in self.backdrop_rgb):
            raise ValueError(f"backdrop_rgb must be 3 values in [0, 1], got {self.backdrop_rgb}")
        if len(self.enrollment_poses) != len(self.enrollment_frames) or not self.enrollment_poses:
            raise ValueError("enrollment_poses and enrollment_frames must be non-empty and equally long")
        for i, T in enumerate(self.enrollment_poses):
            check_rigid(T, what=f"enrollment_poses[{i}]")
        n_surface = len(SURFACE_CHANNELS)
        if len(self.surface_channel_scale) != n_surface or not all(math.isfinite(v) and v > 0 for v in self.surface_channel_scale):
            raise ValueError(f"surface_channel_scale must be {n_surface} positive values, got {self.surface_channel_scale}")
        if self.surface_raw_threshold is not None and not (math.isfinite(self.surface_raw_threshold) and self.surface_raw_threshold > 0):
            raise ValueError(f"surface_raw_threshold must be > 0, got {self.surface_raw_threshold}")
        for name in ("teach_in_part_scores", "surface_teach_in_part_scores"):
            if not all(math.isfinite(v) and v >= 0 for v in getattr(self, name)):
                raise ValueError(f"{name} must be finite and >= 0")
        if self.surface_teach_in_part_scores and self.surface_raw_threshold is None:
            raise ValueError("surface_teach_in_part_scores without a surface_raw_threshold")
        if self.part_score_min_voxels < 1:
            raise ValueError(f"part_score_min_voxels must be >= 1, got {self.part_score_min_voxels}")
        if self.reference_channel_scale is not None:
            if len(self.reference_channel_scale) != n_surface or not all(math.isfinite(v) and v > 0 for v in self.reference_channel_scale):
                raise ValueError(f"reference_channel_scale must be {n_surface} positive values, got {self.reference_channel_scale}")
            if not self.surface_teach_in_part_scores:
                raise ValueError("reference_channel_scale without surface_teach_in_part_scores (reference views come from teach-in parts)")
        if self.surface_fused_geometry_scale is not None:
            if not (math.isfinite(self.surface_fused_geometry_scale) and self.surface_fused_geometry_scale > 0):
                raise ValueError(f"surface_fused_geometry_scale must be > 0, got {self.surface_fused_geometry_scale}")
            if self.surface_raw_threshold is None:
                raise ValueError("surface_fused_geometry_scale without a surface_raw_threshold")

    def to_json(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "channels": list(CHANNELS),
            "channel_offset": [float(v) for v in self.channel_offset],
            "channel_scale": [float(v) for v in self.channel_scale],
            "raw_threshold": float(self.raw_threshold),
            "nominal_part_scores": [float(v) for v in self.nominal_part_scores],
            "backdrop_rgb": [float(v) for v in self.backdrop_rgb],
            "enrollment_poses": [np.asarray(T, dtype=np.float64).tolist() for T in self.enrollment_poses],
            "enrollment_frames": list(self.enrollment_frames),
            "geometry_depth_scale_m": float(self.geometry_depth_scale_m),
            "map_sigma_px": float(self.map_sigma_px),
            "folds": int(self.folds),
            "notes": self.notes,
            "surface_raw_threshold": None if self.surface_raw_threshold is None else float(self.surface_raw_threshold),
            "surface_nominal_part_scores": [float(v) for v in self.surface_nominal_part_scores],
            "surface_channels": list(SURFACE_CHANNELS),
            "surface_channel_scale": [float(v) for v in self.surface_channel_scale],
            "teach_in_part_scores": [float(v) for v in self.teach_in_part_scores],
            "surface_teach_in_part_scores": [float(v) for v in self.surface_teach_in_part_scores],
            "reference_channel_scale": None if self.reference_channel_scale is None else [float(v) for v in self.reference_channel_scale],
            "part_score_min_voxels": int(self.part_score_min_voxels),
            "surface_fused_geometry_scale": None if self.surface_fused_geometry_scale is None else float(self.surface_fused_geometry_scale),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], path: Path) -> "Calibration":
        if data.get("format_version") != FORMAT_VERSION:
            raise RecipeError(path, f"format_version is {data.get('format_version')!r}, this agent reads {FORMAT_VERSION}")
        if data.get("channels") != list(CHANNELS):
            raise RecipeError(path, f"channels must be {list(CHANNELS)}, got {data.get('channels')!r}")
        # Recipes enrolled before the missing channel have three surface channels and no "surface_channels" key.
        surface_channels = data.get("surface_channels", ["extra", "inside", "colour"])
        if surface_channels != list(SURFACE_CHANNELS):
            raise RecipeError(path, f"enrolled with surface channels {surface_channels!r}; this agent scores {list(SURFACE_CHANNELS)}: enrol the recipe again")
        keys = ("channel_offset", "channel_scale", "raw_threshold", "nominal_part_scores", "backdrop_rgb",
                "enrollment_poses", "enrollment_frames", "geometry_depth_scale_m", "map_sigma_px", "folds")  # fmt: skip
        missing = [k for k in keys if k not in data]
        if missing:
            raise RecipeError(path, f"missing keys {missing}")
        try:
            calibration = cls(
                channel_offset=[float(v) for v in data["channel_offset"]],
                channel_scale=[float(v) for v in data["channel_scale"]],
                raw_threshold=float(data["raw_threshold"]),
                nominal_part_scores=[float(v) for v in data["nominal_part_scores"]],
                backdrop_rgb=[float(v) for v in data["backdrop_rgb"]],
                enrollment_poses=[np.asarray(T, dtype=np.float64) for T in data["enrollment_poses"]],
                enrollment_frames=[str(v) for v in data["enrollment_frames"]],
                geometry_depth_scale_m=float(data["geometry_depth_scale_m"]),
                map_sigma_px=float(data["map_sigma_px"]),
                folds=int(data["folds"]),
                notes=dict(data.get("notes", {})),
                surface_raw_threshold=None if data.get("surface_raw_threshold") is None else float(data["surface_raw_threshold"]),
                surface_nominal_part_scores=[float(v) for v in data.get("surface_nominal_part_scores", [])],
                surface_channel_scale=[float(v) for v in data.get("surface_channel_scale", [1.0] * len(SURFACE_CHANNELS))],
                teach_in_part_scores=[float(v) for v in data.get("teach_in_part_scores", [])],
                surface_teach_in_part_scores=[float(v) for v in data.get("surface_teach_in_part_scores", [])],
                reference_channel_scale=None if data.get("reference_channel_scale") is None else [float(v) for v in data["reference_channel_scale"]],
                part_score_min_voxels=int(data.get("part_score_min_voxels", 1)),
                surface_fused_geometry_scale=None if data.get("surface_fused_geometry_scale") is None else float(data["surface_fused_geometry_scale"]),
            )
            calibration.validate()
        except (TypeError, ValueError) as e:
            raise RecipeError(path, f"malformed calibration: {e}") from None
        return calibration


@dataclass
class Recipe:
    """An enrolled recipe in memory. ``version`` is set by :func:`save_recipe` / :func:`load_recipe`."""

    settings: RecipeSettings
    model: GaussianModel
    bank: MemoryBank
    calibration: Calibration
    surface: NominalSurface | None = None
    references: ReferenceViews | None = None  # the teach-in parts' views (agent.reference_views)
    version: str = ""
    root: Path | None = None

    @property
    def name(self) -> str:
        return self.settings.name


# ---------------------------------------------------------------------------------------------
# Files


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _manifest_bytes(hashes: dict[str, str]) -> bytes:
    return (json.dumps({"format_version": FORMAT_VERSION, "files": dict(sorted(hashes.items()))}, indent=2) + "\n").encode()


def version_of_manifest(manifest_bytes: bytes) -> str:
    return "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()


def save_recipe(recipe: Recipe, recipes_dir: str | os.PathLike, overwrite: bool = True) -> Path:
    """Write ``recipe`` to ``recipes_dir/<name>/`` (built in a temporary folder, then moved into place).

    Sets ``recipe.version`` and ``recipe.root``; returns the folder.
    """
    from agent.splat.ply import save_ply

    recipe.settings.validate()
    recipe.calibration.validate()
    recipes_dir = Path(recipes_dir)
    recipes_dir.mkdir(parents=True, exist_ok=True)
    final = recipes_dir / recipe.name
    if final.exists() and not overwrite:
        raise FileExistsError(f"{final}: recipe exists (pass overwrite)")
    tmp = Path(tempfile.mkdtemp(prefix=f".{recipe.name}.", dir=recipes_dir))
    try:
        (tmp / RECIPE_FILE).write_bytes(tomli_w.dumps(recipe.settings.to_toml()).encode())
        save_ply(recipe.model, tmp / MODEL_FILE)
        recipe.bank.save(tmp / BANK_FILE)
        (tmp / CALIBRATION_FILE).write_text(json.dumps(recipe.calibration.to_json(), indent=1) + "\n", encoding="utf-8")
        names = list(ARTEFACTS)
        if recipe.surface is not None:
            recipe.surface.save(tmp / SURFACE_FILE)
            names.append(SURFACE_FILE)
        if recipe.references is not None:
            recipe.references.save(tmp / REFERENCE_VIEWS_FILE)
            names.append(REFERENCE_VIEWS_FILE)
        manifest = _manifest_bytes({name: sha256_file(tmp / name) for name in names})
        (tmp / MANIFEST_FILE).write_bytes(manifest)
        if final.exists():
            old = final.with_name(f".{recipe.name}.old.{os.getpid()}")
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    recipe.version = version_of_manifest(manifest)
    recipe.root = final
    return final


def verify_recipe_files(root: str | os.PathLike) -> str:
    """Check the manifest and every artefact's sha256; return the recipe version or raise RecipeError."""
    root = Path(root)
    if not root.is_dir():
        raise RecipeError(root, "recipe folder not found")
    manifest_path = root / MANIFEST_FILE
    if not manifest_path.is_file():
        raise RecipeError(manifest_path, "manifest not found (not an enrolled recipe?)")
    raw = manifest_path.read_bytes()
    try:
        manifest = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RecipeError(manifest_path, f"malformed JSON: {e}") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
        raise RecipeError(manifest_path, 'expected {"files": {name: sha256}}')
    if manifest.get("format_version") != FORMAT_VERSION:
        raise RecipeError(manifest_path, f"format_version is {manifest.get('format_version')!r}, this agent reads {FORMAT_VERSION}")
    missing = [name for name in ARTEFACTS if name not in files]
    unknown = [name for name in files if name not in ARTEFACTS + OPTIONAL_ARTEFACTS]
    if missing or unknown:
        raise RecipeError(manifest_path, f"must list {list(ARTEFACTS)} (and optionally {list(OPTIONAL_ARTEFACTS)}); missing {missing}, unexpected {unknown}")
    for name in files:
        path = root / name
        if not path.is_file():
            raise RecipeError(path, "file listed in the manifest is missing")
        if sha256_file(path) != files[name]:
            raise RecipeError(path, "sha256 does not match the manifest (file modified or corrupt)")
    return version_of_manifest(raw)


def load_recipe(root: str | os.PathLike) -> Recipe:
    """Load and verify a recipe folder; RecipeError names the file and the problem."""
    from agent.splat.ply import load_ply

    root = Path(root)
    version = verify_recipe_files(root)
    path = root / RECIPE_FILE
    try:
        settings_data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise RecipeError(path, f"malformed TOML: {e}") from None
    settings = RecipeSettings.from_toml(settings_data, path)
    if settings.name != root.name:
        raise RecipeError(path, f"name is {settings.name!r} but the folder is {root.name!r}")
    path = root / CALIBRATION_FILE
    try:
        calibration_data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RecipeError(path, f"malformed JSON: {e}") from None
    if not isinstance(calibration_data, dict):
        raise RecipeError(path, "top level must be a JSON object")
    calibration = Calibration.from_json(calibration_data, path)
    if calibration.part_score_min_voxels != settings.min_defect_voxels:
        raise RecipeError(path, f"the threshold was calibrated on part scores over regions of {calibration.part_score_min_voxels} voxel(s); "
                                f"{RECIPE_FILE} asks for min_defect_voxels = {settings.min_defect_voxels}: enrol the recipe again")
    try:
        model = load_ply(root / MODEL_FILE)
    except ValueError as e:
        raise RecipeError(root / MODEL_FILE, str(e).removeprefix(f"{root / MODEL_FILE}: ")) from None
    if len(model) == 0:
        raise RecipeError(root / MODEL_FILE, "the Gaussian model is empty")
    try:
        bank = MemoryBank.load(root / BANK_FILE)
    except (ValueError, FileNotFoundError) as e:
        raise RecipeError(root / BANK_FILE, str(e).removeprefix(f"{root / BANK_FILE}: ")) from None
    if bank.metadata.get("backbone") not in (None, settings.backbone):
        raise RecipeError(root / BANK_FILE, f"bank was built with {bank.metadata.get('backbone')!r}, recipe.toml says {settings.backbone!r}")
    listed = json.loads((root / MANIFEST_FILE).read_bytes())["files"]
    surface = _optional_artefact(root, SURFACE_FILE, listed, NominalSurface.load)
    if (surface is None) != (calibration.surface_raw_threshold is None):
        raise RecipeError(root / CALIBRATION_FILE, "surface_raw_threshold must be set exactly when the recipe has surface.npz")
    references = _optional_artefact(root, REFERENCE_VIEWS_FILE, listed, ReferenceViews.load)
    if (references is None) != (calibration.reference_channel_scale is None):
        raise RecipeError(root / CALIBRATION_FILE, f"reference_channel_scale must be set exactly when the recipe has {REFERENCE_VIEWS_FILE}")
    if references is not None and surface is None:
        raise RecipeError(root / REFERENCE_VIEWS_FILE, "reference views need the nominal surface (surface.npz)")
    if references is not None and (references.intrinsics.width, references.intrinsics.height) != (settings.camera.width, settings.camera.height):
        raise RecipeError(root / REFERENCE_VIEWS_FILE, f"views are {references.intrinsics.width}x{references.intrinsics.height}, the recipe camera {settings.camera.width}x{settings.camera.height}")
    return Recipe(settings, model, bank, calibration, surface, references, version, root)


def _optional_artefact(root: Path, name: str, listed: dict[str, str], load: Callable[[Path], Any]) -> Any:
    """An optional artefact (None when the manifest does not list it); RecipeError for a file the manifest does not
    list (added after enrollment) or one that does not load."""
    if (root / name).exists() and name not in listed:
        raise RecipeError(root / name, "file is not listed in the manifest (added after enrollment?)")
    if name not in listed:
        return None
    try:
        return load(root / name)
    except (ValueError, OSError) as e:
        raise RecipeError(root / name, str(e)) from None


@dataclass(frozen=True)
class RecipeInfo:
    """One line of ``agent recipes list``."""

    name: str
    path: Path
    version: str | None
    error: str | None
    settings: RecipeSettings | None


def list_recipes(recipes_dir: str | os.PathLike) -> list[RecipeInfo]:
    """Every recipe folder under ``recipes_dir`` with its verified version, or the error that makes it unusable."""
    recipes_dir = Path(recipes_dir)
    if not recipes_dir.is_dir():
        return []
    out = []
    for p in sorted(recipes_dir.iterdir()):
        if not p.is_dir() or p.name.startswith(".") or not _NAME.match(p.name):
            continue
        try:
            version = verify_recipe_files(p)
            settings = RecipeSettings.from_toml(tomllib.loads((p / RECIPE_FILE).read_text(encoding="utf-8")), p / RECIPE_FILE)
            out.append(RecipeInfo(p.name, p, version, None, settings))
        except (RecipeError, tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            out.append(RecipeInfo(p.name, p, None, str(e), None))
    return out


def inspector_factory(recipes_dir: str | os.PathLike) -> Callable[[str], Any]:
    """The service's recipe-name -> Inspector factory (KeyError for a recipe that is not enrolled)."""
    recipes_dir = Path(recipes_dir)

    def factory(name: str):
        from agent.pipeline import RecipeInspector

        try:
            check_recipe_name(name)
        except ValueError:
            raise KeyError(name) from None
        root = recipes_dir / name
        if not (root / MANIFEST_FILE).is_file():
            raise KeyError(name)
        return RecipeInspector(load_recipe(root))

    return factory
