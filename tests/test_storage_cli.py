"""`agent results list|show|export|errors|migrate` (storage/cli.py) through Typer's CliRunner."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from typer.testing import CliRunner

from agent.contract import ErrorMessage, Placement, Timings, Verdict, VerdictDefect
from agent.inspection import ViewResult
from storage import DB_URL_ENV, ResultStore, head_revision
from storage.cli import parse_since, results_app
from storage.testing import postgres_unavailable_reason, temporary_database

runner = CliRunner()
WIDE = {"COLUMNS": "250", "NO_COLOR": "1"}


def run(*args: str, env: dict | None = None):
    return runner.invoke(results_app, list(args), env={**WIDE, **(env or {})})


def fill(url: str) -> None:
    """cell-1: p-pass (pass), p-fail (fail, 1 defect); cell-2: p-open (in progress); one error."""
    with ResultStore(url) as store:
        for cell, part_id, ts in (("cell-1", "p-pass", 100.0), ("cell-1", "p-fail", 200.0), ("cell-2", "p-open", 300.0)):
            store.start_part(cell, part_id, "stool", ts=ts, expected_views=2)
            store.record_view(cell, part_id, ViewResult("f0", 0.25, 150.0), camera_id="cam0", ts=ts + 1, c2w=np.eye(4), anomaly_map_path="/maps/f0.npy")
        for part_id, verdict, defects in (("p-pass", "pass", []), ("p-fail", "fail", [VerdictDefect(1, (0.01, 0.02, 0.03), (0.0, 0.01, 0.02), (0.02, 0.03, 0.04), 2.5, 17, ["f0"])])):
            store.record_verdict(
                "cell-1",
                Verdict(part_id, "stool", "sha256:abc", verdict, 0.5 if verdict == "pass" else 2.0, 1.0, defects, 1,
                        Placement((0.001, 0.0, 0.0), 0.5), Timings(900.0, 150.0, 40.0), 250.0, "0.1.0"),
            )
        store.record_error("cell-1", ErrorMessage(ts=150.0, code="no_pose", message="no robot pose within 20 ms", topic="inspect/cell-1/camera/cam0/frame", part_id="p-fail"))


@pytest.fixture
def db(tmp_path) -> str:
    url = f"sqlite:///{tmp_path / 'results.db'}"
    fill(url)
    return url


def test_list(db):
    result = run("list", "--db", db)
    assert result.exit_code == 0, result.output
    assert "3 part(s)" in result.output
    for part_id in ("p-pass", "p-fail", "p-open"):
        assert part_id in result.output
    result = run("list", "--db", db, "--verdict", "fail")
    assert result.exit_code == 0 and "p-fail" in result.output and "p-pass" not in result.output and "1 part(s)" in result.output
    result = run("list", "--db", db, "--cell", "cell-2", "--since", "250")
    assert "p-open" in result.output and "p-fail" not in result.output
    result = run("list", "--db", db, "--verdict", "maybe")
    assert result.exit_code == 2 and "--verdict" in result.output


def test_list_fits_80_columns(db):
    result = run("list", "--db", db, env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert max(len(line) for line in lines) <= 80, result.output
    for part_id in ("p-pass", "p-fail", "p-open"):  # whole: ids are not folded at this width
        assert any(part_id in line for line in lines), result.output
    assert "in progress" in result.output  # the state where there is no verdict yet
    result = run("list", "--db", db, "--cell", "cell-1", env={"COLUMNS": "80"})
    assert "2 part(s) of cell cell-1" in result.output and "cell-2" not in result.output


def test_show_says_why_a_part_is_incomplete(db):
    with ResultStore(db) as store:
        store.start_part("cell-1", "p-short", "stool", ts=400.0, expected_views=6)
        store.record_verdict("cell-1", Verdict("p-short", "stool", "sha256:abc", "incomplete", None, 1.0, [], 1, None, Timings(900.0, 150.0, 0.0), 450.0, "0.1.0"),
                             reason="1 usable views, the recipe needs 3 (part_end)")  # fmt: skip
    result = run("show", "p-short", "--db", db)
    assert result.exit_code == 0, result.output
    assert "incomplete because 1 usable views, the recipe needs 3 (part_end)" in result.output
    assert json.loads(run("show", "p-short", "--db", db, "--json").output)["incomplete_reason"] == "1 usable views, the recipe needs 3 (part_end)"
    assert "incomplete because" not in run("show", "p-fail", "--db", db).output


def test_db_url_from_environment(db):
    result = run("list", env={DB_URL_ENV: db})
    assert result.exit_code == 0 and "3 part(s)" in result.output


def test_show(db):
    result = run("show", "p-fail", "--db", db)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "cell-1/p-fail" in out and "verdict fail" in out and "score 2.000" in out
    assert "[0.0100, 0.0200, 0.0300]" in out and "17" in out  # the defect row
    assert "cam0" in out and "/maps/f0.npy" in out  # the view row
    result = run("show", "p-fail", "--db", db, "--json")
    doc = json.loads(result.output)
    assert doc["verdict"]["defects"][0]["n_voxels"] == 17 and doc["views"][0]["frame_id"] == "f0"
    result = run("show", "nope", "--db", db)
    assert result.exit_code == 1 and "no part 'nope'" in result.output


def test_export(db, tmp_path):
    out = tmp_path / "parts.csv"
    result = run("export", "--db", db, "--format", "csv", "--out", str(out), "--cell", "cell-1")
    assert result.exit_code == 0, result.output
    assert "wrote 2 part(s)" in result.output
    with out.open(newline="") as f:
        rows = {r["part_id"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"p-pass", "p-fail"}
    assert (rows["p-fail"]["verdict"], rows["p-fail"]["n_defects"], rows["p-pass"]["n_defects"]) == ("fail", "1", "0")

    out = tmp_path / "parts.json"
    result = run("export", "--db", db, "--format", "json", "--out", str(out))
    assert result.exit_code == 0, result.output
    docs = {d["part_id"]: d for d in json.loads(out.read_text())}
    assert set(docs) == {"p-pass", "p-fail", "p-open"}
    assert docs["p-fail"]["verdict"]["defects"][0]["centroid"] == [0.01, 0.02, 0.03] and docs["p-open"]["verdict"] is None

    result = run("export", "--db", db, "--format", "json", "--out", str(tmp_path / "missing" / "x.json"))
    assert result.exit_code == 2 and "does not exist" in result.output


def test_errors(db):
    result = run("errors", "--db", db, "--part", "p-fail")
    assert result.exit_code == 0 and "no_pose" in result.output and "1 error(s)" in result.output


def test_missing_or_unmigrated_database_is_a_clear_error(tmp_path):
    missing = tmp_path / "none.db"
    result = run("list", "--db", f"sqlite:///{missing}")
    assert result.exit_code == 2 and "no results database" in result.output and not missing.exists()
    empty = tmp_path / "empty.db"
    empty.touch()
    result = run("list", "--db", f"sqlite:///{empty}")
    assert result.exit_code == 2 and "never migrated" in result.output
    result = run("migrate", "--db", f"sqlite:///{empty}")
    assert result.exit_code == 0 and f"schema revision {head_revision()}" in result.output
    assert run("list", "--db", f"sqlite:///{empty}").exit_code == 0


def test_parse_since():
    assert parse_since("1732190000") == 1732190000.0
    assert parse_since("2h", now=10_000.0) == 10_000.0 - 7200
    assert parse_since("2024-11-21T12:00:00+00:00") == 1732190400.0
    with pytest.raises(Exception, match="not Unix seconds"):
        parse_since("yesterday")


def test_cli_on_postgresql(tmp_path):
    reason = postgres_unavailable_reason()
    if reason:
        pytest.skip(reason)
    with temporary_database() as server_url:
        url = server_url.render_as_string(hide_password=False).replace("postgresql+psycopg://", "postgresql://")  # plain URL works
        assert run("migrate", "--db", url).exit_code == 0
        fill(url)
        result = run("list", "--db", url, "--verdict", "pass")
        assert result.exit_code == 0 and "p-pass" in result.output and "p-fail" not in result.output
        out = tmp_path / "pg.json"
        assert run("export", "--db", url, "--format", "json", "--out", str(out)).exit_code == 0
        assert len(json.loads(out.read_text())) == 3
