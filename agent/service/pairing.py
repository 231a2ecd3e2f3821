"""Frame/pose pairing by timestamp (the contract's rule: nearest robot pose of the camera within tolerance).

Rule for frames that arrive before their pose (the camera and the robot publish independently):
a frame without ``c2w`` is paired at once with the nearest pose in the camera's history when one lies
within the tolerance. Otherwise it waits up to ``wait_s`` (default 250 ms, wall clock) for a pose of its
camera within tolerance; each arriving pose pairs the waiting frames it matches. A frame is rejected
with ``no_pose`` when its wait expires, or at once when the camera already has a pose later than
``frame.ts + tolerance``: poses of one camera arrive in time order, so none can match any more.
The history is bounded (``history`` poses per camera, oldest dropped).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from agent.contract import RobotPose, match_pose

T = TypeVar("T")


@dataclass
class WaitingFrame(Generic[T]):
    """A frame waiting for its pose; ``item`` is whatever the caller needs to resume it."""

    camera_id: str
    ts: float
    deadline: float  # monotonic seconds
    item: T


class PosePairing(Generic[T]):
    """Per-camera pose history and the frames waiting for a pose, for one cell."""

    def __init__(self, tolerance_s: float, wait_s: float, history: int):
        if tolerance_s < 0 or wait_s < 0 or history < 1:
            raise ValueError(f"need tolerance_s >= 0, wait_s >= 0, history >= 1; got {tolerance_s}, {wait_s}, {history}")
        self.tolerance_s = tolerance_s
        self.wait_s = wait_s
        self.history = history
        self._poses: dict[str, deque[RobotPose]] = {}
        self._waiting: list[WaitingFrame[T]] = []

    def poses(self, camera_id: str) -> Iterable[RobotPose]:
        return self._poses.get(camera_id, ())

    def match(self, camera_id: str, ts: float) -> RobotPose | None:
        """The pose of ``camera_id`` nearest to ``ts`` within tolerance, from the history."""
        return match_pose(self.poses(camera_id), camera_id, ts, self.tolerance_s)

    def can_still_arrive(self, camera_id: str, ts: float) -> bool:
        """False once the camera has a pose later than ``ts + tolerance`` (poses arrive in time order)."""
        history = self._poses.get(camera_id)
        return not history or max(p.ts for p in history) <= ts + self.tolerance_s

    def wait(self, camera_id: str, ts: float, now: float, item: T) -> None:
        """Park a frame until a matching pose arrives or ``now + wait_s``."""
        self._waiting.append(WaitingFrame(camera_id, ts, now + self.wait_s, item))

    def add_pose(self, pose: RobotPose) -> list[tuple[T, RobotPose]]:
        """Record a pose; returns the waiting frames it (or an earlier pose) now pairs, with their pose."""
        history = self._poses.setdefault(pose.camera_id, deque(maxlen=self.history))
        history.append(pose)
        paired, still = [], []
        for w in self._waiting:
            found = self.match(w.camera_id, w.ts) if w.camera_id == pose.camera_id else None
            if found is not None:
                paired.append((w.item, found))
            else:
                still.append(w)
        self._waiting = still
        return paired

    def expire(self, now: float) -> list[T]:
        """Frames whose wait is over (or that can no longer be paired): the caller rejects them with no_pose."""
        expired, still = [], []
        for w in self._waiting:
            (expired if w.deadline <= now or not self.can_still_arrive(w.camera_id, w.ts) else still).append(w)
        self._waiting = still
        return [w.item for w in expired]

    def drop_waiting(self) -> list[T]:
        """Remove and return every waiting frame (shutdown)."""
        items = [w.item for w in self._waiting]
        self._waiting = []
        return items

    def next_deadline(self) -> float | None:
        return min((w.deadline for w in self._waiting), default=None)

    def waiting_items(self) -> list[T]:
        return [w.item for w in self._waiting]

    def __len__(self) -> int:
        return len(self._waiting)
