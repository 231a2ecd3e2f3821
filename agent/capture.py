"""Posed multi-view captures in memory and on disk (../shared/spec/capture-format.md).

The dataclasses are the in-memory form every module uses (simulator output, enrollment input,
inspection input). Loading and saving follow the spec's `transforms.json` layout exactly.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from agent.geometry import Intrinsics, check_rigid
from agent.errors import FileProblemError

DEFECT_TYPES = ("stain", "scratch", "burr", "dent", "missing")


@dataclass
class Frame:
    """One view of a part."""

    name: str  # frame id, e.g. "000"; file stem on disk
    image: np.ndarray  # H x W x 3 uint8 RGB
    intrinsics: Intrinsics
    c2w: np.ndarray | None = None  # 4x4 float64, OpenGL convention; None where poses are estimated
    depth: np.ndarray | None = None  # H x W float32 metres, 0 = no measurement
    mask: np.ndarray | None = None  # H x W bool, True = defect pixel visible (evaluation only)


@dataclass
class DefectGT:
    """One ground-truth defect blob (gt/label.json)."""

    id: int
    type: str
    center: np.ndarray  # world frame, metres
    radius_m: float


@dataclass
class GroundTruth:
    """Evaluation-only ground truth of a capture (the gt/ folder)."""

    label: str  # "good" or a defect type
    defects: list[DefectGT] = field(default_factory=list)
    surface_points: np.ndarray | None = None  # N x 3 float32, world frame
    defect_ids: np.ndarray | None = None  # N int32, 0 = nominal, k = defect blob k
    T_world_part: np.ndarray | None = None  # 4x4 true placement of the part


@dataclass
class Capture:
    """One part seen from several views."""

    frames: list[Frame]
    gt: GroundTruth | None = None
    root: Path | None = None  # where it was loaded from, if anywhere


TRANSFORMS_FILE = "transforms.json"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
INTRINSIC_KEYS = ("fl_x", "fl_y", "cx", "cy", "w", "h")
DISTORTION_KEYS = ("k1", "k2", "k3", "k4", "p1", "p2")
# OPENCV (nerfstudio's default export) is accepted when all distortion coefficients are zero.
CAMERA_MODELS = ("PINHOLE", "OPENCV")
MASK_THRESHOLD = 127  # capture masks: > 127 = defect pixel
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


class CaptureError(FileProblemError):
    """A capture or dataset file that cannot be used. ``str()`` is ``"<path>: <problem>"``."""


# ---------------------------------------------------------------------------------------------
# Single files


def read_json(path: str | os.PathLike) -> dict[str, Any]:
    """A JSON file whose top level is an object."""
    path = Path(path)
    if not path.is_file():
        raise CaptureError(path, "file not found")
    try:
        with path.open("r", encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise CaptureError(path, f"malformed JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CaptureError(path, f"cannot read file: {e}") from None
    if not isinstance(data, dict):
        raise CaptureError(path, f"top level must be a JSON object, got {type(data).__name__}")
    return data


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Write JSON atomically (a temporary file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")  # normal permissions
    try:
        with tmp.open("w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """H x W x 4 uint8 RGBA -> H x W x 3 uint8 RGB over a white background (exact where alpha = 255)."""
    rgb = rgba[..., :3].astype(np.uint32)
    a = rgba[..., 3:4].astype(np.uint32)
    return ((rgb * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)


def _read_raw_8bit(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise CaptureError(path, f"{what} file not found")
    raw = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if raw is None:
        raise CaptureError(path, f"cannot read {what}: not a readable PNG/JPEG file")
    if raw.dtype != np.uint8:
        raise CaptureError(path, f"{what} must be 8-bit, got {raw.dtype}")
    return raw


def read_rgb(path: str | os.PathLike) -> np.ndarray:
    """An 8-bit PNG/JPEG as H x W x 3 uint8 RGB. Grey is expanded; RGBA is composited on white."""
    path = Path(path)
    raw = _read_raw_8bit(path, "image")
    if raw.ndim == 2:
        return cv2.cvtColor(raw, cv2.COLOR_GRAY2RGB)
    if raw.shape[2] == 3:
        return cv2.cvtColor(raw, cv2.COLOR_BGR2RGB)
    if raw.shape[2] == 4:
        return composite_on_white(cv2.cvtColor(raw, cv2.COLOR_BGRA2RGBA))
    raise CaptureError(path, f"image has {raw.shape[2]} channels, expected 1, 3 or 4")


def read_mask(path: str | os.PathLike, threshold: int = MASK_THRESHOLD) -> np.ndarray:
    """An 8-bit mask PNG as H x W bool (value > ``threshold``; colour masks use the brightest channel)."""
    path = Path(path)
    raw = _read_raw_8bit(path, "mask")
    if raw.ndim == 3:
        raw = raw[..., :3].max(axis=2)  # an alpha channel, if any, is not part of the mask
    return raw > threshold


def write_rgb(path: str | os.PathLike, image: np.ndarray, *, jpeg_quality: int = 95) -> None:
    """Write H x W x 3 uint8 RGB as PNG (lossless) or JPEG, chosen by the suffix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if path.suffix.lower() in (".jpg", ".jpeg") else []
    if not cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR), params):
        raise CaptureError(path, "cannot write image")


