"""The picture an operator watches: one view of a cell with its anomaly heatmap, defect outlines and captions.

Plain functions on arrays (no I/O, no threads): :func:`compose_view` makes a fixed-size RGB canvas
(``CANVAS_W`` x ``CANVAS_H``, what the WebRTC track sends) from the observed image, the view's anomaly map
on the verdict scale (threshold 1.0), a caption and, once the part's verdict has landed, a verdict banner
with the 3D defects' boxes projected into the view.

Layout, top to bottom: a caption strip (cell, part id, recipe; view k/expected, frame, view score), the
image scaled to fit (letterboxed) with the heatmap blended in and the threshold contour in white, and a
bottom strip: the verdict banner (green pass, red fail, amber incomplete) or "inspecting".
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from agent.artifacts import map_overlay
from agent.geometry import Intrinsics, project_points

CANVAS_W = 640
CANVAS_H = 480
CAPTION_H = 56
BANNER_H = 56
IMAGE_H = CANVAS_H - CAPTION_H - BANNER_H  # 368

BACKGROUND = (24, 24, 28)
CAPTION_BG = (40, 42, 48)
TEXT = (235, 235, 235)
MUTED = (150, 150, 158)
DEFECT_BOX = (255, 40, 255)  # magenta: not a jet colour, stands out over the heatmap
VERDICT_COLOURS = {"pass": (30, 150, 60), "fail": (200, 30, 30), "incomplete": (220, 140, 0)}
FONT = cv2.FONT_HERSHEY_SIMPLEX


@dataclass(frozen=True)
class ViewCaption:
    """What the caption strip says about the view on screen."""

    cell: str
    part_id: str
    recipe: str
    frame_id: str
    view: int  # views of the part inspected so far, this one included
    expected_views: int | None
    view_score: float  # verdict scale: threshold 1.0


@dataclass(frozen=True)
class VerdictBanner:
    """What the bottom strip says once the part's verdict has landed."""

    verdict: str  # pass | fail | incomplete
    score: float | None
    threshold: float
    n_defects: int
    n_views: int


@dataclass(frozen=True)
class DefectBox:
    """One fused 3D defect: its axis-aligned box in world coordinates (metres)."""

    id: int
    bbox_min: tuple[float, float, float]
    bbox_max: tuple[float, float, float]


def fit_size(width: int, height: int, box_w: int, box_h: int) -> tuple[int, int]:
    """The largest size with the image's aspect ratio that fits ``box_w`` x ``box_h`` (at least 1 x 1)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    scale = min(box_w / width, box_h / height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def view_panel(image: np.ndarray, score_map: np.ndarray | None, width: int, height: int) -> np.ndarray:
    """The image resized to ``width`` x ``height`` with the map's heatmap and threshold outlines at that size.

    The map (any resolution, e.g. a feature grid) is resized before the overlay is drawn, so the outlines are
    drawn at display resolution.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be H x W x 3 uint8 RGB, got {image.shape} {image.dtype}")
    h, w = image.shape[:2]
    grow = width > w or height > h
    panel = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR if grow else cv2.INTER_AREA)
    if score_map is None:
        return panel
    score_map = np.asarray(score_map, dtype=np.float32)
    if score_map.ndim != 2 or score_map.size == 0:
        raise ValueError(f"anomaly map must be H x W, got shape {score_map.shape}")
    resized = cv2.resize(np.nan_to_num(score_map, nan=0.0, posinf=1e6, neginf=0.0), (width, height), interpolation=cv2.INTER_LINEAR)
    return map_overlay(panel, resized)


def project_defect_outlines(defects: Sequence[DefectBox], c2w: np.ndarray, intrinsics: Intrinsics) -> list[np.ndarray]:
    """Each defect box's outline in the view: the convex hull (int32 K x 2 pixel coordinates) of its 8 projected
    corners. Boxes with a corner behind the camera are left out (their outline is not a closed polygon)."""
    outlines = []
    for d in defects:
        lo, hi = np.asarray(d.bbox_min, np.float64), np.asarray(d.bbox_max, np.float64)
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        uv, depth = project_points(corners, c2w, intrinsics)
        if not np.all(np.isfinite(uv)) or np.any(depth <= 1e-6):
            continue
        outlines.append(cv2.convexHull(np.round(uv).astype(np.int32)).reshape(-1, 2))
    return outlines


def _text(canvas: np.ndarray, text: str, x: int, y: int, scale: float, colour: tuple[int, int, int], thickness: int = 1) -> None:
    cv2.putText(canvas, text, (x, y), FONT, scale, colour, thickness, cv2.LINE_AA)


