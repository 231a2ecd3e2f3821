"""The files of one inspected part (../shared/spec/capture-format.md, "Inspection output"), for people and tools.

One folder per part::

    verdict.json            the verdict (the MQTT verdict message's object)
    anomaly_volume.npz      the fused sparse voxel grid (agent.fusion.SparseVolume); absent without one
    maps/<frame>.npy        float32 H x W anomaly map on the verdict scale (threshold 1.0)
    maps/<frame>.png        the map over the observed image (jet, 0 .. 2 x threshold), defect outlines
    views/<frame>.jpg       the observed image (for reports)

``agent inspect`` writes one with :func:`write_inspection_output`. The MQTT service writes one per part
under ``<artifacts dir>/<cell>/<part_id>/`` through :class:`ArtifactWriter`, a service observer that
does the file work on its own thread behind a bounded queue (a full queue drops the job, logs and
counts it: the inspection is never slowed down by the disk). Reports read a folder back with
:func:`read_part_artifacts`.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from agent.contract import ContractError, Verdict, check_id

log = logging.getLogger("agent.artifacts")

VERDICT_FILE = "verdict.json"
VOLUME_FILE = "anomaly_volume.npz"
MAPS_DIR = "maps"
VIEWS_DIR = "views"
DEFECT_LEVEL = 1.0  # the verdict threshold on the map scale: outlines are drawn at this level
VIEW_JPEG_QUALITY = 90


def safe_component(value: str, what: str) -> str:
    """``value`` if it is a valid id (``[A-Za-z0-9._-]{1,128}``, not ``.``/``..``), so a safe path component; else ValueError."""
    try:
        return check_id(value, what)
    except ContractError as e:
        raise ValueError(e.message) from None


def safe_file_stem(frame_id: str) -> str:
    """``frame_id`` if it can name a file in one folder (one path component: no ``/``, ``\\`` or NUL, not ``.``/``..``);
    else ValueError. Looser than an id: offline captures name frames after their image files."""
    if not isinstance(frame_id, str) or not 0 < len(frame_id) <= 200 or frame_id in (".", "..") or any(c in frame_id for c in "/\\\0"):
        raise ValueError(f"frame_id {frame_id!r} cannot name a file (one path component of 1..200 characters)")
    return frame_id


@dataclass(frozen=True)
class PartArtifactLayout:
    """Where each file of one part's folder goes."""

    root: Path  # the part's folder

    @classmethod
    def under(cls, artifacts_root: str | Path, cell: str, part_id: str) -> PartArtifactLayout:
        """The folder of ``part_id`` of ``cell`` under an artifacts root (``<root>/<cell>/<part_id>``)."""
        return cls(Path(artifacts_root) / safe_component(cell, "cell") / safe_component(part_id, "part_id"))

    @property
    def verdict(self) -> Path:
        return self.root / VERDICT_FILE

    @property
    def volume(self) -> Path:
        return self.root / VOLUME_FILE

    def map_npy(self, frame_id: str) -> Path:
        return self.root / MAPS_DIR / f"{safe_file_stem(frame_id)}.npy"

    def map_png(self, frame_id: str) -> Path:
        return self.root / MAPS_DIR / f"{safe_file_stem(frame_id)}.png"

    def view_jpg(self, frame_id: str) -> Path:
        return self.root / VIEWS_DIR / f"{safe_file_stem(frame_id)}.jpg"


# ------------------------------------------------------------------------------------------- pictures


def _as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be H x W x 3 RGB, got shape {image.shape}")
    return image