def write_mask(path: str | os.PathLike, mask: np.ndarray) -> None:
    """Write an H x W bool mask as a uint8 PNG, 255 = True."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), np.where(np.asarray(mask, dtype=bool), 255, 0).astype(np.uint8)):
        raise CaptureError(path, "cannot write mask")


def _load_npy(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise CaptureError(path, f"{what} file not found")
    try:
        arr = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise CaptureError(path, f"cannot read {what} as a .npy array: {e}") from None
    if not isinstance(arr, np.ndarray):
        raise CaptureError(path, f"{what} must be a single .npy array, not an .npz archive")
    return arr


def load_depth(path: str | os.PathLike, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A depth .npy as H x W float32 metres (0 = no measurement), checked against ``shape`` (H, W)."""
    path = Path(path)
    depth = _load_npy(path, "depth")
    if depth.dtype.kind != "f":
        raise CaptureError(path, f"depth must be a float array (metres), got dtype {depth.dtype}")
    if depth.ndim != 2:
        raise CaptureError(path, f"depth must be a 2-D H x W array, got shape {depth.shape}")
    if shape is not None and depth.shape != tuple(shape):
        raise CaptureError(path, f"depth is {depth.shape[1]}x{depth.shape[0]} but the image is {shape[1]}x{shape[0]}")
    if not np.all(np.isfinite(depth)):
        raise CaptureError(path, "depth contains NaN or infinite values (use 0 for no measurement)")
    if np.any(depth < 0):
        raise CaptureError(path, "depth contains negative values (use 0 for no measurement)")
    return depth.astype(np.float32, copy=False)


# ---------------------------------------------------------------------------------------------
# Loading


