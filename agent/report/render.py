"""Part reports and the line summary: self-contained HTML pages from the results store and the artifact files.

Gathering (store and files) and rendering (Jinja2 templates in agent/report/templates) are separate:
:func:`collect_part_report` builds a :class:`PartReport`, :func:`part_report_html` turns it into a page.
Every picture is embedded as a base64 data URI, the plots are inline SVG (agent/report/svg.py), the 3D
viewer (agent/report/static/viewer.min.js, three.js) and its data are inline: a page loads nothing
from anywhere, so it can be mailed, archived or opened on a machine without a network.
"""

from __future__ import annotations

import base64
import json
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import cache
from importlib import resources
from pathlib import Path

import cv2
import numpy as np
from jinja2 import Environment, PackageLoader, StrictUndefined
from markupsafe import Markup

from agent import __version__
from agent.artifacts import PartArtifacts, read_part_artifacts, safe_component
from agent.fusion import SparseVolume
from agent.report.svg import HistoryPoint, score_gauge_svg, score_history_svg, view_scores_svg
from storage import PartFilter, PartRecord, PartSummary, ResultStore, ViewRecord

REPORTS_DIR = "reports"
SUMMARY_FILE = "summary.html"
HISTORY_PARTS = 50  # parts of the line shown in a part report's score history
SUMMARY_MAX_PARTS = 500  # parts in a line summary when none are named
IMAGE_MAX_SIDE = 960  # larger view images are downscaled (JPEG) before embedding
THUMB_HEIGHT = 64
THUMBS_PER_PART = 16


class PartNotFoundError(LookupError):
    """The store has no such part."""


# ------------------------------------------------------------------------------------------- images


@dataclass(frozen=True)
class EmbeddedImage:
    uri: str  # data:image/png;base64,... or data:image/jpeg;base64,...
    width: int
    height: int


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def embed_image(path: Path, max_side: int = IMAGE_MAX_SIDE) -> EmbeddedImage | None:
    """A PNG/JPEG file as a data URI (re-encoded as a smaller JPEG when larger than ``max_side``); None if unreadable."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        return None
    h, w = image.shape[:2]
    if max(h, w) > max_side:
        return _encoded(image, max_side / max(h, w))
    mime = "image/png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "image/jpeg"
    return EmbeddedImage(_data_uri(data, mime), w, h)


def _encoded(image_bgr: np.ndarray, scale: float, quality: int = 88) -> EmbeddedImage:
    h, w = image_bgr.shape[:2]
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = cv2.resize(image_bgr, size, interpolation=cv2.INTER_AREA)
    ok, jpeg = cv2.imencode(".jpg", small, [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise ValueError("JPEG encoding failed")
    return EmbeddedImage(_data_uri(jpeg.tobytes(), "image/jpeg"), size[0], size[1])


def thumbnail(path: Path, height: int = THUMB_HEIGHT) -> EmbeddedImage | None:
    """A small JPEG of an image file, ``height`` pixels high; None if unreadable."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        return None
    return _encoded(image, height / image.shape[0], quality=80)


# ------------------------------------------------------------------------------------------- gathering


@dataclass(frozen=True)
class ViewPanel:
    """One view in a report: stored numbers and the pictures on disk."""

    frame_id: str
    camera_id: str | None
    score: float | None  # None: files only, the store has no such view
    latency_ms: float | None
    timings_ms: dict[str, float]
    image: EmbeddedImage | None  # views/<frame>.jpg
    overlay: EmbeddedImage | None  # maps/<frame>.png
    defect_ids: tuple[int, ...]  # defects whose frames list this view


@dataclass(frozen=True)
class StageTiming:
    name: str
    mean_ms: float
    max_ms: float
    share: float  # of the sum of the stages' means


@dataclass(frozen=True)
class PartReport:
    """Everything a part report shows."""

    part: PartRecord
    views: list[ViewPanel]
    stages: list[StageTiming]
    history: list[PartSummary]  # the line (this part's cell) up to this part, oldest first
    artifacts: PartArtifacts | None
    notes: list[str] = field(default_factory=list)  # what is missing and why

    @property
    def volume(self) -> SparseVolume | None:
        return None if self.artifacts is None else self.artifacts.volume


def report_filename(cell: str, part_id: str) -> str:
    """The file name of a part's report in a summary's reports/ folder: ``<cell>__<part_id>.html``."""
    return f"{safe_component(cell, 'cell')}__{safe_component(part_id, 'part_id')}.html"


