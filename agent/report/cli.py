"""``agent report PART_ID``: a part's self-contained HTML report, and optionally its anomaly point cloud (PLY)."""

from __future__ import annotations

import os
from pathlib import Path

import typer

from storage.db import DB_URL_ENV


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _open_store(db: str | None):
    """The results store, read-only use: refuses a missing SQLite file or a database without the schema."""
    from sqlalchemy.exc import OperationalError

    from storage import ResultStore, SchemaError, default_db_url
    from storage.db import redact, sqlite_path

    url = db or default_db_url()
    try:
        path = sqlite_path(url)
        if path is not None and not path.exists():
            _fail(f"no results database at {path} (set --db or ${DB_URL_ENV})")
        return ResultStore(url, migrate=False)
    except (SchemaError, ValueError) as e:
        _fail(str(e))
    except OperationalError as e:
        _fail(f"cannot open results database {redact(url)}: {e.orig or e}")


def report_command(
    part_id: str = typer.Argument(..., help="The part id."),
    cell: str = typer.Option(None, "--cell", help="The part's cell (needed when the id exists in several cells)."),
    db: str = typer.Option(None, "--db", help=f"Results database URL (SQLAlchemy). Default: ${DB_URL_ENV}, else SQLite at $XDG_DATA_HOME/edge-inspection-agent/results.db."),
    artifacts: Path = typer.Option(None, "--artifacts", help="The artifacts folder (artifacts.dir of the service's config). Default: the folder of the anomaly maps the store names."),
    out: Path = typer.Option(None, "--out", help="HTML file to write (replaced). Default: ./<cell>__<part_id>.html."),
    ply: Path = typer.Option(None, "--ply", help="Also write the anomaly volume and defects as a coloured point cloud PLY (MeshLab, CloudCompare)."),
) -> None:
    """Write one part's report: verdict, score against the threshold, each view with its heatmap, defects in 3D,
    timings, recipe version, the line's score history and an interactive 3D view. Self-contained HTML."""
    from agent.report.render import PartNotFoundError, write_page, collect_part_report, part_report_html, report_filename
    from agent.report.volume3d import write_anomaly_ply

    if artifacts is not None and not artifacts.is_dir():
        _fail(f"--artifacts {artifacts} is not a directory")
    with _open_store(db) as store:
        try:
            report = collect_part_report(store, part_id, cell, artifacts)
        except (PartNotFoundError, ValueError) as e:
            _fail(str(e))
    part, verdict = report.part, report.part.verdict
    out = out if out is not None else Path(report_filename(part.cell, part.part_id))
    if out.is_dir():
        _fail(f"--out {out} is a directory; give the HTML file to write")
    ply_href = None
    if ply is not None:
        if report.volume is None or not len(report.volume):
            _fail(f"part {part.part_id!r} has no anomaly volume to export" + (f" ({report.notes[0]})" if report.notes else ""))
        write_anomaly_ply(ply, report.volume, verdict.defects if verdict else [], verdict.threshold if verdict else 1.0, part=f"{part.cell}/{part.part_id}")
        ply_href = os.path.relpath(ply.resolve(), out.resolve().parent)
        typer.echo(f"wrote {ply} ({len(report.volume)} voxels, {len(verdict.defects) if verdict else 0} defects)")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_page(out, part_report_html(report, ply_href=ply_href))
    typer.echo(f"wrote {out} ({part.cell}/{part.part_id}: {verdict.verdict if verdict else part.state})")
    for note in report.notes:
        typer.echo(f"note: {note}", err=True)
