"""`agent results ...`: list, show and export stored results; migrate the results database.

Every command takes ``--db URL`` (default: ``$AGENT_DB_URL``, else SQLite at
``$XDG_DATA_HOME/edge-inspection-agent/results.db``). Only ``migrate`` changes the schema; the other
commands refuse a database that is missing or not at the current schema revision.
"""

from __future__ import annotations

import json
import re
import time
from datetime import datetime
from enum import Enum
from pathlib import Path

import typer
from rich import box
from rich.console import Console
from rich.table import Table
from sqlalchemy.exc import OperationalError

from storage.db import DB_URL_ENV, default_db_url, redact, sqlite_path
from storage.export import EXPORT_FORMATS
from storage.migrate import SchemaError, upgrade_to_head
from storage.models import PART_STATES, VERDICTS
from storage.store import PartFilter, ResultStore

results_app = typer.Typer(help="Stored inspection results: list, show, export; migrate the results database.", no_args_is_help=True)

DB_OPTION = typer.Option(None, "--db", help=f"Database URL (SQLAlchemy). Default: ${DB_URL_ENV}, else SQLite at $XDG_DATA_HOME/edge-inspection-agent/results.db.")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)([smhd])")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


ExportFormat = Enum("ExportFormat", {f: f for f in EXPORT_FORMATS}, type=str)


def parse_since(text: str | None, now: float | None = None) -> float | None:
    """Unix seconds from ``1732190000``, an ISO 8601 date/time (local time unless it has an offset) or an age (``30m``, ``2h``, ``7d``)."""
    if text is None:
        return None
    text = text.strip()
    now = time.time() if now is None else now
    if m := _DURATION.fullmatch(text):
        return now - float(m.group(1)) * _UNIT_S[m.group(2)]
    try:
        return float(text)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not Unix seconds, an ISO 8601 date/time or an age like 30m, 2h, 7d", param_hint="--since") from None


def _local(ts: float | None, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    return "" if ts is None else datetime.fromtimestamp(ts).astimezone().strftime(fmt)


def _num(value: float | None, fmt: str = ".3f") -> str:
    return "" if value is None else format(value, fmt)


def _open(db: str | None) -> ResultStore:
    url = db or default_db_url()
    try:
        path = sqlite_path(url)
        if path is not None and not path.exists():
            raise typer.BadParameter(f"no results database at {path} (set --db or ${DB_URL_ENV})", param_hint="--db")
        return ResultStore(url, migrate=False)
    except (SchemaError, ValueError) as e:
        raise typer.BadParameter(str(e), param_hint="--db") from None
    except OperationalError as e:
        raise typer.BadParameter(f"cannot open results database {redact(url)}: {e.orig or e}", param_hint="--db") from None


def _filters(cell, recipe, verdict, state, since, limit) -> PartFilter:  # noqa: ANN001
    if verdict is not None and verdict not in (*VERDICTS, "none"):
        raise typer.BadParameter(f"must be one of {', '.join((*VERDICTS, 'none'))}, got {verdict!r}", param_hint="--verdict")
    if state is not None and state not in PART_STATES:
        raise typer.BadParameter(f"must be one of {', '.join(PART_STATES)}, got {state!r}", param_hint="--state")
    return PartFilter(cell=cell, recipe=recipe, verdict=verdict, state=state, since=parse_since(since), limit=limit)


CELL = typer.Option(None, "--cell", help="Only this cell.")
RECIPE = typer.Option(None, "--recipe", help="Only this recipe.")
VERDICT = typer.Option(None, "--verdict", help="Only this verdict: pass, fail, incomplete, or none (no verdict yet).")
STATE = typer.Option(None, "--state", help=f"Only parts in this state: {', '.join(PART_STATES)}.")
SINCE = typer.Option(None, "--since", help="Only parts started since: Unix seconds, ISO 8601 (local time unless offset), or an age like 30m, 2h, 7d.")


@results_app.command("list")
def list_command(
    db: str = DB_OPTION,
    cell: str = CELL,
    recipe: str = RECIPE,
    verdict: str = VERDICT,
    state: str = STATE,
    since: str = SINCE,
    limit: int = typer.Option(50, "--limit", min=1, help="At most this many parts (newest first)."),
) -> None:
    """List parts, newest first."""
    filters = _filters(cell, recipe, verdict, state, since, limit)
    with _open(db) as store:
        parts = store.list_parts(filters)
    # Fits 80 columns: one space between columns and no vertical rules; the part state only where there is no
    # verdict (a verdict implies it); the start without the year (newest first; `show` has the full date); the
    # cell in the title when every part listed is of one cell. Long ids fold rather than push the table wider.
    cells = sorted({p.cell for p in parts})
    one_cell = len(cells) == 1
    title = f"{len(parts)} part(s)" + (f" of cell {cells[0]}" if one_cell else "") + f" in {redact(db or default_db_url())}"
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=0)
    columns = (("started", "left"), ("cell", "left"), ("part", "left"), ("recipe", "left"), ("result", "left"),
               ("score", "right"), ("defects", "right"), ("views", "right"))  # fmt: skip
    for name, justify in columns:
        if name == "cell" and one_cell:
            continue
        table.add_column(name, justify=justify, overflow="fold", no_wrap=name not in ("cell", "part", "recipe"))
    style = {"pass": "green", "fail": "bold red", "incomplete": "yellow"}
    for p in parts:
        views = f"{p.views_recorded}" + (f"/{p.expected_views}" if p.expected_views else "")
        shown = f"[{style[p.verdict]}]{p.verdict}[/]" if p.verdict else p.state.replace("_", " ")
        row = [_local(p.started_ts, "%m-%d %H:%M:%S"), p.cell, p.part_id, p.recipe, shown, _num(p.score), str(p.n_defects) if p.verdict else "", views]
        table.add_row(*(row[:1] + row[2:] if one_cell else row))
    Console().print(table)


