"""Reference views: the teach-in parts' own views, taken from the robot poses that inspection repeats.

The golden part's surface colour (:mod:`agent.surface`) is a mean over 36 views at other poses: texture edges come
out soft and a little misregistered, so a painted line or dot reads as a colour change about as strong as a stain.
A cell, though, runs the same robot program for every part. The nominal teach-in parts (:func:`agent.pipeline.
calibrate_on_teach_in`) were photographed from exactly the poses a part under inspection is, under the cell's
light, so their views are the sharpest nominal colour reference there is. A part's pixel is compared with the
same surface point seen from the same pose on each teach-in part (through both parts' placements and depth), and
the closest nominal instance counts (Odd-One-Out: what some nominal instance shows is nominal).

This module keeps those views (:class:`ReferenceViews`, ``reference_views.npz`` of a recipe: images, depth, camera
poses and the teach-in part's placement per view) and finds the views taken from a given pose
(:meth:`ReferenceViews.matching`). The colour comparison itself is :func:`agent.surface.surface_residuals`'s.
Plain numpy, no pickle.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.geometry import Intrinsics, check_rigid, rotation_angle_deg
from agent.npz import read_versioned_npz

REFERENCE_VIEWS_FORMAT = "edge-inspection-agent/reference-views"
REFERENCE_VIEWS_VERSION = 1
# A reference view matches a view taken from the same robot pose: camera centres within MATCH_MM and viewing
# directions within MATCH_DEG (a robot repeats a pose to well under 0.1 mm; the lighting and the perspective of the
# part change with the pose, so a reference from another pose would not be a like-for-like comparison).
MATCH_MM = 2.0
MATCH_DEG = 1.0


@dataclass(frozen=True)
class ReferenceView:
    """One nominal view: what :func:`agent.surface.surface_residuals` compares a part's view with."""

    image: np.ndarray  # H x W x 3 uint8
    depth: np.ndarray  # H x W float32 metres, 0 = no depth
    c2w: np.ndarray  # 4 x 4 OpenGL camera-to-world
    intrinsics: Intrinsics
    T_world_part: np.ndarray  # 4 x 4: the teach-in part's placement (recipe frame -> world) when the view was taken
    part: int  # which teach-in part


