"""The seam between the service shell and the inspection core.

The MQTT service (agent/service/) only knows these types: it hands each paired, validated view of a
part to a :class:`PartInspection` (in a worker thread: ``add_view`` is heavy numeric work) and asks it
for the result when the part is finalised. The inspection core (recipes, placement refinement,
anomaly maps, voxel fusion) implements :class:`Inspector` for one enrolled recipe.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from agent.capture import Frame
from agent.fusion import DefectRegion
from agent.geometry import Intrinsics


@dataclass
class ViewResult:
    """What one processed view contributes (for progress messages, storage and operator views)."""

    frame_id: str
    view_score: float  # on the verdict scale: the recipe threshold is 1.0
    latency_ms: float
    anomaly_map: np.ndarray | None = None  # H x W float32 on the same scale
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class InspectionResult:
    """The outcome of a part, before it becomes a verdict message."""

    verdict: str  # "pass" | "fail" | "incomplete"
    score: float | None  # None when incomplete
    threshold: float  # 1.0 by construction of the score scale
    defects: list[DefectRegion]  # 3D defects, world frame, metres
    n_views: int
    placement_translation_m: tuple[float, float, float] | None
    placement_rotation_deg: float | None
    finalise_ms: float
    volume: object | None = None  # agent.fusion.SparseVolume when available
    # Views whose result changed after ``add_view`` returned it (the inspection scored them again, e.g. at the
    # placement it settled on): their final score and map, in view order. The service stores these and rewrites
    # their artifacts before it stores the verdict; the progress messages already sent stay as they were.
    revised_views: list[ViewResult] = field(default_factory=list)


class PartInspection(Protocol):
    """The inspection of one part, fed view by view. Not thread-safe: one view at a time."""

    def add_view(self, frame: Frame) -> ViewResult: ...

    def finalise(self) -> InspectionResult: ...


class Inspector(Protocol):
    """An enrolled recipe, ready to inspect parts."""

    name: str
    version: str  # "sha256:..." content hash of the recipe
    expected_views: int
    min_views: int  # fewer usable views give verdict "incomplete"
    intrinsics: Intrinsics  # the recipe's camera, for frames that carry none

    def start_part(self, part_id: str) -> PartInspection: ...