def _fit_text(text: str, max_width: int, scale: float, thickness: int = 1) -> str:
    """``text`` shortened with '...' until it fits ``max_width`` pixels."""
    if cv2.getTextSize(text, FONT, scale, thickness)[0][0] <= max_width:
        return text
    while text and cv2.getTextSize(text + "...", FONT, scale, thickness)[0][0] > max_width:
        text = text[:-1]
    return text + "..."


def caption_lines(caption: ViewCaption) -> tuple[str, str]:
    """The caption strip's two lines (ASCII: the ids are ASCII by the contract)."""
    expected = "?" if caption.expected_views is None else str(caption.expected_views)
    first = f"{caption.cell}   part {caption.part_id}   ({caption.recipe})"
    second = f"view {caption.view}/{expected}   frame {caption.frame_id}   view score {caption.view_score:.2f}"
    return first, second


def banner_text(banner: VerdictBanner) -> str:
    score = "-" if banner.score is None else f"{banner.score:.2f}"
    defects = f"{banner.n_defects} defect" + ("" if banner.n_defects == 1 else "s")
    return f"{banner.verdict.upper()}   score {score} / {banner.threshold:.2f}   {defects}   {banner.n_views} views"


def compose_view(
    image: np.ndarray,
    score_map: np.ndarray | None,
    caption: ViewCaption,
    *,
    banner: VerdictBanner | None = None,
    defect_outlines: Sequence[np.ndarray] = (),
) -> np.ndarray:
    """The CANVAS_H x CANVAS_W x 3 uint8 RGB picture of one view; ``defect_outlines`` in the image's pixels."""
    canvas = np.empty((CANVAS_H, CANVAS_W, 3), np.uint8)
    canvas[:] = BACKGROUND
    h, w = np.asarray(image).shape[:2]
    pw, ph = fit_size(w, h, CANVAS_W, IMAGE_H)
    panel = view_panel(image, score_map, pw, ph)
    if defect_outlines:
        sx, sy = pw / w, ph / h
        for outline in defect_outlines:
            pts = np.round((np.asarray(outline, np.float64) + 0.5) * (sx, sy) - 0.5).astype(np.int32)
            cv2.polylines(panel, [pts.reshape(-1, 1, 2)], True, DEFECT_BOX, 2, cv2.LINE_AA)
    x0, y0 = (CANVAS_W - pw) // 2, CAPTION_H + (IMAGE_H - ph) // 2
    canvas[y0 : y0 + ph, x0 : x0 + pw] = panel
    canvas[:CAPTION_H] = CAPTION_BG
    first, second = caption_lines(caption)
    _text(canvas, _fit_text(first, CANVAS_W - 20, 0.6), 10, 22, 0.6, TEXT)
    above = caption.view_score >= 1.0  # the view alone is over the threshold: say it in red
    _text(canvas, _fit_text(second, CANVAS_W - 20, 0.55), 10, 46, 0.55, (255, 90, 90) if above else MUTED)
    draw_banner(canvas, banner)
    return canvas


def draw_banner(canvas: np.ndarray, banner: VerdictBanner | None) -> None:
    """The bottom strip of a canvas: the verdict in its colour, or 'inspecting' while the part is open."""
    strip = canvas[CANVAS_H - BANNER_H :]
    if banner is None:
        strip[:] = CAPTION_BG
        _text(canvas, "inspecting ...", 10, CANVAS_H - BANNER_H + 36, 0.7, MUTED)
        return
    strip[:] = VERDICT_COLOURS.get(banner.verdict, MUTED)
    _text(canvas, _fit_text(banner_text(banner), CANVAS_W - 20, 0.75, 2), 10, CANVAS_H - BANNER_H + 38, 0.75, (255, 255, 255), 2)


def placeholder(cell: str, message: str = "waiting for the first view") -> np.ndarray:
    """The canvas shown before a cell has inspected any view."""
    canvas = np.empty((CANVAS_H, CANVAS_W, 3), np.uint8)
    canvas[:] = BACKGROUND
    canvas[:CAPTION_H] = CAPTION_BG
    _text(canvas, cell, 10, 34, 0.7, TEXT)
    size = cv2.getTextSize(message, FONT, 0.7, 1)[0]
    _text(canvas, message, (CANVAS_W - size[0]) // 2, CAPTION_H + IMAGE_H // 2, 0.7, MUTED)
    return canvas
