"""Operator views of inspected parts: self-contained HTML reports, the line summary, 3D exports.

- :func:`render_part_report` / :func:`part_report_html`: one part's page (verdict, score against the
  threshold, each view with its heatmap, the defects with their 3D positions, timings, recipe version,
  the line's score history, per-view scores and an interactive 3D view of the anomaly volume).
- :func:`render_line_summary` / :func:`write_line_summary`: one page over many parts, linking each part's report.
- :mod:`agent.report.volume3d`: the anomaly volume and defects as a coloured point cloud PLY.
- ``agent report PART_ID`` (agent/report/cli.py) on the command line.

Pages embed everything (images as data URIs, inline SVG plots, the bundled three.js viewer from
agent/report/static/viewer.min.js): they load nothing from the network.
"""

from agent.report.render import (
    PartNotFoundError,
    PartReport,
    collect_part_report,
    part_report_html,
    render_line_summary,
    render_part_report,
    report_filename,
    write_line_summary,
)

__all__ = [
    "PartNotFoundError",
    "PartReport",
    "collect_part_report",
    "part_report_html",
    "render_line_summary",
    "render_part_report",
    "report_filename",
    "write_line_summary",
]
