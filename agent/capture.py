"""Posed multi-view captures in memory and on disk (../shared/spec/capture-format.md).

The dataclasses are the in-memory form every module uses (simulator output, enrollment input,
inspection input). Loading and saving follow the spec's `transforms.json` layout exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from agent.geometry import Intrinsics

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
