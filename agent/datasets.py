"""The two dataset layouts of ../shared/spec/capture-format.md.

- "cell": ``<root>/<object>/train/<capture_id>/`` and ``<root>/<object>/test/<good|defect type>/<capture_id>/``,
  each leaf a capture folder (:func:`agent.capture.load_capture`).
- "mad": the public MAD-Sim / MAD-Real layout (PAD benchmark): posed training views in a NeRF-synthetic
  ``transforms.json`` plus single test images of unknown pose, with ``ground_truth/<type>/<name>_mask.png``.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.capture import (
    DEFECT_TYPES,
    IMAGE_SUFFIXES,
    TRANSFORMS_FILE,
    Capture,
    CaptureError,
    Frame,
    check_frame,
    load_capture,
    parse_transform,
    read_json,
    read_mask,
    read_rgb,
    write_json,
    write_mask,
    write_rgb,
)
from agent.geometry import Intrinsics

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


def _subdirs(path: Path) -> list[Path]:
    """Visible sub-folders, sorted by name."""
    return sorted((p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _natural_key(stem: str) -> tuple[int, int, str]:
    """Sort "2" before "10" (MAD names are not zero-padded); other names alphabetically after."""
    return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)


def _check_name(value: str, what: str) -> None:
    if not isinstance(value, str) or not _SAFE_NAME.match(value):
        raise ValueError(f"{what} {value!r} is not a safe folder/file name (letters, digits, . _ -)")


# ---------------------------------------------------------------------------------------------
# "cell" protocol

CELL_SPLITS = ("train", "test")


@dataclass(frozen=True)
class CellItem:
    """One capture of a "cell" dataset."""

    object: str
    split: str  # "train" or "test"
    category: str  # "good" or a defect type; always "good" for train
    capture_id: str
    path: Path  # the capture folder

    def load(self, *, require_poses: bool = True) -> Capture:
        return load_capture(self.path, require_poses=require_poses)


def cell_capture_dir(root: str | os.PathLike, object: str, split: str, category: str, capture_id: str) -> Path:
    """Where a capture lives in a "cell" dataset (not created). Train captures must have category "good"."""
    _check_name(object, "object")
    _check_name(capture_id, "capture_id")
    if split == "train":
        if category != "good":
            raise ValueError(f'train captures are nominal: category must be "good", got {category!r}')
        return Path(root) / object / "train" / capture_id
    if split == "test":
        if category != "good" and category not in DEFECT_TYPES:
            raise ValueError(f'category must be "good" or one of {list(DEFECT_TYPES)}, got {category!r}')
        return Path(root) / object / "test" / category / capture_id
    raise ValueError(f"split must be one of {list(CELL_SPLITS)}, got {split!r}")


def cell_objects(root: str | os.PathLike) -> list[str]:
    """Object names of a "cell" dataset, sorted. Every visible sub-folder must hold train/ or test/."""
    root = Path(root)
    if not root.is_dir():
        raise CaptureError(root, "dataset folder not found")
    names = []
    for obj_dir in _subdirs(root):
        if not any((obj_dir / split).is_dir() for split in CELL_SPLITS):
            raise CaptureError(obj_dir, 'not an object folder of a "cell" dataset: it has neither train/ nor test/')
        names.append(obj_dir.name)
    return names


def _capture_dirs(parent: Path) -> list[Path]:
    dirs = _subdirs(parent)
    for d in dirs:
        if not (d / TRANSFORMS_FILE).is_file():
            raise CaptureError(d / TRANSFORMS_FILE, "not a capture folder: transforms.json not found")
    return dirs


def list_cell_dataset(root: str | os.PathLike) -> list[CellItem]:
    """Every capture of a "cell" dataset, sorted by (object, split, category, capture_id).

    Only the layout is checked here (each leaf holds a transforms.json); captures load lazily.
    """
    root = Path(root)
    items: list[CellItem] = []
    for obj in cell_objects(root):
        obj_dir = root / obj
        for sub in _subdirs(obj_dir):
            if sub.name not in CELL_SPLITS:
                raise CaptureError(sub, f"unexpected folder: an object folder holds only {' and '.join(CELL_SPLITS)}/")
        if (obj_dir / "train").is_dir():
            for cap in _capture_dirs(obj_dir / "train"):
                items.append(CellItem(obj, "train", "good", cap.name, cap))
        if (obj_dir / "test").is_dir():
            for cat_dir in _subdirs(obj_dir / "test"):
                if cat_dir.name != "good" and cat_dir.name not in DEFECT_TYPES:
                    raise CaptureError(
                        cat_dir, f'unknown test category "{cat_dir.name}": expected "good" or one of {list(DEFECT_TYPES)}'
                    )
                for cap in _capture_dirs(cat_dir):
                    items.append(CellItem(obj, "test", cat_dir.name, cap.name, cap))
    return sorted(items, key=lambda it: (it.object, it.split, it.category, it.capture_id))


# ---------------------------------------------------------------------------------------------
# "mad" protocol (MAD-Sim / MAD-Real)

MAD_SIM_CLASSES = (
    "01Gorilla", "02Unicorn", "03Mallard", "04Turtle", "05Whale", "06Bird", "07Owl", "08Sabertooth", "09Swan",
    "10Sheep", "11Pig", "12Zalika", "13Pheonix", "14Elephant", "15Parrot", "16Cat", "17Scorpion", "18Obesobeso",
    "19Bear", "20Puppy",
)  # fmt: skip
MAD_DEFECT_CATEGORIES = ("Burrs", "Missing", "Stains")
# Our defect types that have a MAD folder name (MAD has no scratch or dent category).
MAD_CATEGORY_OF_DEFECT_TYPE = {"burr": "Burrs", "missing": "Missing", "stain": "Stains"}
MAD_MASK_THRESHOLD = 0  # MAD masks are binary: > 0 = defect


@dataclass(frozen=True)
class MadTestItem:
    """One test image of a MAD object (pose unknown); pixels are read from disk on demand."""

    category: str  # "good" or the defect folder name, e.g. "Burrs", "Missing", "Stains"
    name: str  # file stem, e.g. "0"
    image_path: Path
    mask_path: Path | None  # None for good images

    @property
    def is_defective(self) -> bool:
        return self.category != "good"

    def load_image(self) -> np.ndarray:
        """H x W x 3 uint8 RGB (RGBA composited on white)."""
        return read_rgb(self.image_path)

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """(image H x W x 3 uint8, mask H x W bool); the mask of a good image is all False."""
        image = self.load_image()
        if self.mask_path is None:
            return image, np.zeros(image.shape[:2], dtype=bool)
        mask = read_mask(self.mask_path, MAD_MASK_THRESHOLD)
        if mask.shape != image.shape[:2]:
            raise CaptureError(
                self.mask_path, f"mask is {mask.shape[1]}x{mask.shape[0]} but the image {self.image_path.name} is "
                f"{image.shape[1]}x{image.shape[0]}"
            )
        return image, mask


@dataclass
class MadObject:
    """One MAD object (class): posed nominal training views and pose-free test images."""

    name: str  # folder name, e.g. "01Gorilla"
    root: Path
    camera_angle_x: float  # radians
    train: Capture  # frames named by file stem ("0", "1", ...), c2w in OpenGL convention
    test: list[MadTestItem]  # sorted by (category, natural name order)


@dataclass
class MadTestImage:
    """A test image to write with :func:`save_mad_object`."""

    category: str  # "good" or a defect folder name such as "Burrs"
    image: np.ndarray  # H x W x 3 uint8 RGB
    mask: np.ndarray | None = None  # H x W bool; required unless category is "good"
    name: str | None = None  # file stem; default: the next free integer of its category


def mad_objects(root: str | os.PathLike) -> list[str]:
    """Names of the MAD object folders under ``root`` (those holding a transforms.json), sorted."""
    root = Path(root)
    if not root.is_dir():
        raise CaptureError(root, "dataset folder not found")
    return [d.name for d in _subdirs(root) if (d / TRANSFORMS_FILE).is_file()]


def _resolve_mad_image(root: Path, file_path: str, tf_path: Path, where: str) -> Path:
    """MAD's file_path may or may not carry the image suffix ("train/good/0" or "./train/good/0.png")."""
    path = root / file_path
    if path.is_file():
        return path
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        for suffix in IMAGE_SUFFIXES:
            candidate = path.with_name(path.name + suffix)
            if candidate.is_file():
                return candidate
    tried = "/".join(IMAGE_SUFFIXES)
    raise CaptureError(path, f"image file not found ({where}.file_path in {tf_path.name}; also tried adding {tried})")