@results_app.command("show")
def show_command(
    part_id: str = typer.Argument(..., help="The part id."),
    db: str = DB_OPTION,
    cell: str = typer.Option(None, "--cell", help="The part's cell (needed when the id exists in several cells)."),
    as_json: bool = typer.Option(False, "--json", help="Print the part as JSON (the export's object, with views)."),
) -> None:
    """Show one part: its verdict, defects and views."""
    from storage.export import part_document

    with _open(db) as store:
        try:
            part = store.get_part(part_id, cell)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--cell") from None
    if part is None:
        typer.echo(f"no part {part_id!r}" + (f" in cell {cell!r}" if cell else ""), err=True)
        raise typer.Exit(1)
    if as_json:
        typer.echo(json.dumps(part_document(part), indent=2))
        return
    console = Console()
    console.print(f"[bold]{part.cell}/{part.part_id}[/]  recipe {part.recipe} ({part.recipe_version or 'version unknown'})  state {part.state}")
    console.print(f"started {_local(part.started_ts)}  finished {_local(part.finished_ts) or '-'}  views {len(part.views)}" + (f"/{part.expected_views}" if part.expected_views else ""))
    if part.meta:
        console.print(f"meta {json.dumps(part.meta)}")
    if part.incomplete_reason:
        console.print(f"[yellow]incomplete because[/] {part.incomplete_reason}")
    v = part.verdict
    if v is None:
        console.print("verdict: none yet")
    else:
        placement = "-"
        if v.placement is not None:
            t = v.placement["translation_m"]
            placement = f"translation [{', '.join(f'{x * 1000:.2f}' for x in t)}] mm, rotation {v.placement['rotation_deg']:.2f} deg"
        console.print(f"verdict [bold]{v.verdict}[/]  score {_num(v.score)} / threshold {_num(v.threshold)}  over {v.n_views} views  placement {placement}")
        console.print(f"timings ms {json.dumps(v.timings_ms)}  agent {v.agent_version}  verdict ts {_local(v.ts)}  stored {_local(v.created_ts)}")
        if v.defects:
            table = Table(title=f"{len(v.defects)} defect(s), world frame, metres")
            for name in ("id", "centroid", "bbox min", "bbox max", "peak", "voxels", "frames"):
                table.add_column(name)
            for d in v.defects:
                vec = lambda xs: "[" + ", ".join(f"{x:.4f}" for x in xs) + "]"  # noqa: E731
                table.add_row(str(d.id), vec(d.centroid), vec(d.bbox_min), vec(d.bbox_max), _num(d.peak_score), str(d.n_voxels), ", ".join(d.frames))
            console.print(table)
    if part.views:
        table = Table(title="views")
        for name in ("frame", "camera", "time", "score", "latency ms", "anomaly map"):
            table.add_column(name)
        for w in part.views:
            table.add_row(w.frame_id, w.camera_id, _local(w.ts), _num(w.view_score), _num(w.latency_ms, ".1f"), w.anomaly_map_path or "")
        console.print(table)


@results_app.command("export")
def export_command(
    out: Path = typer.Option(..., "--out", help="File to write (replaced)."),
    fmt: ExportFormat = typer.Option(ExportFormat.csv, "--format", help="csv: one row per part with verdict fields; json: one object per part, defects nested."),
    db: str = DB_OPTION,
    cell: str = CELL,
    recipe: str = RECIPE,
    verdict: str = VERDICT,
    state: str = STATE,
    since: str = SINCE,
    limit: int = typer.Option(None, "--limit", min=1, help="At most this many parts (newest first). Default: all."),
) -> None:
    """Export parts with their verdicts to CSV or JSON."""
    filters = _filters(cell, recipe, verdict, state, since, limit)
    with _open(db) as store:
        try:
            n = store.export(out, fmt.value, filters)
        except FileNotFoundError as e:
            raise typer.BadParameter(str(e), param_hint="--out") from None
    typer.echo(f"wrote {n} part(s) to {out}")


@results_app.command("errors")
def errors_command(
    db: str = DB_OPTION,
    cell: str = CELL,
    part_id: str = typer.Option(None, "--part", help="Only errors about this part."),
    since: str = SINCE,
    limit: int = typer.Option(50, "--limit", min=1, help="At most this many errors (newest first)."),
) -> None:
    """List errors the agent published, newest first."""
    with _open(db) as store:
        errors = store.list_errors(cell=cell, part_id=part_id, since=parse_since(since), limit=limit)
    table = Table(title=f"{len(errors)} error(s)")
    for name in ("time", "cell", "code", "part", "topic", "message"):
        table.add_column(name)
    for e in errors:
        table.add_row(_local(e.ts), e.cell, e.code, e.part_id or "", e.topic, e.message)
    Console().print(table)


@results_app.command("migrate")
def migrate_command(db: str = DB_OPTION) -> None:
    """Create the results database or bring its schema to the newest revision."""
    url = db or default_db_url()
    try:
        revision = upgrade_to_head(url)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--db") from None
    typer.echo(f"{redact(url)} is at schema revision {revision}")
