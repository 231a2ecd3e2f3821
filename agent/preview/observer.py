"""The service side of the live preview: a :class:`~agent.service.service.ServiceObserver` that keeps, per cell,
only the latest composed picture (a one-slot mailbox) and a small status record for the text feed.

The service calls :meth:`PreviewObserver.on_view` / :meth:`~PreviewObserver.on_verdict` on its event loop.
They only store references to the event under a lock and wake the composer thread (microseconds); the
composition itself (resize, heatmap, outlines, text with OpenCV: a few milliseconds) runs on the composer
thread. When views come faster than they are composed, a cell's pending view is replaced by the newer one
(counted in ``stats.views_superseded``); a verdict is never replaced by a view. Viewers read
:class:`LatestFrame` without waiting for anybody: a slow viewer skips pictures, the agent never waits.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

import numpy as np

from agent.geometry import Intrinsics
from agent.preview.compose import DefectBox, VerdictBanner, ViewCaption, compose_view, placeholder, project_defect_outlines

log = logging.getLogger("agent.preview")

MAX_PENDING_VERDICTS = 16  # per cell, waiting for the composer (one per part: far more than parts in flight)


class LatestFrame:
    """One-slot mailbox of RGB pictures: :meth:`put` replaces, :meth:`latest` returns the newest with its sequence
    number. Never blocks beyond a dict-sized lock; pictures put here are never modified afterwards."""

    def __init__(self, initial: np.ndarray):
        self._lock = threading.Lock()
        self._seq = 0
        self._image = initial

    def put(self, image: np.ndarray) -> int:
        with self._lock:
            self._seq += 1
            self._image = image
            return self._seq

    def latest(self) -> tuple[int, np.ndarray]:
        with self._lock:
            return self._seq, self._image


@dataclass(frozen=True)
class CellStatus:
    """What the text feed says about a cell (JSON via :meth:`to_dict`)."""

    cell: str
    seq: int = 0  # increases with every change
    part_id: str | None = None
    recipe: str | None = None
    frame_id: str | None = None
    view: int = 0  # views of the part inspected so far
    expected_views: int | None = None
    view_score: float | None = None
    verdict: dict | None = None  # the shown part's verdict once it landed: verdict, score, threshold, n_defects, n_views
    last_verdict: dict | None = None  # the cell's most recent verdict (any part), with its part_id
    updated: float | None = None  # unix time of the last change

    def to_dict(self) -> dict:
        return {
            "cell": self.cell, "seq": self.seq, "part_id": self.part_id, "recipe": self.recipe, "frame_id": self.frame_id,
            "view": self.view, "expected_views": self.expected_views, "view_score": self.view_score,
            "verdict": self.verdict, "last_verdict": self.last_verdict, "updated": self.updated,
        }  # fmt: skip


@dataclass
class PreviewStats:
    """Counters of the composer (for tests and for measuring what the preview costs)."""

    views_seen: int = 0
    verdicts_seen: int = 0
    pictures_composed: int = 0
    views_superseded: int = 0  # pending views replaced by a newer one before they were composed
    compose_failures: int = 0
    compose_ms_total: float = 0.0
    compose_ms_max: float = 0.0

    @property
    def compose_ms_mean(self) -> float:
        return self.compose_ms_total / self.pictures_composed if self.pictures_composed else 0.0


@dataclass
class _Shown:
    """What a cell's picture shows now (kept to redraw it with the verdict banner)."""

    part_id: str
    image: np.ndarray
    score_map: np.ndarray | None
    caption: ViewCaption
    c2w: np.ndarray | None
    intrinsics: Intrinsics


@dataclass
class _Pending:
    view: object | None = None  # ViewEvent
    verdicts: list = field(default_factory=list)  # VerdictEvent, in order


def _verdict_summary(verdict) -> dict:
    return {
        "part_id": verdict.part_id, "verdict": verdict.verdict, "score": verdict.score, "threshold": verdict.threshold,
        "n_defects": len(verdict.defects), "n_views": verdict.n_views,
    }  # fmt: skip