def _camera_angle_x(meta: dict, tf_path: Path) -> float:
    angle = meta.get("camera_angle_x")
    if angle is None:
        raise CaptureError(tf_path, 'missing "camera_angle_x"')
    if isinstance(angle, bool) or not isinstance(angle, (int, float)) or not (0.0 < angle < math.pi):
        raise CaptureError(tf_path, f'"camera_angle_x" must be a number of radians in (0, pi), got {angle!r}')
    return float(angle)


def _list_mad_test(root: Path) -> list[MadTestItem]:
    test_dir = root / "test"
    if not test_dir.is_dir():
        return []
    items = []
    for cat_dir in _subdirs(test_dir):
        files = [p for p in cat_dir.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        for image_path in sorted(files, key=lambda p: _natural_key(p.stem)):
            mask_path = None
            if cat_dir.name != "good":
                gt_dir = root / "ground_truth" / cat_dir.name
                candidates = [gt_dir / f"{image_path.stem}_mask.png", gt_dir / f"{image_path.stem}.png"]
                mask_path = next((c for c in candidates if c.is_file()), None)
                if mask_path is None:
                    raise CaptureError(candidates[0], f"mask file not found for test image test/{cat_dir.name}/{image_path.name}")
            items.append(MadTestItem(cat_dir.name, image_path.stem, image_path, mask_path))
    return items


def load_mad_object(path: str | os.PathLike) -> MadObject:
    """Read one MAD object folder: training views as a posed Capture (loaded now), test images (listed only).

    Intrinsics come from ``camera_angle_x``: f = 0.5 * W / tan(0.5 * camera_angle_x), square pixels,
    principal point at the image centre. RGBA images are composited on white.
    """
    root = Path(path)
    if not root.is_dir():
        raise CaptureError(root, "MAD object folder not found")
    tf_path = root / TRANSFORMS_FILE
    meta = read_json(tf_path)
    angle = _camera_angle_x(meta, tf_path)
    frames_meta = meta.get("frames")
    if not isinstance(frames_meta, list) or not frames_meta:
        raise CaptureError(tf_path, '"frames" must be a non-empty list')
    frames: list[Frame] = []
    seen: dict[str, int] = {}
    for i, fm in enumerate(frames_meta):
        where = f"frames[{i}]"
        if not isinstance(fm, dict):
            raise CaptureError(tf_path, f"{where} must be an object")
        file_path = fm.get("file_path")
        if not isinstance(file_path, str) or not file_path:
            raise CaptureError(tf_path, f"{where}: missing file_path")
        if fm.get("transform_matrix") is None:
            raise CaptureError(tf_path, f"{where} ({file_path}): missing transform_matrix")
        c2w = parse_transform(fm["transform_matrix"], tf_path, f"{where} ({file_path}).transform_matrix")
        image_path = _resolve_mad_image(root, file_path, tf_path, where)
        image = read_rgb(image_path)
        name = image_path.stem
        if name in seen:
            raise CaptureError(tf_path, f'frames[{seen[name]}] and {where} have the same frame name "{name}" (file stem)')
        seen[name] = i
        intr = Intrinsics.from_fov(angle, image.shape[1], image.shape[0])
        frames.append(Frame(name=name, image=image, intrinsics=intr, c2w=c2w))
    return MadObject(
        name=root.name,
        root=root,
        camera_angle_x=angle,
        train=Capture(frames=frames, gt=None, root=root),
        test=_list_mad_test(root),
    )


def _mad_camera_angle_x(train: Capture, tf_path: Path) -> float:
    """The one horizontal field of view shared by all training frames (the layout has no other intrinsics)."""
    angle = None
    for frame in train.frames:
        K = frame.intrinsics
        ok_centre = math.isclose(K.cx, K.width / 2, abs_tol=1e-6) and math.isclose(K.cy, K.height / 2, abs_tol=1e-6)
        if not (math.isclose(K.fx, K.fy, rel_tol=1e-9) and ok_centre):
            raise CaptureError(
                tf_path, f"frame {frame.name}: the MAD layout needs square pixels and the principal point at the image "
                f"centre, got fx={K.fx} fy={K.fy} cx={K.cx} cy={K.cy} for {K.width}x{K.height}"
            )
        a = 2.0 * math.atan(0.5 * K.width / K.fx)
        if angle is not None and not math.isclose(a, angle, rel_tol=1e-9):
            raise CaptureError(tf_path, f"frame {frame.name}: camera_angle_x {a} differs from the other frames' {angle}")
        angle = a
    assert angle is not None
    return angle


def save_mad_object(path: str | os.PathLike, train: Capture, test_items: Iterable[MadTestImage]) -> None:
    """Write one MAD object folder: train/good/<i>.png, test/<category>/<name>.png,
    ground_truth/<category>/<name>_mask.png (255 = defect) and transforms.json (written last).

    Training frames are renamed 0, 1, 2, ... in order; their depth and masks are not part of the layout.
    ``test_items`` may be a generator, so large test sets need not sit in memory.
    """
    root = Path(path)
    tf_path = root / TRANSFORMS_FILE
    if not train.frames:
        raise CaptureError(tf_path, "training capture has no frames")
    for frame in train.frames:
        check_frame(frame, tf_path)
        if frame.c2w is None:
            raise CaptureError(tf_path, f"frame {frame.name}: MAD training views need a pose (c2w is None)")
    angle = _mad_camera_angle_x(train, tf_path)

    entries = []
    for i, frame in enumerate(train.frames):
        file_path = f"train/good/{i}.png"
        write_rgb(root / file_path, np.asarray(frame.image))
        entries.append({"file_path": file_path, "transform_matrix": np.asarray(frame.c2w, dtype=np.float64).tolist()})

    used: dict[str, set[str]] = {}
    for item in test_items:
        _check_name(item.category, "test category")
        names = used.setdefault(item.category, set())
        name = item.name
        if name is None:
            name = str(len(names))
            while name in names:
                name = str(int(name) + 1)
        _check_name(name, "test image name")
        image_path = root / "test" / item.category / f"{name}.png"
        if name in names:
            raise CaptureError(image_path, f'two test images of category "{item.category}" are named "{name}"')
        image = np.asarray(item.image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise CaptureError(image_path, f"test image must be H x W x 3 uint8, got {image.dtype} {image.shape}")
        mask = None if item.mask is None else np.asarray(item.mask, dtype=bool)
        if mask is not None and mask.shape != image.shape[:2]:
            raise CaptureError(image_path, f"mask shape {mask.shape} differs from the image {image.shape[:2]}")
        if item.category == "good":
            if mask is not None and mask.any():
                raise CaptureError(image_path, "a good test image cannot have defect pixels in its mask")
        elif mask is None:
            raise CaptureError(image_path, f'test image of defect category "{item.category}" needs a mask')
        write_rgb(image_path, image)
        if item.category != "good":
            write_mask(root / "ground_truth" / item.category / f"{name}_mask.png", mask)
        names.add(name)

    write_json(tf_path, {"camera_angle_x": angle, "frames": entries})
