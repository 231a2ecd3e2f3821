"""Exports of stored results: CSV (one flat row per part) and JSON (one object per part, defects nested).

Timestamps are Unix seconds, with ISO 8601 UTC copies (``*_at``) in CSV for spreadsheets. The JSON
``verdict`` is the verdict object exactly as it was published, plus ``stored_ts`` (when it was committed).
"""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Iterable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from storage.store import PartRecord

EXPORT_FORMATS = ("csv", "json")

CSV_COLUMNS = (
    "cell",
    "part_id",
    "recipe",
    "recipe_version",
    "state",
    "started_ts",
    "started_at",
    "finished_ts",
    "finished_at",
    "expected_views",
    "views_recorded",
    "verdict",
    "score",
    "threshold",
    "n_views",
    "n_defects",
    "max_peak_score",
    "placement_dx_m",
    "placement_dy_m",
    "placement_dz_m",
    "placement_rotation_deg",
    "total_ms",
    "per_view_mean_ms",
    "finalise_ms",
    "verdict_ts",
    "agent_version",
    "incomplete_reason",
)


def iso_utc(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds")


def part_row(record: PartRecord) -> dict[str, Any]:
    """The flat CSV row of a part (keys: CSV_COLUMNS); verdict fields are None when there is no verdict."""
    v = record.verdict
    placement = (v.placement if v is not None else None) or {}
    translation = placement.get("translation_m") or [None, None, None]
    timings = v.timings_ms if v is not None else {}
    return {
        "cell": record.cell,
        "part_id": record.part_id,
        "recipe": record.recipe,
        "recipe_version": record.recipe_version,
        "state": record.state,
        "started_ts": record.started_ts,
        "started_at": iso_utc(record.started_ts),
        "finished_ts": record.finished_ts,
        "finished_at": iso_utc(record.finished_ts),
        "expected_views": record.expected_views,
        "views_recorded": record.views_recorded,
        "verdict": v.verdict if v else None,
        "score": v.score if v else None,
        "threshold": v.threshold if v else None,
        "n_views": v.n_views if v else None,
        "n_defects": len(v.defects) if v else None,
        "max_peak_score": max((d.peak_score for d in v.defects), default=None) if v else None,
        "placement_dx_m": translation[0],
        "placement_dy_m": translation[1],
        "placement_dz_m": translation[2],
        "placement_rotation_deg": placement.get("rotation_deg"),
        "total_ms": timings.get("total"),
        "per_view_mean_ms": timings.get("per_view_mean"),
        "finalise_ms": timings.get("finalise"),
        "verdict_ts": v.ts if v else None,
        "agent_version": v.agent_version if v else None,
        "incomplete_reason": record.incomplete_reason,
    }


def part_document(record: PartRecord) -> dict[str, Any]:
    """The JSON object of a part: its fields, ``meta``, and the published verdict (defects nested) or null."""
    doc: dict[str, Any] = {
        "cell": record.cell,
        "part_id": record.part_id,
        "recipe": record.recipe,
        "recipe_version": record.recipe_version,
        "state": record.state,
        "started_ts": record.started_ts,
        "finished_ts": record.finished_ts,
        "expected_views": record.expected_views,
        "views_recorded": record.views_recorded,
        "meta": record.meta,
        "incomplete_reason": record.incomplete_reason,
        "verdict": None if record.verdict is None else {**record.verdict.payload, "stored_ts": record.verdict.created_ts},
    }
    if record.views:
        doc["views"] = [
            {
                "frame_id": w.frame_id,
                "camera_id": w.camera_id,
                "ts": w.ts,
                "c2w": w.c2w,
                "view_score": w.view_score,
                "latency_ms": w.latency_ms,
                "timings_ms": w.timings_ms,
                "anomaly_map_path": w.anomaly_map_path,
            }
            for w in record.views
        ]
    return doc


def write_export(records: Iterable[PartRecord], path: str | Path, fmt: str) -> int:
    """Write ``records`` to ``path`` (replaced atomically) as ``csv`` or ``json``; returns how many."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"export format must be one of {EXPORT_FORMATS}, got {fmt!r}")
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot export to {path}: directory {path.parent} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    n = 0
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; give it the permissions of a normal new file
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            if fmt == "csv":
                writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
                writer.writeheader()
                for record in records:
                    writer.writerow(part_row(record))
                    n += 1
            else:
                f.write("[")
                for record in records:
                    f.write(",\n " if n else "\n ")
                    json.dump(part_document(record), f, allow_nan=False)
                    n += 1
                f.write("\n]\n" if n else "]\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