class PreviewObserver:
    """Keeps each cell's latest preview picture and status; composes on its own thread. ``close()`` stops it."""

    def __init__(self, cells: Iterable[str]):
        self._lock = threading.Condition()
        self._frames: dict[str, LatestFrame] = {}
        self._status: dict[str, CellStatus] = {}
        self._pending: dict[str, _Pending] = {}
        self._shown: dict[str, _Shown] = {}  # composer thread only
        self._closed = False
        self.stats = PreviewStats()
        for cell in cells:
            self._cell(cell)
        self._thread = threading.Thread(target=self._compose_loop, name="preview-compose", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------------------- reading (any thread)

    @property
    def cells(self) -> list[str]:
        with self._lock:
            return list(self._frames)

    def frame(self, cell: str) -> LatestFrame | None:
        with self._lock:
            return self._frames.get(cell)

    def status(self, cell: str) -> CellStatus | None:
        with self._lock:
            return self._status.get(cell)

    # ---------------------------------------------------------------------------- ServiceObserver (service loop)

    def on_view(self, event) -> None:
        """Take the view for composition (replacing a pending view of the cell) and update the status. Never blocks."""
        with self._lock:
            self._cell(event.cell)
            pending = self._pending.setdefault(event.cell, _Pending())
            if pending.view is not None:
                self.stats.views_superseded += 1
            pending.view = event
            self.stats.views_seen += 1
            s = self._status[event.cell]
            new_part = s.part_id != event.part_id
            self._status[event.cell] = replace(
                s, seq=s.seq + 1, part_id=event.part_id, recipe=event.recipe, frame_id=event.frame.name, view=event.views_ok,
                expected_views=event.expected_views, view_score=float(event.result.view_score), verdict=None if new_part else s.verdict,
                updated=time.time(),
            )  # fmt: skip
            self._lock.notify()

    def on_verdict(self, event) -> None:
        """Take the verdict for the banner and update the status. Never blocks."""
        with self._lock:
            self._cell(event.cell)
            verdicts = self._pending.setdefault(event.cell, _Pending()).verdicts
            verdicts.append(event)
            del verdicts[:-MAX_PENDING_VERDICTS]  # bounded even while the composer is stuck
            self.stats.verdicts_seen += 1
            s = self._status[event.cell]
            summary = _verdict_summary(event.verdict)
            shown = s.part_id == event.verdict.part_id
            self._status[event.cell] = replace(
                s, seq=s.seq + 1, verdict=summary if shown else s.verdict, last_verdict=summary, updated=time.time()
            )
            self._lock.notify()

    def close(self, timeout: float = 5.0) -> None:
        """Stop the composer thread (pending work is dropped)."""
        with self._lock:
            self._closed = True
            self._lock.notify()
        self._thread.join(timeout)

    def __enter__(self) -> PreviewObserver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------- composer thread

    def _cell(self, cell: str) -> None:
        """Register a cell (lock held)."""
        if cell not in self._frames:
            self._frames[cell] = LatestFrame(placeholder(cell))
            self._status[cell] = CellStatus(cell)

    def _compose_loop(self) -> None:
        while True:
            with self._lock:
                while not self._closed and not any(p.view is not None or p.verdicts for p in self._pending.values()):
                    self._lock.wait()
                if self._closed:
                    return
                work = [(cell, p) for cell, p in self._pending.items() if p.view is not None or p.verdicts]
                self._pending = {}
            for cell, pending in work:
                t0 = time.perf_counter()
                try:
                    image = self._compose(cell, pending)
                except Exception:
                    log.exception("preview: composing the picture of cell %s failed", cell)
                    with self._lock:
                        self.stats.compose_failures += 1
                    continue
                ms = (time.perf_counter() - t0) * 1000
                with self._lock:
                    mailbox = self._frames[cell]
                    if image is not None:
                        self.stats.pictures_composed += 1
                        self.stats.compose_ms_total += ms
                        self.stats.compose_ms_max = max(self.stats.compose_ms_max, ms)
                if image is not None:
                    mailbox.put(image)

    def _compose(self, cell: str, pending: _Pending) -> np.ndarray | None:
        """The cell's new picture from its pending view and verdicts (None: the picture does not change)."""
        if pending.view is not None:
            e = pending.view
            caption = ViewCaption(cell, e.part_id, e.recipe, e.frame.name, e.views_ok, e.expected_views, float(e.result.view_score))
            self._shown[cell] = _Shown(e.part_id, e.frame.image, e.result.anomaly_map, caption, e.frame.c2w, e.frame.intrinsics)
        shown = self._shown.get(cell)
        if shown is None:
            return None  # a verdict for a part whose views this preview never saw
        verdict = next((v.verdict for v in reversed(pending.verdicts) if v.verdict.part_id == shown.part_id), None)
        if verdict is None:
            if pending.view is None:
                return None  # verdicts of other parts: the status says so, the picture stays
            return compose_view(shown.image, shown.score_map, shown.caption)
        banner = VerdictBanner(verdict.verdict, verdict.score, verdict.threshold, len(verdict.defects), verdict.n_views)
        outlines = []
        if shown.c2w is not None and verdict.defects:
            boxes = [DefectBox(d.id, tuple(d.bbox_min), tuple(d.bbox_max)) for d in verdict.defects]
            intrinsics = shown.intrinsics
            h, w = shown.image.shape[:2]
            if (intrinsics.width, intrinsics.height) != (w, h):
                intrinsics = intrinsics.scaled(w, h)
            outlines = project_defect_outlines(boxes, shown.c2w, intrinsics)
        return compose_view(shown.image, shown.score_map, shown.caption, banner=banner, defect_outlines=outlines)
