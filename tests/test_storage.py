"""storage/: migrations, idempotent writes, verdict durability, queries and exports, on SQLite and PostgreSQL."""

from __future__ import annotations

import csv
import json
import sqlite3
import threading

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Column, Integer, MetaData, create_engine, inspect, text

from agent.contract import ErrorMessage, Placement, Timings, Verdict, VerdictDefect
from agent.inspection import ViewResult
from storage import PartFilter, ResultStore, SchemaError, UnknownPartError, head_revision, make_engine, upgrade_to_head
from storage.db import normalise_url
from storage.models import PAYLOAD_EXCERPT_CHARS, Base
from storage.testing import postgres_unavailable_reason, temporary_database

TABLES = {"parts", "views", "verdicts", "defects", "errors", "alembic_version"}


@pytest.fixture(scope="session")
def pg_reason() -> str | None:
    return postgres_unavailable_reason()


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_db_url(request, tmp_path, pg_reason):
    """An empty database (no schema) of each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'results.db'}"
        return
    if pg_reason:
        pytest.skip(pg_reason)
    with temporary_database() as url:
        yield url.render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def pg_session_url(pg_reason):
    """One migrated PostgreSQL database for this test run (unique name: parallel runs do not collide)."""
    if pg_reason:
        pytest.skip(pg_reason)
    with temporary_database() as url:
        text_url = url.render_as_string(hide_password=False)
        upgrade_to_head(text_url)
        yield text_url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    """A migrated database with no rows, of each backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'results.db'}"
        upgrade_to_head(url)
        return url
    url = request.getfixturevalue("pg_session_url")
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("TRUNCATE parts, views, verdicts, defects, errors RESTART IDENTITY CASCADE"))
    finally:
        engine.dispose()
    return url


@pytest.fixture
def store(db_url):
    with ResultStore(db_url, migrate=False) as s:
        yield s


def make_verdict(part_id="p-0001", verdict="fail", ts=1000.0, n_defects=2, score=1.7) -> Verdict:
    defects = [
        VerdictDefect(id=i + 1, centroid=(0.1 * i, 0.2, 0.3), bbox_min=(0.1 * i - 0.01, 0.19, 0.29), bbox_max=(0.1 * i + 0.01, 0.21, 0.31),
                      peak_score=2.0 + i, n_voxels=10 + i, frames=["3", "4"])
        for i in range(n_defects)
    ]
    incomplete = verdict == "incomplete"
    return Verdict(
        part_id=part_id, recipe="stool", recipe_version="sha256:abc", verdict=verdict,
        score=None if incomplete else score, threshold=1.0, defects=defects, n_views=12,
        placement=None if incomplete else Placement(translation_m=(0.001, -0.002, 0.0), rotation_deg=1.2),
        timings_ms=Timings(total=2900.0, per_view_mean=210.0, finalise=120.0), ts=ts, agent_version="0.1.0",
    )


def view(frame_id="0", score=0.4) -> ViewResult:
    return ViewResult(frame_id=frame_id, view_score=score, latency_ms=180.0, timings_ms={"placement": 90.0, "features": 60.0})


def add_part(store, part_id="p-0001", cell="cell-1", recipe="stool", ts=1000.0, frames=("0", "1")):
    store.start_part(cell, part_id, recipe, ts=ts, expected_views=len(frames), meta={"line": 3})
    for i, f in enumerate(frames):
        store.record_view(cell, part_id, view(f, 0.1 * i), camera_id="cam0", ts=ts + i, c2w=np.eye(4))


# ------------------------------------------------------------------------------------- migrations


def test_migrations_create_the_schema_the_models_describe(empty_db_url):
    db_url = empty_db_url
    assert upgrade_to_head(db_url) == head_revision()
    assert upgrade_to_head(db_url) == head_revision()  # a second run is a no-op
    engine = make_engine(db_url)
    try:
        assert set(inspect(engine).get_table_names()) == TABLES
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": True})
            assert ctx.get_current_revision() == head_revision()
            assert compare_metadata(ctx, Base.metadata) == []
            # the comparison is not vacuous: a column the migrations lack shows up
            drifted = MetaData()
            for table in Base.metadata.tables.values():
                table.to_metadata(drifted)
            drifted.tables["parts"].append_column(Column("operator", Integer))
            diff = compare_metadata(ctx, drifted)
            assert [d[0] for d in diff] == ["add_column"] and diff[0][3].name == "operator"
    finally:
        engine.dispose()