def find_part_dir(part: PartRecord, artifacts_root: str | Path | None) -> Path | None:
    """The part's artifact folder: ``<artifacts_root>/<cell>/<part_id>`` when given, else the folder of the
    anomaly maps the store recorded (``<dir>/maps/<frame>.npy``); None when neither exists."""
    if artifacts_root is not None:
        folder = Path(artifacts_root) / safe_component(part.cell, "cell") / safe_component(part.part_id, "part_id")
        return folder if folder.is_dir() else None
    for view in part.views:
        if view.anomaly_map_path:
            folder = Path(view.anomaly_map_path).parent.parent
            if folder.is_dir():
                return folder
    return None


def _stage_timings(views: Iterable[dict[str, float]]) -> list[StageTiming]:
    per_stage: dict[str, list[float]] = {}
    for timings in views:
        for name, ms in timings.items():
            per_stage.setdefault(name, []).append(float(ms))
    total = sum(float(np.mean(v)) for v in per_stage.values()) or 1.0
    stages = [StageTiming(name, float(np.mean(v)), float(np.max(v)), float(np.mean(v)) / total) for name, v in per_stage.items()]
    return sorted(stages, key=lambda s: -s.mean_ms)


def collect_part_report(store: ResultStore, part_id: str, cell: str | None = None, artifacts_root: str | Path | None = None, *, history: int = HISTORY_PARTS) -> PartReport:
    """Read one part from the store and its artifact folder. PartNotFoundError for an unknown part;
    ValueError when the id exists in several cells and ``cell`` is not given."""
    part = store.get_part(part_id, cell)
    if part is None:
        raise PartNotFoundError(f"no part {part_id!r}" + (f" in cell {cell!r}" if cell else "") + f" in {store.url}")
    notes: list[str] = []
    folder = find_part_dir(part, artifacts_root)
    artifacts = read_part_artifacts(folder) if folder is not None else None
    if artifacts is None:
        where = f"under {artifacts_root}" if artifacts_root is not None else "(no artifacts folder given, and the store names none)"
        notes.append(f"No artifact files for this part {where}: no images and no 3D view. The service writes them when [artifacts] dir is set.")
    else:
        notes.extend(f"unreadable artifact file: {p}" for p in artifacts.problems)
        if artifacts.volume is None and part.verdict is not None and part.verdict.verdict != "incomplete":
            notes.append(f"No anomaly volume in {artifacts.layout.root}: no 3D view.")
    defects_of_frame: dict[str, list[int]] = {}
    for d in part.verdict.defects if part.verdict is not None else []:
        for frame in d.frames:
            defects_of_frame.setdefault(frame, []).append(d.id)
    files = artifacts.views if artifacts is not None else {}

    def panel(frame_id: str, record: ViewRecord | None) -> ViewPanel:
        f = files.get(frame_id)
        return ViewPanel(frame_id, record and record.camera_id, record and record.view_score, record and record.latency_ms,
                         dict(record.timings_ms) if record else {}, embed_image(f.image) if f and f.image else None,
                         embed_image(f.overlay) if f and f.overlay else None, tuple(defects_of_frame.get(frame_id, ())))  # fmt: skip

    stored = {v.frame_id for v in part.views}
    panels = [panel(v.frame_id, v) for v in part.views] + [panel(frame_id, None) for frame_id in files if frame_id not in stored]
    line = store.list_parts(PartFilter(cell=part.cell, until=part.started_ts + 1e-3, limit=history))
    line.reverse()
    return PartReport(part, panels, _stage_timings(v.timings_ms for v in part.views), line, artifacts, notes)


# ------------------------------------------------------------------------------------------- rendering