@dataclass
class ReferenceViews:
    """The teach-in parts' views with depth, K of them, one camera (see the module docstring)."""

    images: np.ndarray  # K x H x W x 3 uint8
    depth: np.ndarray  # K x H x W float32 metres
    c2w: np.ndarray  # K x 4 x 4
    T_world_part: np.ndarray  # K x 4 x 4
    part: np.ndarray  # K int32 >= 0
    intrinsics: Intrinsics

    def __post_init__(self) -> None:
        self.images = np.asarray(self.images)
        self.depth = np.asarray(self.depth, dtype=np.float32)
        self.c2w = np.asarray(self.c2w, dtype=np.float64)
        self.T_world_part = np.asarray(self.T_world_part, dtype=np.float64)
        self.part = np.asarray(self.part, dtype=np.int32)
        K = self.intrinsics
        K.validate()
        n = len(self.images)
        if n == 0:
            raise ValueError("reference views: there are none")
        if self.images.dtype != np.uint8 or self.images.shape != (n, K.height, K.width, 3):
            raise ValueError(f"reference views: images must be {n} x {K.height} x {K.width} x 3 uint8, got {self.images.shape} {self.images.dtype}")
        if self.depth.shape != (n, K.height, K.width) or not np.isfinite(self.depth).all() or (self.depth < 0).any():
            raise ValueError(f"reference views: depth must be {n} x {K.height} x {K.width} finite values >= 0")
        if self.c2w.shape != (n, 4, 4) or self.T_world_part.shape != (n, 4, 4) or self.part.shape != (n,):
            raise ValueError(f"reference views: c2w and T_world_part must be {n} x 4 x 4 and part {n} values")
        for i in range(n):
            check_rigid(self.c2w[i], what=f"reference view {i} c2w")
            check_rigid(self.T_world_part[i], what=f"reference view {i} T_world_part")
        if (self.part < 0).any():
            raise ValueError("reference views: part indices must be >= 0")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def parts(self) -> int:
        """How many teach-in parts the views come from."""
        return len(np.unique(self.part))

    def view(self, i: int) -> ReferenceView:
        return ReferenceView(self.images[i], self.depth[i], self.c2w[i], self.intrinsics, self.T_world_part[i], int(self.part[i]))

    def matching(self, c2w: np.ndarray, exclude_part: int | None = None) -> list[ReferenceView]:
        """The views taken from the pose ``c2w`` (within :data:`MATCH_MM` / :data:`MATCH_DEG`), at most one per
        teach-in part (its closest), leaving out the views of ``exclude_part``."""
        c2w = np.asarray(c2w, dtype=np.float64)
        dist_mm = np.linalg.norm(self.c2w[:, :3, 3] - c2w[:3, 3], axis=1) * 1000.0
        turn = np.array([rotation_angle_deg(R.T @ c2w[:3, :3]) for R in self.c2w[:, :3, :3]])
        ok = (dist_mm <= MATCH_MM) & (turn <= MATCH_DEG)
        if exclude_part is not None:
            ok &= self.part != exclude_part
        out = []
        for p in np.unique(self.part[ok]):
            idx = np.flatnonzero(ok & (self.part == p))
            out.append(self.view(int(idx[np.argmin(dist_mm[idx] + turn[idx])])))
        return out

    @classmethod
    def from_parts(cls, parts: list[tuple[list, np.ndarray]], intrinsics: Intrinsics) -> "ReferenceViews":
        """From teach-in parts given as (frames, placement ``T_world_part``); frames without depth or pose are left out."""
        images, depth, c2w, T, part = [], [], [], [], []
        for p, (frames, T_world_part) in enumerate(parts):
            for f in frames:
                if f.depth is None or f.c2w is None:
                    continue
                images.append(np.asarray(f.image, dtype=np.uint8))
                depth.append(np.asarray(f.depth, dtype=np.float32))
                c2w.append(f.c2w)
                T.append(T_world_part)
                part.append(p)
        if not images:
            raise ValueError("reference views: no teach-in frame has depth")
        return cls(np.stack(images), np.stack(depth), np.stack(c2w), np.stack(T), np.array(part), intrinsics)

    def save(self, path: str | Path) -> None:
        K = self.intrinsics
        np.savez_compressed(
            path, format=np.array(REFERENCE_VIEWS_FORMAT), version=np.array(REFERENCE_VIEWS_VERSION), images=self.images,
            depth=self.depth, c2w=self.c2w, T_world_part=self.T_world_part, part=self.part,
            intrinsics=np.array([K.fx, K.fy, K.cx, K.cy, K.width, K.height], dtype=np.float64),
        )  # fmt: skip

    @classmethod
    def load(cls, path: str | Path) -> "ReferenceViews":
        """Read what :meth:`save` wrote (no pickle); ValueError names what is wrong."""
        z = read_versioned_npz(path, REFERENCE_VIEWS_FORMAT, REFERENCE_VIEWS_VERSION,
                               ("images", "depth", "c2w", "T_world_part", "part", "intrinsics"), "reference views")  # fmt: skip
        k = np.asarray(z["intrinsics"], dtype=np.float64)
        if k.shape != (6,) or not np.isfinite(k).all() or k[4] != math.floor(k[4]) or k[5] != math.floor(k[5]):
            raise ValueError("reference views: intrinsics must be fx, fy, cx, cy, width, height")
        K = Intrinsics(float(k[0]), float(k[1]), float(k[2]), float(k[3]), int(k[4]), int(k[5]))
        return cls(z["images"], z["depth"], z["c2w"], z["T_world_part"], z["part"], K)