def _number(value: Any, tf_path: Path, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CaptureError(tf_path, f"{where} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise CaptureError(tf_path, f"{where} must be finite, got {value!r}")
    return float(value)


def _frame_value(frame: dict, meta: dict, key: str) -> Any:
    """Per-frame values win over the top-level ones."""
    return frame[key] if key in frame else meta.get(key)


def _frame_intrinsics(frame: dict, meta: dict, tf_path: Path, where: str) -> Intrinsics:
    model = _frame_value(frame, meta, "camera_model")
    model = "PINHOLE" if model is None else model
    if model not in CAMERA_MODELS:
        raise CaptureError(
            tf_path, f'{where}: unknown camera_model {model!r}; supported: "PINHOLE" (or "OPENCV" without distortion)'
        )
    for key in DISTORTION_KEYS:
        value = _frame_value(frame, meta, key)
        if value is not None and _number(value, tf_path, f"{where}.{key}") != 0.0:
            raise CaptureError(tf_path, f"{where}: lens distortion {key}={value} is not supported; undistort the images first")
    values = {}
    for key in INTRINSIC_KEYS:
        value = _frame_value(frame, meta, key)
        if value is None:
            raise CaptureError(tf_path, f'{where}: missing intrinsics key "{key}" (neither in the frame nor at the top level)')
        values[key] = _number(value, tf_path, f"{where}.{key}")
    for key in ("w", "h"):
        if values[key] != int(values[key]):
            raise CaptureError(tf_path, f"{where}.{key} must be a whole number of pixels, got {values[key]}")
    intr = Intrinsics(values["fl_x"], values["fl_y"], values["cx"], values["cy"], int(values["w"]), int(values["h"]))
    try:
        intr.validate()
    except ValueError as e:
        raise CaptureError(tf_path, f"{where}: bad intrinsics: {e}") from None
    return intr


def parse_transform(value: Any, tf_path: Path, where: str) -> np.ndarray:
    """A JSON 4x4 rigid transform as float64, or a CaptureError naming ``where``."""
    try:
        T = np.asarray(value, dtype=np.float64)
    except (ValueError, TypeError):
        raise CaptureError(tf_path, f"{where} must be a 4x4 array of numbers") from None
    try:
        return check_rigid(T, what=where)
    except ValueError as e:
        raise CaptureError(tf_path, str(e)) from None


def _relative_file(frame: dict, key: str, tf_path: Path, where: str) -> Path | None:
    value = frame.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise CaptureError(tf_path, f"{where}.{key} must be a non-empty string, got {value!r}")
    return tf_path.parent / value


def _load_frame(root: Path, meta: dict, frame: dict, index: int, require_poses: bool) -> Frame:
    tf_path = root / TRANSFORMS_FILE
    where = f"frames[{index}]"
    image_path = _relative_file(frame, "file_path", tf_path, where)
    if image_path is None:
        raise CaptureError(tf_path, f"{where}: missing file_path")
    where = f"{where} ({frame['file_path']})"
    intr = _frame_intrinsics(frame, meta, tf_path, where)

    c2w = None
    if frame.get("transform_matrix") is not None:
        c2w = parse_transform(frame["transform_matrix"], tf_path, f"{where}.transform_matrix")
    elif require_poses:
        raise CaptureError(tf_path, f"{where}: missing transform_matrix (camera poses are required here)")

    if not image_path.is_file():
        raise CaptureError(image_path, f"image file not found (file_path of {where} in {TRANSFORMS_FILE})")
    image = read_rgb(image_path)
    if image.shape[:2] != (intr.height, intr.width):
        raise CaptureError(
            image_path, f"image is {image.shape[1]}x{image.shape[0]} but {TRANSFORMS_FILE} says w={intr.width}, h={intr.height}"
        )
    shape = (intr.height, intr.width)

    depth = None
    depth_path = _relative_file(frame, "depth_file_path", tf_path, where)
    if depth_path is not None:
        depth = load_depth(depth_path, shape)

    mask = None
    mask_path = _relative_file(frame, "mask_path", tf_path, where)
    if mask_path is not None:
        mask = read_mask(mask_path)
        if mask.shape != shape:
            raise CaptureError(mask_path, f"mask is {mask.shape[1]}x{mask.shape[0]} but the image is {intr.width}x{intr.height}")

    return Frame(name=image_path.stem, image=image, intrinsics=intr, c2w=c2w, depth=depth, mask=mask)


def _load_gt(gt_dir: Path) -> GroundTruth:
    label_path = gt_dir / "label.json"
    meta = read_json(label_path)
    label = meta.get("label")
    if label != "good" and label not in DEFECT_TYPES:
        raise CaptureError(label_path, f'"label" must be "good" or one of {list(DEFECT_TYPES)}, got {label!r}')
    defects_meta = meta.get("defects", [])
    if not isinstance(defects_meta, list):
        raise CaptureError(label_path, '"defects" must be a list')
    if label == "good" and defects_meta:
        raise CaptureError(label_path, 'label "good" but "defects" is not empty')
    defects: list[DefectGT] = []
    for i, d in enumerate(defects_meta):
        where = f"defects[{i}]"
        if not isinstance(d, dict):
            raise CaptureError(label_path, f"{where} must be an object")
        for key in ("id", "type", "center", "radius_m"):
            if key not in d:
                raise CaptureError(label_path, f'{where}: missing "{key}"')
        if isinstance(d["id"], bool) or not isinstance(d["id"], int) or d["id"] < 1:
            raise CaptureError(label_path, f"{where}.id must be an integer >= 1, got {d['id']!r}")
        if d["id"] in {x.id for x in defects}:
            raise CaptureError(label_path, f"{where}.id {d['id']} is used twice")
        if d["type"] not in DEFECT_TYPES:
            raise CaptureError(label_path, f"{where}.type must be one of {list(DEFECT_TYPES)}, got {d['type']!r}")
        center = d["center"]
        if not isinstance(center, list) or len(center) != 3:
            raise CaptureError(label_path, f"{where}.center must be [x, y, z], got {center!r}")
        center = np.array([_number(c, label_path, f"{where}.center") for c in center])
        radius = _number(d["radius_m"], label_path, f"{where}.radius_m")
        if radius <= 0:
            raise CaptureError(label_path, f"{where}.radius_m must be positive, got {radius}")
        defects.append(DefectGT(id=d["id"], type=d["type"], center=center, radius_m=radius))

    points = None
    points_path = gt_dir / "surface_points.npy"
    if points_path.exists():
        points = _load_npy(points_path, "surface points")
        if points.dtype != np.float32:
            raise CaptureError(points_path, f"surface points must be float32, got {points.dtype}")
        if points.ndim != 2 or points.shape[1] != 3:
            raise CaptureError(points_path, f"surface points must be N x 3, got shape {points.shape}")
        if not np.all(np.isfinite(points)):
            raise CaptureError(points_path, "surface points contain NaN or infinite values")

    ids = None
    ids_path = gt_dir / "defect_ids.npy"
    if ids_path.exists():
        ids = _load_npy(ids_path, "defect ids")
        if ids.dtype != np.int32:
            raise CaptureError(ids_path, f"defect ids must be int32, got {ids.dtype}")
        if ids.ndim != 1:
            raise CaptureError(ids_path, f"defect ids must be a 1-D array of length N, got shape {ids.shape}")
        if points is None:
            raise CaptureError(ids_path, "defect ids given without gt/surface_points.npy")
        if len(ids) != len(points):
            raise CaptureError(ids_path, f"{len(ids)} defect ids for {len(points)} surface points (lengths must match)")
        unknown = sorted(set(np.unique(ids).tolist()) - {0} - {d.id for d in defects})
        if unknown:
            raise CaptureError(ids_path, f"defect ids {unknown[:10]} are not defects listed in gt/label.json (0 = nominal)")

    T_world_part = None
    pose_path = gt_dir / "pose.json"
    if pose_path.exists():
        pose = read_json(pose_path)
        if "T_world_part" not in pose:
            raise CaptureError(pose_path, 'missing "T_world_part"')
        T_world_part = parse_transform(pose["T_world_part"], pose_path, "T_world_part")

    return GroundTruth(label=label, defects=defects, surface_points=points, defect_ids=ids, T_world_part=T_world_part)


def load_capture(path: str | os.PathLike, *, require_poses: bool = True) -> Capture:
    """Read a capture folder (transforms.json, images, optional depth, masks and gt/).

    Every problem raises a :class:`CaptureError` naming the file. With ``require_poses=False``
    frames without ``transform_matrix`` load with ``c2w=None``.
    """
    root = Path(path)
    tf_path = root / TRANSFORMS_FILE
    if not root.is_dir():
        raise CaptureError(root, "capture folder not found")
    meta = read_json(tf_path)
    frames_meta = meta.get("frames")
    if not isinstance(frames_meta, list) or not frames_meta:
        raise CaptureError(tf_path, '"frames" must be a non-empty list')
    frames: list[Frame] = []
    first_index: dict[str, int] = {}
    for i, frame_meta in enumerate(frames_meta):
        if not isinstance(frame_meta, dict):
            raise CaptureError(tf_path, f"frames[{i}] must be an object")
        frame = _load_frame(root, meta, frame_meta, i, require_poses)
        if frame.name in first_index:
            raise CaptureError(
                tf_path, f'frames[{first_index[frame.name]}] and frames[{i}] have the same frame name "{frame.name}" (file stem)'
            )
        first_index[frame.name] = i
        frames.append(frame)
    gt = _load_gt(root / "gt") if (root / "gt").is_dir() else None
    return Capture(frames=frames, gt=gt, root=root)


def validate_capture(path: str | os.PathLike, *, require_poses: bool = True) -> Capture:
    """Load a capture fully, raising a :class:`CaptureError` on the first problem found."""
    return load_capture(path, require_poses=require_poses)


# ---------------------------------------------------------------------------------------------
# Saving


def _intrinsics_json(intr: Intrinsics) -> dict[str, Any]:
    return {
        "fl_x": float(intr.fx),
        "fl_y": float(intr.fy),
        "cx": float(intr.cx),
        "cy": float(intr.cy),
        "w": int(intr.width),
        "h": int(intr.height),
    }


def check_frame(frame: Frame, path: Path) -> None:
    """Raise a CaptureError (naming ``path``, where the frame is written) if the frame cannot be saved."""
    if not isinstance(frame.name, str) or not _SAFE_NAME.match(frame.name):
        raise CaptureError(path, f"frame name {frame.name!r} is not a safe file stem (letters, digits, . _ -)")
    intr = frame.intrinsics
    try:
        intr.validate()
    except ValueError as e:
        raise CaptureError(path, f"frame {frame.name}: bad intrinsics: {e}") from None
    img = np.asarray(frame.image)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise CaptureError(path, f"frame {frame.name}: image must be H x W x 3 uint8, got {img.dtype} {img.shape}")
    shape = (int(intr.height), int(intr.width))
    if img.shape[:2] != shape:
        raise CaptureError(
            path, f"frame {frame.name}: image is {img.shape[1]}x{img.shape[0]} but intrinsics say {shape[1]}x{shape[0]}"
        )
    if frame.c2w is not None:
        try:
            check_rigid(frame.c2w, what=f"frame {frame.name} c2w")
        except ValueError as e:
            raise CaptureError(path, str(e)) from None
    if frame.depth is not None:
        d = np.asarray(frame.depth)
        if d.dtype.kind != "f" or d.shape != shape:
            raise CaptureError(
                path, f"frame {frame.name}: depth must be a float {shape[0]} x {shape[1]} array, got {d.dtype} {d.shape}"
            )
        if not np.all(np.isfinite(d)) or np.any(d < 0):
            raise CaptureError(path, f"frame {frame.name}: depth must be finite and >= 0 (0 = no measurement)")
    if frame.mask is not None and np.asarray(frame.mask).shape != shape:
        raise CaptureError(path, f"frame {frame.name}: mask shape {np.asarray(frame.mask).shape} differs from the image {shape}")


def check_ground_truth(gt: GroundTruth, gt_dir: Path) -> None:
    """Raise a CaptureError (naming the gt/ file concerned) if ``gt`` breaks the spec's rules."""
    label_path = gt_dir / "label.json"
    if gt.label != "good" and gt.label not in DEFECT_TYPES:
        raise CaptureError(label_path, f'label must be "good" or one of {list(DEFECT_TYPES)}, got {gt.label!r}')
    if gt.label == "good" and gt.defects:
        raise CaptureError(label_path, 'label "good" but defects are listed')
    ids = [int(d.id) for d in gt.defects]
    if len(set(ids)) != len(ids) or any(i < 1 for i in ids):
        raise CaptureError(label_path, f"defect ids must be unique integers >= 1, got {ids}")
    for d in gt.defects:
        if d.type not in DEFECT_TYPES:
            raise CaptureError(label_path, f"defect {d.id}: type must be one of {list(DEFECT_TYPES)}, got {d.type!r}")
        if np.asarray(d.center).shape != (3,) or not np.all(np.isfinite(d.center)):
            raise CaptureError(label_path, f"defect {d.id}: center must be 3 finite numbers")
        if not (math.isfinite(d.radius_m) and d.radius_m > 0):
            raise CaptureError(label_path, f"defect {d.id}: radius_m must be positive, got {d.radius_m}")
    points = None if gt.surface_points is None else np.asarray(gt.surface_points)
    if points is not None and (points.ndim != 2 or points.shape[1] != 3 or not np.all(np.isfinite(points))):
        raise CaptureError(gt_dir / "surface_points.npy", f"surface points must be finite N x 3, got shape {points.shape}")
    if gt.defect_ids is not None:
        ids_path = gt_dir / "defect_ids.npy"
        defect_ids = np.asarray(gt.defect_ids)
        if points is None or defect_ids.shape != (len(points),):
            n = "no" if points is None else len(points)
            raise CaptureError(ids_path, f"defect ids of shape {defect_ids.shape} for {n} surface points (lengths must match)")
        unknown = sorted(set(np.unique(defect_ids).tolist()) - {0} - set(ids))
        if unknown:
            raise CaptureError(ids_path, f"defect ids {unknown[:10]} are not listed defects (0 = nominal)")
    if gt.T_world_part is not None:
        try:
            check_rigid(gt.T_world_part, what="T_world_part")
        except ValueError as e:
            raise CaptureError(gt_dir / "pose.json", str(e)) from None


def _save_gt(gt: GroundTruth, gt_dir: Path) -> None:
    gt_dir.mkdir(parents=True, exist_ok=True)
    write_json(
        gt_dir / "label.json",
        {
            "label": gt.label,
            "defects": [
                {"id": int(d.id), "type": d.type, "center": [float(c) for c in d.center], "radius_m": float(d.radius_m)}
                for d in gt.defects
            ],
        },
    )
    if gt.surface_points is not None:
        np.save(gt_dir / "surface_points.npy", np.asarray(gt.surface_points, dtype=np.float32))
    if gt.defect_ids is not None:
        np.save(gt_dir / "defect_ids.npy", np.asarray(gt.defect_ids, dtype=np.int32))
    if gt.T_world_part is not None:
        write_json(gt_dir / "pose.json", {"T_world_part": np.asarray(gt.T_world_part, dtype=np.float64).tolist()})


def save_capture(capture: Capture, path: str | os.PathLike, *, image_format: str = "png") -> None:
    """Write ``capture`` in the spec layout: images/<name>.png|jpg, depth/<name>.npy, masks/<name>.png, gt/.

    Intrinsics shared by all frames go at the top level of transforms.json, differing ones per frame.
    Everything is checked before anything is written; transforms.json is written last (atomically).
    PNG round-trips exactly through :func:`load_capture`.
    """
    fmt = image_format.lower()
    if fmt not in ("png", "jpg", "jpeg"):
        raise ValueError(f'image_format must be "png" or "jpg", got {image_format!r}')
    ext = "png" if fmt == "png" else "jpg"
    root = Path(path)
    tf_path = root / TRANSFORMS_FILE
    if not capture.frames:
        raise CaptureError(tf_path, "capture has no frames")
    names: set[str] = set()
    for frame in capture.frames:
        check_frame(frame, tf_path)
        if frame.name in names:
            raise CaptureError(tf_path, f'two frames are named "{frame.name}"')
        names.add(frame.name)
    if capture.gt is not None:
        check_ground_truth(capture.gt, root / "gt")

    shared = _intrinsics_json(capture.frames[0].intrinsics)
    entries = []
    for frame in capture.frames:
        entry: dict[str, Any] = {"file_path": f"images/{frame.name}.{ext}"}
        write_rgb(root / entry["file_path"], np.asarray(frame.image))
        own = _intrinsics_json(frame.intrinsics)
        entry.update({k: v for k, v in own.items() if v != shared[k]})
        if frame.c2w is not None:
            entry["transform_matrix"] = np.asarray(frame.c2w, dtype=np.float64).tolist()
        if frame.depth is not None:
            entry["depth_file_path"] = f"depth/{frame.name}.npy"
            (root / "depth").mkdir(parents=True, exist_ok=True)
            np.save(root / entry["depth_file_path"], np.asarray(frame.depth, dtype=np.float32))
        if frame.mask is not None:
            entry["mask_path"] = f"masks/{frame.name}.png"
            write_mask(root / entry["mask_path"], frame.mask)
        entries.append(entry)
    if capture.gt is not None:
        _save_gt(capture.gt, root / "gt")
    write_json(tf_path, {"camera_model": "PINHOLE", **shared, "frames": entries})