@cache
def _environment() -> Environment:
    env = Environment(loader=PackageLoader("agent.report", "templates"), autoescape=True, undefined=StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["local_time"] = _local_time
    env.filters["short_time"] = lambda ts: "-" if ts is None else datetime.fromtimestamp(ts).astimezone().strftime("%m-%d %H:%M:%S")
    env.filters["num"] = _num
    env.filters["mm"] = lambda xs: ", ".join(f"{x * 1000:.1f}" for x in xs)
    env.filters["box_mm"] = lambda d: ", ".join(f"{(hi - lo) * 1000:.1f}" for lo, hi in zip(d.bbox_min, d.bbox_max))
    return env


@cache
def viewer_script() -> str:
    """The bundled 3D viewer (agent/report/static/viewer.min.js)."""
    js = resources.files("agent.report").joinpath("static/viewer.min.js").read_text(encoding="utf-8")
    if "</script" in js.lower():
        raise ValueError("viewer.min.js contains '</script' and cannot be inlined")
    return js


def _local_time(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts).astimezone().strftime("%Y-%m-%d %H:%M:%S %Z")


def _num(value: float | None, fmt: str = ".3f") -> str:
    return "-" if value is None else format(value, fmt)


def _json_for_script(data: object) -> Markup:
    """JSON safe inside <script type="application/json"> (no '</' sequences)."""
    return Markup(json.dumps(data, separators=(",", ":")).replace("</", "<\\/"))


def _verdict_label(part: PartRecord) -> str:
    return part.verdict.verdict if part.verdict is not None else ("no verdict yet" if part.state == "in_progress" else part.state)


def part_report_html(report: PartReport, *, back_href: str | None = None, link_history: bool = False, ply_href: str | None = None) -> str:
    """The page of one part. ``back_href``: link to the line summary; ``link_history``: the history's points
    link to sibling report files (true inside a summary's reports/ folder); ``ply_href``: the point cloud file."""
    from agent.report.volume3d import viewer_payload

    part, verdict = report.part, report.part.verdict
    threshold = verdict.threshold if verdict is not None else 1.0
    points = [
        HistoryPoint(f"{p.part_id} ({_local_time(p.started_ts)})", p.score, p.verdict, highlight=(p.cell, p.part_id) == (part.cell, part.part_id),
                     href=report_filename(p.cell, p.part_id) if link_history and (p.cell, p.part_id) != (part.cell, part.part_id) else None)
        for p in report.history
    ]  # fmt: skip
    scored = [v for v in report.views if v.score is not None]
    views_svg = view_scores_svg([v.frame_id for v in scored], [v.score for v in scored], threshold, hrefs=[f"#view-{v.frame_id}" for v in scored])
    viewer = None
    if report.volume is not None and len(report.volume):
        cameras = [np.asarray(v.c2w, dtype=np.float64)[:3, 3].tolist() for v in part.views]
        defects = verdict.defects if verdict is not None else []
        viewer = _json_for_script(viewer_payload(report.volume, defects, threshold, cameras=cameras))
    timings = verdict.timings_ms if verdict is not None else {}
    return _environment().get_template("part.html.j2").render(
        part=part,
        verdict=verdict,
        verdict_label=_verdict_label(part),
        verdict_class=verdict.verdict if verdict is not None else "none",
        threshold=threshold,
        gauge_svg=Markup(score_gauge_svg(verdict.score if verdict else None, threshold, width=220, height=16)),
        history_svg=Markup(score_history_svg(points, threshold)),
        history_count=len(points),
        views_svg=Markup(views_svg),
        views=report.views,
        n_images=sum(v.image is not None for v in report.views) + sum(v.overlay is not None for v in report.views),
        stages=report.stages,
        timings=timings,
        incomplete_reason=getattr(part, "incomplete_reason", None),
        notes=report.notes,
        viewer_data=viewer,
        viewer_js=Markup(viewer_script()) if viewer is not None else None,
        n_voxels=len(report.volume) if report.volume is not None else 0,
        voxel_size_mm=report.volume.voxel_size * 1000 if report.volume is not None else None,
        ply_href=ply_href,
        back_href=back_href,
        artifacts_dir=str(report.artifacts.layout.root) if report.artifacts is not None else None,
        generated=_local_time(time.time()),
        agent_version=__version__,
    )


def render_part_report(store: ResultStore, part_id: str, cell: str | None = None, artifacts_root: str | Path | None = None) -> str:
    """The self-contained HTML report of one part (see :func:`collect_part_report` for the errors)."""
    return part_report_html(collect_part_report(store, part_id, cell, artifacts_root))


# ------------------------------------------------------------------------------------------- the line summary


@dataclass(frozen=True)
class SummaryRow:
    part: PartRecord
    report_href: str
    thumbs: list[tuple[str, EmbeddedImage]]  # (frame id, heatmap or view thumbnail)
    has_files: bool
    gauge_svg: Markup  # score against threshold


def _summary_records(store: ResultStore, parts: Sequence | None) -> list[PartRecord]:
    """Full records, oldest first. ``parts``: storage PartSummary rows or (cell, part_id) pairs; None = the newest parts."""
    if parts is None:
        records = list(store.iter_part_records(PartFilter(limit=SUMMARY_MAX_PARTS), with_views=True))
    else:
        records = []
        for p in parts:
            cell, part_id = (p.cell, p.part_id) if hasattr(p, "part_id") else p
            record = store.get_part(part_id, cell)
            if record is None:
                raise PartNotFoundError(f"no part {part_id!r} in cell {cell!r} in {store.url}")
            records.append(record)
    return sorted(records, key=lambda r: (r.started_ts, r.cell, r.part_id))


def _summary_rows(records: Sequence[PartRecord], artifacts_root: str | Path | None) -> list[SummaryRow]:
    rows = []
    for record in records:
        folder = find_part_dir(record, artifacts_root)
        thumbs = []
        if folder is not None:
            files = read_part_artifacts(folder).views
            for frame_id in [v.frame_id for v in record.views if v.frame_id in files] or sorted(files):
                f = files[frame_id]
                path = f.overlay or f.image
                thumb = thumbnail(path) if path is not None else None
                if thumb is not None:
                    thumbs.append((frame_id, thumb))
                if len(thumbs) >= THUMBS_PER_PART:
                    break
        verdict = record.verdict
        gauge = Markup(score_gauge_svg(verdict.score if verdict else None, verdict.threshold if verdict else 1.0))
        rows.append(SummaryRow(record, f"{REPORTS_DIR}/{report_filename(record.cell, record.part_id)}", thumbs, folder is not None, gauge))
    return rows


def _summary_html(rows: Sequence[SummaryRow], artifacts_root: str | Path | None, title: str, store_url: str) -> str:
    verdicts = [r.part.verdict.verdict if r.part.verdict is not None else None for r in rows]
    counts = {k: verdicts.count(k) for k in ("pass", "fail", "incomplete")}
    decided = counts["pass"] + counts["fail"]
    per_view = [r.part.verdict.timings_ms.get("per_view_mean") for r in rows if r.part.verdict is not None]
    per_view = [v for v in per_view if v]
    thresholds = {r.part.verdict.threshold for r in rows if r.part.verdict is not None}
    threshold = thresholds.pop() if len(thresholds) == 1 else 1.0
    points = [HistoryPoint(f"{r.part.cell}/{r.part.part_id} ({_local_time(r.part.started_ts)})", r.part.verdict.score if r.part.verdict else None,
                           r.part.verdict.verdict if r.part.verdict else None, href=r.report_href) for r in rows]  # fmt: skip
    return _environment().get_template("summary.html.j2").render(
        title=title,
        rows=list(reversed(rows)),  # newest first
        counts=counts,
        n_parts=len(rows),
        yield_pct=100.0 * counts["pass"] / decided if decided else None,
        per_view_ms=float(np.mean(per_view)) if per_view else None,
        history_svg=Markup(score_history_svg(points, threshold, width=960, height=240, x_label="parts, oldest to newest; click a point for its report")),
        with_files=sum(r.has_files for r in rows),
        artifacts_root=None if artifacts_root is None else str(artifacts_root),
        store_url=store_url,
        cells=sorted({r.part.cell for r in rows}),
        generated=_local_time(time.time()),
        agent_version=__version__,
    )


def render_line_summary(store: ResultStore, artifacts_root: str | Path | None, parts: Sequence | None = None, title: str = "Inspection line summary") -> str:
    """One page over many parts (``parts``: PartSummary rows or (cell, part_id) pairs; None: the newest
    :data:`SUMMARY_MAX_PARTS`): verdict counts, the score history, and per part its verdict, score against the
    threshold, defects, views, latency, heatmap thumbnails and a link to ``reports/<cell>__<part_id>.html``."""
    return _summary_html(_summary_rows(_summary_records(store, parts), artifacts_root), artifacts_root, title, store.url)


def write_line_summary(store: ResultStore, artifacts_root: str | Path | None, out_dir: str | Path, parts: Sequence | None = None, title: str = "Inspection line summary") -> Path:
    """Write ``out_dir/summary.html`` and every part's report (and, when it has an anomaly volume, its point
    cloud ``.ply``) into ``out_dir/reports/``; returns the summary's path."""
    from agent.report.volume3d import write_anomaly_ply

    out_dir = Path(out_dir)
    reports = out_dir / REPORTS_DIR
    reports.mkdir(parents=True, exist_ok=True)
    records = _summary_records(store, parts)
    for record in records:
        report = collect_part_report(store, record.part_id, record.cell, artifacts_root)
        name = report_filename(record.cell, record.part_id)
        ply_href = None
        if report.volume is not None and len(report.volume):
            ply = reports / name.replace(".html", ".ply")
            verdict = record.verdict
            write_anomaly_ply(ply, report.volume, verdict.defects if verdict else [], verdict.threshold if verdict else 1.0, part=f"{record.cell}/{record.part_id}")
            ply_href = ply.name
        write_page(reports / name, part_report_html(report, back_href=f"../{SUMMARY_FILE}", link_history=True, ply_href=ply_href))
    summary = out_dir / SUMMARY_FILE
    write_page(summary, _summary_html(_summary_rows(records, artifacts_root), artifacts_root, title, store.url))
    return summary


def write_page(path: Path, text: str) -> None:
    """Replace ``path`` atomically (a reader never sees half a page)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)