def map_overlay(image: np.ndarray, score_map: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 RGB: the map (0 .. 2 x threshold, jet colours) over the image, with the outline of
    every region at or above the threshold (map >= 1.0) drawn white on a dark edge. A map of another
    size than the image is resized to it (bilinear)."""
    image = _as_rgb(image)
    h, w = image.shape[:2]
    score_map = np.asarray(score_map, dtype=np.float32)
    if score_map.ndim != 2:
        raise ValueError(f"anomaly map must be H x W, got shape {score_map.shape}")
    if score_map.shape != (h, w):
        score_map = cv2.resize(score_map, (w, h), interpolation=cv2.INTER_LINEAR)
    score_map = np.nan_to_num(score_map, nan=0.0, posinf=2.0 * DEFECT_LEVEL, neginf=0.0)
    level = np.clip(score_map / (2.0 * DEFECT_LEVEL), 0.0, 1.0)
    heat = cv2.cvtColor(cv2.applyColorMap((level * 255).astype(np.uint8), cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
    out = (0.55 * image.astype(np.float32) + 0.45 * heat.astype(np.float32)).astype(np.uint8)
    above = (score_map >= DEFECT_LEVEL).astype(np.uint8)
    contours, _ = cv2.findContours(above, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    if contours:
        width = max(1, round(min(h, w) / 256))
        cv2.drawContours(out, contours, -1, (0, 0, 0), width + 2, cv2.LINE_8)
        cv2.drawContours(out, contours, -1, (255, 255, 255), width, cv2.LINE_8)
    return out


# ------------------------------------------------------------------------------------------- writing


def write_view_artifacts(layout: PartArtifactLayout, frame_id: str, image: np.ndarray, anomaly_map: np.ndarray | None) -> None:
    """views/<frame>.jpg and, when there is a map, maps/<frame>.npy and maps/<frame>.png."""
    from agent.capture import write_rgb

    image = _as_rgb(image)
    write_rgb(layout.view_jpg(frame_id), image, jpeg_quality=VIEW_JPEG_QUALITY)
    if anomaly_map is None:
        return
    npy = layout.map_npy(frame_id)
    npy.parent.mkdir(parents=True, exist_ok=True)
    np.save(npy, np.asarray(anomaly_map, dtype=np.float32))
    write_rgb(layout.map_png(frame_id), map_overlay(image, anomaly_map))


def write_revised_maps(layout: PartArtifactLayout, views: Sequence) -> None:
    """Replace maps/<frame>.npy and .png of views the inspection scored again (``views``: their final ViewResults),
    the overlay drawn on the view's stored views/<frame>.jpg. A view without a map or without its stored image is
    skipped (its first map was not written either)."""
    from agent.capture import read_rgb, write_rgb

    for v in views:
        jpg = layout.view_jpg(v.frame_id)
        if v.anomaly_map is None or not jpg.is_file():
            continue
        np.save(layout.map_npy(v.frame_id), np.asarray(v.anomaly_map, dtype=np.float32))
        write_rgb(layout.map_png(v.frame_id), map_overlay(read_rgb(jpg), v.anomaly_map))


def write_verdict_artifacts(layout: PartArtifactLayout, verdict: Verdict, volume: object | None) -> None:
    """verdict.json and, when there is one, anomaly_volume.npz (an existing volume is kept when ``volume`` is None)."""
    from agent.capture import write_json

    layout.root.mkdir(parents=True, exist_ok=True)
    if volume is not None:
        volume.save_npz(layout.volume)
    write_json(layout.verdict, verdict.to_dict())


def write_inspection_output(out: Path, verdict: Verdict, result, views: Sequence, images: dict[str, np.ndarray]) -> None:
    """The spec's inspection output of one capture (``agent inspect``): verdict.json, anomaly_volume.npz,
    maps/<frame>.npy and .png, views/<frame>.jpg. ``result``: an InspectionResult; ``views``: its ViewResults;
    ``images``: observed RGB by frame id."""
    layout = PartArtifactLayout(Path(out))
    for v in views:
        write_view_artifacts(layout, v.frame_id, images[v.frame_id], v.anomaly_map)
    write_verdict_artifacts(layout, verdict, result.volume)


# ------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class ViewArtifacts:
    frame_id: str
    image: Path | None  # views/<frame>.jpg
    overlay: Path | None  # maps/<frame>.png
    anomaly_map: Path | None  # maps/<frame>.npy


@dataclass(frozen=True)
class PartArtifacts:
    """What is on disk for one part (any file may be missing)."""

    layout: PartArtifactLayout
    verdict: dict | None
    volume: object | None  # agent.fusion.SparseVolume
    views: dict[str, ViewArtifacts] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # files that exist but could not be read


def read_part_artifacts(part_dir: str | Path) -> PartArtifacts:
    """Read a part's folder; unreadable files are named in ``problems`` (a report still renders without them)."""
    import json

    from agent.fusion import SparseVolume

    layout = PartArtifactLayout(Path(part_dir))
    problems: list[str] = []
    verdict = None
    if layout.verdict.is_file():
        try:
            verdict = json.loads(layout.verdict.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            problems.append(f"{layout.verdict}: {e}")
    volume = None
    if layout.volume.is_file():
        try:
            volume = SparseVolume.load_npz(layout.volume)
        except (OSError, ValueError) as e:
            problems.append(str(e))
    frames: set[str] = set()
    for sub, suffix in ((VIEWS_DIR, ".jpg"), (MAPS_DIR, ".png"), (MAPS_DIR, ".npy")):
        folder = layout.root / sub
        if folder.is_dir():
            frames.update(p.name[: -len(suffix)] for p in folder.iterdir() if p.name.endswith(suffix) and p.is_file())
    views = {}
    for frame_id in sorted(frames):
        try:
            paths = (layout.view_jpg(frame_id), layout.map_png(frame_id), layout.map_npy(frame_id))
        except ValueError:
            continue  # not a file this module wrote
        image, overlay, npy = (p if p.is_file() else None for p in paths)
        views[frame_id] = ViewArtifacts(frame_id, image, overlay, npy)
    return PartArtifacts(layout, verdict, volume, views, problems)


# ------------------------------------------------------------------------------------------- the service observer


class ArtifactWriter:
    """A service observer (agent.service.service.ServiceObserver) that writes each part's folder under
    ``<root>/<cell>/<part_id>/``: per-view files on ``on_view``, verdict.json and anomaly_volume.npz on
    ``on_verdict``.

    The observer methods only queue a job (they run on the service's event loop); one worker thread does
    the writing, in order. When ``max_queue`` jobs are waiting a new job is dropped, logged and counted in
    ``dropped``: the service is never blocked. ``close()`` writes what is queued and stops the thread.
    """

    def __init__(self, root: str | Path, *, max_queue: int = 64):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.root = Path(root).absolute()  # absolute: the store records these paths
        if self.root.exists() and not self.root.is_dir():
            raise ValueError(f"artifacts dir {self.root} exists and is not a directory")
        self.root.mkdir(parents=True, exist_ok=True)
        self.written = 0  # jobs done
        self.dropped = 0  # jobs refused because the queue was full
        self.failed = 0  # jobs that raised (logged)
        self._jobs: queue.Queue[tuple[str, Callable[[], None]] | None] = queue.Queue(max_queue)
        self._closed = False
        self._thread = threading.Thread(target=self._work, name="artifacts", daemon=True)
        self._thread.start()

    def __repr__(self) -> str:
        return f"ArtifactWriter({str(self.root)!r})"

    def part_layout(self, cell: str, part_id: str) -> PartArtifactLayout:
        return PartArtifactLayout.under(self.root, cell, part_id)

    def anomaly_map_path(self, cell: str, part_id: str, frame_id: str) -> Path:
        """Where ``on_view`` writes the view's anomaly map (.npy): the service records it with the view."""
        return self.part_layout(cell, part_id).map_npy(frame_id)

    # observer interface (event loop thread: queue and return)

    def on_view(self, event) -> None:
        layout = self.part_layout(event.cell, event.part_id)
        frame_id = safe_file_stem(event.frame.name)
        image, anomaly_map = event.frame.image, event.result.anomaly_map
        self._submit(f"view {event.cell}/{event.part_id}/{frame_id}", lambda: write_view_artifacts(layout, frame_id, image, anomaly_map))

    def on_verdict(self, event) -> None:
        layout = self.part_layout(event.cell, event.verdict.part_id)
        verdict = event.verdict
        volume = event.result.volume if event.result is not None else None
        revised = list(event.result.revised_views) if event.result is not None else []
        if revised:  # queued after the views' own jobs (one worker, in order), so they replace what those wrote
            self._submit(f"revised maps {event.cell}/{verdict.part_id}", lambda: write_revised_maps(layout, revised))
        self._submit(f"verdict {event.cell}/{verdict.part_id}", lambda: write_verdict_artifacts(layout, verdict, volume))

    # the worker

    def _submit(self, what: str, job: Callable[[], None]) -> None:
        if self._closed:
            self.dropped += 1
            log.warning("artifacts: %s dropped: the writer is closed", what)
            return
        try:
            self._jobs.put_nowait((what, job))
        except queue.Full:
            self.dropped += 1
            log.warning("artifacts: %s dropped: %d jobs already queued (disk too slow?); %d dropped so far", what, self._jobs.maxsize, self.dropped)

    def _work(self) -> None:
        while True:
            item = self._jobs.get()
            try:
                if item is None:
                    return
                what, job = item
                try:
                    job()
                    self.written += 1
                except Exception:
                    self.failed += 1
                    log.exception("artifacts: writing %s failed", what)
            finally:
                self._jobs.task_done()

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued job is done; False on timeout."""
        with self._jobs.all_tasks_done:
            return self._jobs.all_tasks_done.wait_for(lambda: self._jobs.unfinished_tasks == 0, timeout)

    def close(self, timeout: float = 30.0) -> None:
        """Finish the queued jobs (up to ``timeout`` seconds) and stop the worker thread."""
        if self._closed:
            return
        self._closed = True
        try:
            self._jobs.put(None, timeout=timeout)
        except queue.Full:
            log.error("artifacts: could not stop the writer within %.0f s (%d jobs queued)", timeout, self._jobs.qsize())
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("artifacts: the writer did not finish its jobs within %.0f s", timeout)

    def __enter__(self) -> ArtifactWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