def test_schema_is_created_only_through_migrations(empty_db_url):
    db_url = empty_db_url
    with pytest.raises(SchemaError, match="never migrated"):
        ResultStore(db_url, migrate=False)
    upgrade_to_head(db_url)
    with ResultStore(db_url, migrate=False) as s:
        assert s.list_parts() == []


def test_agents_starting_together_migrate_safely(empty_db_url):
    errors: list[Exception] = []

    def migrate() -> None:
        try:
            upgrade_to_head(empty_db_url)
        except Exception as e:  # collected: the assertion below shows them
            errors.append(e)

    threads = [threading.Thread(target=migrate, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "concurrent migrations deadlocked"
    assert errors == []
    ResultStore(empty_db_url, migrate=False).close()


def test_sqlite_connection_settings(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'sub' / 'r.db'}")  # creates the directory
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
    finally:
        engine.dispose()


def test_plain_postgresql_url_uses_psycopg3():
    assert normalise_url("postgresql://u@h/db").drivername == "postgresql+psycopg"
    assert normalise_url("postgres://u@h/db").drivername == "postgresql+psycopg"
    with pytest.raises(ValueError, match="not a valid SQLAlchemy URL"):
        normalise_url("not a url")


# ------------------------------------------------------------------------------------ idempotence


def test_start_part_is_idempotent(store):
    assert store.start_part("cell-1", "p-0001", "stool", ts=1000.0, expected_views=12, meta={"shift": "A"})
    assert not store.start_part("cell-1", "p-0001", "other", ts=1005.0)  # redelivery: first start kept
    assert store.start_part("cell-2", "p-0001", "stool", ts=1001.0)  # same id, other cell: another part
    part = store.get_part("p-0001", "cell-1")
    assert (part.recipe, part.state, part.started_ts, part.expected_views, part.meta) == ("stool", "in_progress", 1000.0, 12, {"shift": "A"})
    with pytest.raises(ValueError, match="several cells"):
        store.get_part("p-0001")


def test_record_view_is_idempotent(store):
    with pytest.raises(UnknownPartError, match="never started"):
        store.record_view("cell-1", "ghost", view(), camera_id="cam0", ts=1.0, c2w=np.eye(4))
    store.start_part("cell-1", "p-0001", "stool", ts=1000.0)
    c2w = np.eye(4)
    c2w[:3, 3] = [0.1, 0.2, 0.5]
    assert store.record_view("cell-1", "p-0001", view("7", 0.3), camera_id="cam0", ts=1001.0, c2w=c2w, anomaly_map_path="/maps/7.npy")
    assert not store.record_view("cell-1", "p-0001", view("7", 9.9), camera_id="cam0", ts=1002.0, c2w=np.eye(4))
    views = store.get_part("p-0001", "cell-1").views
    assert len(views) == 1
    v = views[0]
    assert (v.frame_id, v.camera_id, v.ts, v.view_score, v.anomaly_map_path) == ("7", "cam0", 1001.0, 0.3, "/maps/7.npy")
    np.testing.assert_array_equal(np.array(v.c2w), c2w)
    assert v.timings_ms == {"placement": 90.0, "features": 60.0}


def test_revise_view_replaces_the_score_and_timings_only(store):
    store.start_part("cell-1", "p-0001", "stool", ts=1000.0)
    store.record_view("cell-1", "p-0001", view("7", 0.3), camera_id="cam0", ts=1001.0, c2w=np.eye(4), anomaly_map_path="/maps/7.npy")
    final = ViewResult("7", 0.8, 5.0, None, {"placement": 90.0, "rescore": 70.0})
    assert store.revise_view("cell-1", "p-0001", final)
    v = store.get_part("p-0001", "cell-1").views[0]
    assert (v.view_score, v.timings_ms) == (0.8, {"placement": 90.0, "rescore": 70.0})
    assert (v.ts, v.latency_ms, v.anomaly_map_path) == (1001.0, view("7").latency_ms, "/maps/7.npy")
    assert not store.revise_view("cell-1", "p-0001", ViewResult("8", 0.1, 1.0))  # never recorded
    assert not store.revise_view("cell-1", "ghost", final)
    with pytest.raises(ValueError, match="view_score must be finite"):
        store.revise_view("cell-1", "p-0001", ViewResult("7", float("inf"), 1.0))
    assert store.get_part("p-0001", "cell-1").views[0].view_score == 0.8


def test_bad_values_are_refused_with_the_field_named(store):
    store.start_part("cell-1", "p-0001", "stool", ts=1000.0)
    with pytest.raises(ValueError, match="view_score must be finite"):
        store.record_view("cell-1", "p-0001", view("0", float("nan")), camera_id="c", ts=1.0, c2w=np.eye(4))
    with pytest.raises(ValueError, match="c2w must be a finite 4x4"):
        store.record_view("cell-1", "p-0001", view("0"), camera_id="c", ts=1.0, c2w=np.eye(3))
    assert store.get_part("p-0001", "cell-1").views == []


def test_concurrent_redelivery_stores_once(store):
    """Worker threads sharing one store: duplicates racing each other are stored exactly once."""
    store.start_part("cell-1", "p-0001", "stool", ts=1000.0)
    results: dict[str, list[bool]] = {"view": [], "verdict": []}
    barrier = threading.Barrier(6)

    def worker(i: int) -> None:
        barrier.wait()
        results["view"].append(store.record_view("cell-1", "p-0001", view("5"), camera_id="cam0", ts=1000.5, c2w=np.eye(4)))
        results["verdict"].append(store.record_verdict("cell-1", make_verdict(score=1.0 + i)))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results["view"]) == [False] * 5 + [True]
    assert sorted(results["verdict"]) == [False] * 5 + [True]
    part = store.get_part("p-0001", "cell-1")
    assert len(part.views) == 1 and len(part.verdict.defects) == 2


# --------------------------------------------------------------------------------------- verdicts


def test_verdict_is_committed_once_and_readable_from_a_fresh_connection(db_url, store):
    add_part(store)
    first = make_verdict()
    assert store.record_verdict("cell-1", first, created_ts=1003.0)
    assert not store.record_verdict("cell-1", make_verdict(verdict="pass", score=0.2, n_defects=0))  # refused

    # committed: another engine (another process, in effect) sees it without the store's help
    engine = create_engine(normalise_url(db_url))
    try:
        with engine.connect() as conn:
            rows = conn.execute(text("SELECT v.verdict, v.score, p.state, p.finished_ts FROM verdicts v JOIN parts p ON p.id = v.part_pk")).all()
            assert [tuple(r) for r in rows] == [("fail", 1.7, "finalised", 1000.0)]
            assert conn.execute(text("SELECT count(*) FROM defects")).scalar() == 2
    finally:
        engine.dispose()
    if db_url.startswith("sqlite"):  # and the raw driver too
        with sqlite3.connect(db_url.removeprefix("sqlite:///")) as raw:
            assert raw.execute("SELECT payload FROM verdicts").fetchone()[0] == json.dumps(first.to_dict(), separators=(", ", ": "))

    with ResultStore(db_url, migrate=False) as fresh:
        part = fresh.get_part("p-0001")
    v = part.verdict
    assert v.payload == json.loads(first.to_payload())  # exactly what is published
    assert (v.verdict, v.score, v.threshold, v.n_views, v.agent_version, v.created_ts) == ("fail", 1.7, 1.0, 12, "0.1.0", 1003.0)
    assert v.placement == {"translation_m": [0.001, -0.002, 0.0], "rotation_deg": 1.2}
    assert v.timings_ms == {"total": 2900.0, "per_view_mean": 210.0, "finalise": 120.0}
    assert [d.id for d in v.defects] == [1, 2]
    assert v.defects[1].centroid == [0.1, 0.2, 0.3] and v.defects[1].frames == ["3", "4"] and v.defects[1].n_voxels == 11
    assert part.recipe_version == "sha256:abc" and part.state == "finalised" and part.views_recorded == 2


def test_incomplete_verdict_and_part_created_from_a_verdict(store):
    # no part/start was recorded: the verdict still must be stored before it is published
    assert store.record_verdict("cell-1", make_verdict(part_id="p-late", verdict="incomplete", ts=2000.0, n_defects=0))
    part = store.get_part("p-late", "cell-1")
    assert (part.state, part.recipe, part.started_ts, part.finished_ts) == ("incomplete", "stool", 2000.0, 2000.0)
    assert part.verdict.score is None and part.verdict.placement is None and part.verdict.defects == []


def test_incomplete_reason_is_kept_with_the_part(store, tmp_path):
    add_part(store, "p-short", frames=("0",))
    reason = "1 usable views, the recipe needs 6 (part_end)"
    assert store.record_verdict("cell-1", make_verdict(part_id="p-short", verdict="incomplete", n_defects=0), reason=reason)
    assert store.get_part("p-short").incomplete_reason == reason
    assert next(store.iter_part_records()).incomplete_reason == reason
    store.export(tmp_path / "parts.csv", "csv")
    store.export(tmp_path / "parts.json", "json")
    with (tmp_path / "parts.csv").open(newline="") as f:
        assert next(csv.DictReader(f))["incomplete_reason"] == reason
    assert json.loads((tmp_path / "parts.json").read_text())[0]["incomplete_reason"] == reason
    add_part(store, "p-ok")
    with pytest.raises(ValueError, match="incomplete verdicts only"):  # a pass or fail has no such reason
        store.record_verdict("cell-1", make_verdict(part_id="p-ok", verdict="pass", n_defects=0), reason="why?")
    assert store.get_part("p-ok").verdict is None and store.get_part("p-ok").state == "in_progress"
    assert store.record_verdict("cell-1", make_verdict(part_id="p-ok", verdict="pass", n_defects=0))
    assert store.get_part("p-ok").incomplete_reason is None


def test_migration_0002_adds_the_reason_to_existing_parts_and_downgrades(empty_db_url):
    from alembic import command

    from storage.migrate import alembic_config, current_revision, upgrade_engine

    engine = make_engine(empty_db_url)
    try:
        upgrade_engine(engine, "0001")
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO parts (cell, part_id, recipe, state, started_ts, meta) VALUES ('c', 'old', 'stool', 'incomplete', 1.0, '{}')"))
        upgrade_engine(engine)
        assert current_revision(engine) == "0002" == head_revision()
        with ResultStore(engine=engine, migrate=False) as store:
            old = store.get_part("old")
            assert (old.state, old.incomplete_reason) == ("incomplete", None)  # rows from before 0002 have no reason
        with engine.connect() as conn:
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0001")
            conn.commit()
        assert "incomplete_reason" not in {c["name"] for c in inspect(engine).get_columns("parts")}
        assert current_revision(engine) == "0001"
    finally:
        engine.dispose()


def test_fail_part(store):
    store.start_part("cell-1", "p-0001", "stool", ts=1000.0)
    assert store.fail_part("cell-1", "p-0001", ts=1010.0)
    assert not store.fail_part("cell-1", "p-0001", ts=1011.0)
    part = store.get_part("p-0001")
    assert (part.state, part.finished_ts) == ("failed", 1010.0)
    with pytest.raises(UnknownPartError):
        store.fail_part("cell-1", "nope", ts=1.0)


def test_record_error(store):
    store.record_error("cell-1", ErrorMessage(ts=5.0, code="bad_json", message="payload is not UTF-8 JSON", topic="inspect/cell-1/part/start"), payload=b"\xff{\x00")
    long_payload = b'{"part_id": "p-9", "image": "' + b"A" * 5000 + b'"}'
    store.record_error("cell-1", ErrorMessage(ts=6.0, code="bad_image", message="cannot decode", topic="inspect/cell-1/camera/c/frame", part_id="p-9"), payload=long_payload)
    errors = store.list_errors()
    assert [e.code for e in errors] == ["bad_image", "bad_json"]
    assert errors[1].payload_excerpt == "\ufffd{\ufffd" and errors[1].part_id is None
    assert len(errors[0].payload_excerpt) == PAYLOAD_EXCERPT_CHARS and errors[0].payload_excerpt.startswith('{"part_id": "p-9"')
    assert [e.code for e in store.list_errors(part_id="p-9")] == ["bad_image"]
    assert store.list_errors(since=5.5, cell="cell-1")[0].ts == 6.0


# ---------------------------------------------------------------------------------- queries, export


@pytest.fixture
def filled(store):
    """Four parts: p-1 pass (cell-1), p-2 fail (cell-1), p-3 in progress (cell-1, recipe bracket), p-4 incomplete (cell-2)."""
    add_part(store, "p-1", ts=100.0)
    store.record_verdict("cell-1", make_verdict("p-1", "pass", ts=110.0, n_defects=0, score=0.4))
    add_part(store, "p-2", ts=200.0, frames=("0", "1", "2"))
    store.record_verdict("cell-1", make_verdict("p-2", "fail", ts=210.0, n_defects=2, score=1.7))
    add_part(store, "p-3", ts=300.0, recipe="bracket", frames=("0",))
    add_part(store, "p-4", cell="cell-2", ts=400.0, frames=())
    store.record_verdict("cell-2", make_verdict("p-4", "incomplete", ts=410.0, n_defects=0))
    return store


def test_list_parts_filters(filled):
    ids = lambda **kw: [p.part_id for p in filled.list_parts(**kw)]  # noqa: E731
    assert ids() == ["p-4", "p-3", "p-2", "p-1"]  # newest first
    assert ids(cell="cell-1") == ["p-3", "p-2", "p-1"]
    assert ids(recipe="bracket") == ["p-3"]
    assert ids(verdict="fail") == ["p-2"]
    assert ids(verdict="none") == ["p-3"]
    assert ids(state="incomplete") == ["p-4"]
    assert ids(since=200.0) == ["p-4", "p-3", "p-2"]
    assert ids(since=150.0, until=350.0) == ["p-3", "p-2"]
    assert ids(limit=2) == ["p-4", "p-3"]
    p2 = filled.list_parts(verdict="fail")[0]
    assert (p2.views_recorded, p2.expected_views, p2.n_defects, p2.score, p2.threshold, p2.state) == (3, 3, 2, 1.7, 1.0, "finalised")
    with pytest.raises(ValueError, match="verdict filter"):
        filled.list_parts(verdict="maybe")


def test_export_csv(filled, tmp_path):
    out = tmp_path / "parts.csv"
    assert filled.export(out, "csv", PartFilter(cell="cell-1")) == 3
    with out.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["part_id"] for r in rows] == ["p-3", "p-2", "p-1"]
    p2 = rows[1]
    assert (p2["verdict"], float(p2["score"]), int(p2["n_defects"]), float(p2["max_peak_score"])) == ("fail", 1.7, 2, 3.0)
    assert (float(p2["placement_dx_m"]), float(p2["placement_dy_m"]), float(p2["placement_rotation_deg"])) == (0.001, -0.002, 1.2)
    assert (float(p2["total_ms"]), int(p2["views_recorded"]), p2["started_at"]) == (2900.0, 3, "1970-01-01T00:03:20.000+00:00")
    assert rows[0]["verdict"] == "" and rows[0]["state"] == "in_progress" and rows[0]["score"] == ""


def test_export_json(filled, tmp_path):
    out = tmp_path / "parts.json"
    assert filled.export(out, "json") == 4
    docs = json.loads(out.read_text())
    assert [d["part_id"] for d in docs] == ["p-4", "p-3", "p-2", "p-1"]
    p2 = docs[2]
    assert p2["verdict"]["verdict"] == "fail" and p2["meta"] == {"line": 3} and p2["views_recorded"] == 3
    assert [d["id"] for d in p2["verdict"]["defects"]] == [1, 2]
    assert p2["verdict"]["defects"][0] == make_verdict("p-2", ts=210.0).defects[0].to_dict()
    assert docs[1]["verdict"] is None
    assert docs[0]["verdict"]["score"] is None and docs[0]["verdict"]["placement"] is None
    # empty selections are valid files too
    assert filled.export(out, "json", PartFilter(recipe="nothing")) == 0 and json.loads(out.read_text()) == []
    with pytest.raises(ValueError, match="export format"):
        filled.export(out, "xml")
