"""The report's plots as inline SVG: the line's score history, per-view scores, a score-vs-threshold gauge.

Hand-written SVG rather than matplotlib: the plots are simple (points, bars, one threshold line), SVG
stays sharp at any zoom, its text is selectable and each mark carries a tooltip (``<title>``) and may be
a link to that part's report; and a report needs no plotting stack (matplotlib is not a dependency of
the agent). Pure functions: data in, SVG text out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from markupsafe import escape

VERDICT_COLOURS = {"pass": "#2f9e44", "fail": "#d6336c", "incomplete": "#868e96", None: "#adb5bd"}
THRESHOLD_COLOUR = "#e8590c"
AXIS_COLOUR = "#868e96"
GRID_COLOUR = "#e9ecef"
FONT = 'font-family="system-ui, -apple-system, Segoe UI, Roboto, sans-serif"'


@dataclass(frozen=True)
class HistoryPoint:
    """One part in the score history."""

    label: str  # shown in the tooltip (part id, time)
    score: float | None  # None: no score (incomplete, or no verdict yet)
    verdict: str | None
    highlight: bool = False  # the part the report is about
    href: str | None = None  # link to its report


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering [lo, hi] (steps of 1, 2 or 5 times a power of ten)."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step - 1e-9) * step
    ticks = []
    k = 0
    while first + k * step <= hi + 1e-9 * step:
        ticks.append(round(first + k * step, 12))
        k += 1
    return ticks


def _fmt(value: float) -> str:
    return f"{value:g}" if abs(value) >= 0.01 or value == 0 else f"{value:.1e}"


def _y_top(scores: Sequence[float | None], threshold: float) -> float:
    """The top of the score axis: room for every finite score and twice the threshold."""
    top = max([2.0 * threshold, *(s for s in scores if s is not None and math.isfinite(s))]) * 1.08
    return top if top > 0 else 1.0


def _frame(width: int, height: int, left: int, right: int, top: int, bottom: int, y_max: float, threshold: float, y_label: str) -> tuple[list[str], Callable[[float], float]]:
    """The axes, grid and threshold line; returns the SVG parts and the score -> y mapping."""
    plot_h = height - top - bottom

    def y_of(score: float) -> float:
        return top + plot_h * (1.0 - min(max(score, 0.0), y_max) / y_max)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="100%" role="img" {FONT} font-size="12">']
    for tick in nice_ticks(0.0, y_max):
        y = y_of(tick)
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{width - right}" y2="{y:.1f}" stroke="{GRID_COLOUR}"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 3.5:.1f}" text-anchor="end" fill="{AXIS_COLOUR}">{_fmt(tick)}</text>')
    parts.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="{AXIS_COLOUR}"/>')
    parts.append(f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="{AXIS_COLOUR}"/>')
    y_t = y_of(threshold)
    parts.append(f'<line x1="{left}" y1="{y_t:.1f}" x2="{width - right}" y2="{y_t:.1f}" stroke="{THRESHOLD_COLOUR}" stroke-width="1.5" stroke-dasharray="6 4"/>')
    parts.append(f'<text x="12" y="{top + plot_h / 2:.1f}" transform="rotate(-90 12 {top + plot_h / 2:.1f})" text-anchor="middle" fill="{AXIS_COLOUR}">{escape(y_label)}</text>')
    return parts, y_of


def _threshold_label(left: int, y: float, threshold: float) -> str:
    """Drawn last, with a white halo: readable over the marks."""
    return f'<text x="{left + 4}" y="{y - 4:.1f}" fill="{THRESHOLD_COLOUR}" stroke="#fff" stroke-width="3" paint-order="stroke">threshold {_fmt(threshold)}</text>'


def score_history_svg(points: Sequence[HistoryPoint], threshold: float, *, width: int = 560, height: int = 230, x_label: str = "parts, oldest to newest") -> str:
    """Scores of consecutive parts (oldest left) as points coloured by verdict, the threshold dashed, the
    highlighted part ringed; parts without a score sit on the axis as crosses."""
    left, right, top, bottom = 48, 14, 14, 30
    y_max = _y_top([p.score for p in points], threshold)
    parts, y_of = _frame(width, height, left, right, top, bottom, y_max, threshold, "part score")
    n = len(points)
    plot_w = width - left - right
    x_of = (lambda i: left + plot_w / 2) if n <= 1 else (lambda i: left + 10 + (plot_w - 20) * i / (n - 1))
    scored = [(x_of(i), y_of(p.score)) for i, p in enumerate(points) if p.score is not None]
    if len(scored) > 1:
        path = " ".join(f"{x:.1f},{y:.1f}" for x, y in scored)
        parts.append(f'<polyline points="{path}" fill="none" stroke="#ced4da" stroke-width="1"/>')
    radius = 4.0 if n <= 60 else 3.0 if n <= 200 else 2.0
    for i, p in enumerate(points):
        x = x_of(i)
        colour = VERDICT_COLOURS.get(p.verdict, VERDICT_COLOURS[None])
        score_text = "no score" if p.score is None else f"score {p.score:.3f}"
        tip = f"<title>{escape(p.label)}: {escape(p.verdict or 'no verdict')}, {score_text}</title>"
        if p.score is None:
            y = height - bottom
            d = radius
            mark = f'<path d="M{x - d:.1f},{y - d:.1f}L{x + d:.1f},{y + d:.1f}M{x - d:.1f},{y + d:.1f}L{x + d:.1f},{y - d:.1f}" stroke="{colour}" stroke-width="1.6">{tip}</path>'
        else:
            y = y_of(p.score)
            mark = f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{radius}" fill="{colour}">{tip}</circle>'
        if p.highlight:
            anchor = "end" if x > width - right - 40 else "start" if x < left + 40 else "middle"
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{radius + 5}" fill="none" stroke="#212529" stroke-width="2"/>')
            parts.append(f'<text x="{x:.1f}" y="{max(y - radius - 9, top + 9):.1f}" text-anchor="{anchor}" font-weight="600" fill="#212529" stroke="#fff" stroke-width="3" paint-order="stroke">this part</text>')
        if p.href:
            mark = f'<a href="{escape(p.href)}">{mark}</a>'
        parts.append(mark)
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 8}" text-anchor="middle" fill="{AXIS_COLOUR}">{escape(x_label)} ({n})</text>')
    parts.append(_threshold_label(left, y_of(threshold), threshold))
    if n == 0:
        parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{top + 40}" text-anchor="middle" fill="{AXIS_COLOUR}">no parts</text>')
    parts.append("</svg>")
    return "".join(parts)


def view_scores_svg(frames: Sequence[str], scores: Sequence[float], threshold: float, *, width: int = 560, height: int = 230, hrefs: Sequence[str | None] | None = None) -> str:
    """One bar per view (in inspection order), red at or above the threshold; the threshold dashed."""
    left, right, top, bottom = 48, 14, 14, 44
    y_max = _y_top(list(scores), threshold)
    parts, y_of = _frame(width, height, left, right, top, bottom, y_max, threshold, "view score")
    n = len(frames)
    plot_w = width - left - right
    slot = plot_w / max(n, 1)
    bar = max(min(slot * 0.7, 40.0), 1.0)
    label_every = max(1, math.ceil(n / max(plot_w / 34, 1)))
    for i, (frame, score) in enumerate(zip(frames, scores)):
        x = left + slot * (i + 0.5)
        y = y_of(score)
        colour = "#d6336c" if score >= threshold else "#4dabf7"
        rect = f'<rect x="{x - bar / 2:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{max(height - bottom - y, 0.5):.1f}" fill="{colour}"><title>view {escape(frame)}: score {score:.3f}</title></rect>'
        if hrefs is not None and hrefs[i]:
            rect = f'<a href="{escape(hrefs[i])}">{rect}</a>'
        parts.append(rect)
        if i % label_every == 0:
            parts.append(f'<text x="{x:.1f}" y="{height - bottom + 14}" text-anchor="middle" fill="{AXIS_COLOUR}">{escape(frame[-6:])}</text>')
    parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{height - 8}" text-anchor="middle" fill="{AXIS_COLOUR}">views, in inspection order ({n})</text>')
    parts.append(_threshold_label(left, y_of(threshold), threshold))
    if n == 0:
        parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{top + 40}" text-anchor="middle" fill="{AXIS_COLOUR}">no views recorded</text>')
    parts.append("</svg>")
    return "".join(parts)


def score_gauge_svg(score: float | None, threshold: float, *, width: int = 160, height: int = 14) -> str:
    """A small horizontal bar: the score on 0 .. max(2 x threshold, score), the threshold as a tick."""
    top = max(2.0 * threshold, score or 0.0) or 1.0
    x_t = width * threshold / top
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img">',
             f'<rect x="0" y="2" width="{width}" height="{height - 4}" rx="3" fill="#f1f3f5"/>']  # fmt: skip
    if score is not None and math.isfinite(score):
        colour = "#d6336c" if score >= threshold else "#2f9e44"
        parts.append(f'<rect x="0" y="2" width="{width * min(score, top) / top:.1f}" height="{height - 4}" rx="3" fill="{colour}"/>')
    parts.append(f'<line x1="{x_t:.1f}" y1="0" x2="{x_t:.1f}" y2="{height}" stroke="#fff" stroke-width="4"/>')
    parts.append(f'<line x1="{x_t:.1f}" y1="0" x2="{x_t:.1f}" y2="{height}" stroke="{THRESHOLD_COLOUR}" stroke-width="2"/>')
    parts.append(f"<title>score {'-' if score is None else f'{score:.3f}'} / threshold {threshold:g}</title></svg>")
    return "".join(parts)
