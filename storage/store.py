"""The repository the service writes results through and the CLI reads them with.

:class:`ResultStore` opens one engine and uses one session per call, so one instance can be shared
by worker threads. Writes are idempotent under MQTT's at-least-once delivery: a repeated part start,
view or verdict is ignored and the call says so (``False``). :meth:`ResultStore.record_verdict`
returns only after the commit, so a verdict is durable before the service publishes it.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from sqlalchemy import Engine, Select, func, select
from sqlalchemy.engine import URL
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from agent.contract import ErrorMessage, Verdict
from agent.inspection import ViewResult
from storage.db import WRITE_OPTION, default_db_url, make_engine, redact
from storage.migrate import check_schema, upgrade_engine
from storage.models import PAYLOAD_EXCERPT_CHARS, PART_STATES, VERDICTS, DefectRow, ErrorRow, Part, VerdictRow, View

log = logging.getLogger(__name__)
T = TypeVar("T")

STATE_FOR_VERDICT = {"pass": "finalised", "fail": "finalised", "incomplete": "incomplete"}


class UnknownPartError(LookupError):
    """A write refers to a part that was never started in this database."""


# ------------------------------------------------------------------------------------------- records


@dataclass(frozen=True)
class ViewRecord:
    frame_id: str
    camera_id: str
    ts: float
    c2w: list[list[float]]
    view_score: float
    latency_ms: float
    timings_ms: dict[str, float]
    anomaly_map_path: str | None


@dataclass(frozen=True)
class DefectRecord:
    id: int
    centroid: list[float]
    bbox_min: list[float]
    bbox_max: list[float]
    peak_score: float
    n_voxels: int
    frames: list[str]


@dataclass(frozen=True)
class VerdictRecord:
    verdict: str
    score: float | None
    threshold: float
    n_views: int
    placement: dict[str, Any] | None  # {"translation_m": [..], "rotation_deg": ..}
    timings_ms: dict[str, float]
    agent_version: str
    ts: float
    created_ts: float
    payload: dict[str, Any]  # the verdict object as published
    defects: list[DefectRecord]


@dataclass(frozen=True)
class PartSummary:
    """One row of :meth:`ResultStore.list_parts`."""

    cell: str
    part_id: str
    recipe: str
    recipe_version: str | None
    state: str
    started_ts: float
    finished_ts: float | None
    expected_views: int | None
    views_recorded: int
    verdict: str | None
    score: float | None
    threshold: float | None
    n_defects: int


@dataclass(frozen=True)
class PartRecord:
    """A part with its views and verdict (:meth:`ResultStore.get_part`, exports)."""

    cell: str
    part_id: str
    recipe: str
    recipe_version: str | None
    state: str
    started_ts: float
    finished_ts: float | None
    expected_views: int | None
    meta: dict[str, Any]
    views_recorded: int
    views: list[ViewRecord] = field(default_factory=list)  # empty when loaded without views
    verdict: VerdictRecord | None = None
    incomplete_reason: str | None = None  # why the agent recorded the part incomplete, when it said


@dataclass(frozen=True)
class ErrorRecord:
    ts: float
    cell: str
    code: str
    message: str
    topic: str
    part_id: str | None
    payload_excerpt: str | None


@dataclass(frozen=True)
class PartFilter:
    """Which parts to list or export; every field optional. ``since``/``until``: Unix seconds on ``started_ts``."""

    cell: str | None = None
    recipe: str | None = None
    verdict: str | None = None  # pass | fail | incomplete | none (no verdict yet)
    state: str | None = None  # one of PART_STATES
    since: float | None = None
    until: float | None = None
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.verdict is not None and self.verdict not in (*VERDICTS, "none"):
            raise ValueError(f"verdict filter must be one of {(*VERDICTS, 'none')}, got {self.verdict!r}")
        if self.state is not None and self.state not in PART_STATES:
            raise ValueError(f"state filter must be one of {PART_STATES}, got {self.state!r}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit must be >= 1, got {self.limit}")

    def apply(self, query: Select) -> Select:
        if self.cell is not None:
            query = query.where(Part.cell == self.cell)
        if self.recipe is not None:
            query = query.where(Part.recipe == self.recipe)
        if self.verdict == "none":
            query = query.where(VerdictRow.id.is_(None))
        elif self.verdict is not None:
            query = query.where(VerdictRow.verdict == self.verdict)
        if self.state is not None:
            query = query.where(Part.state == self.state)
        if self.since is not None:
            query = query.where(Part.started_ts >= self.since)
        if self.until is not None:
            query = query.where(Part.started_ts < self.until)
        query = query.order_by(Part.started_ts.desc(), Part.id.desc())
        return query if self.limit is None else query.limit(self.limit)


# ------------------------------------------------------------------------------------ value checks


def _finite(value: Any, name: str) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    return v


def _c2w_json(c2w: Any) -> list[list[float]]:
    m = np.asarray(c2w, dtype=np.float64)
    if m.shape != (4, 4) or not np.isfinite(m).all():
        raise ValueError(f"c2w must be a finite 4x4 matrix, got shape {m.shape}")
    return m.tolist()


def _timings_json(timings: Mapping[str, Any], name: str) -> dict[str, float]:
    return {str(k): _finite(v, f"{name}[{k!r}]") for k, v in timings.items()}


def payload_excerpt(payload: bytes | str | None, limit: int = PAYLOAD_EXCERPT_CHARS) -> str | None:
    """The start of a payload as text (invalid UTF-8 and NUL replaced: PostgreSQL text refuses NUL)."""
    if payload is None:
        return None
    text = payload[: limit * 4].decode("utf-8", errors="replace") if isinstance(payload, (bytes, bytearray, memoryview)) else str(payload)
    text = text.replace("\x00", "\ufffd")
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ----------------------------------------------------------------------------------------- the store


class ResultStore:
    """Results database access. ``url``: any SQLAlchemy URL (default :func:`storage.db.default_db_url`).

    ``migrate=True`` brings the schema to the newest revision on open (what the service does);
    ``migrate=False`` only checks that it is there (what read-only tools do) and raises
    :class:`storage.migrate.SchemaError` otherwise.
    """

    def __init__(self, url: str | URL | None = None, *, migrate: bool = True, engine: Engine | None = None):
        self.engine = engine if engine is not None else make_engine(url if url is not None else default_db_url())
        self._owns_engine = engine is None
        self._write_engine = self.engine.execution_options(**{WRITE_OPTION: True})
        if migrate:
            upgrade_engine(self.engine)
        else:
            check_schema(self.engine)

    @property
    def url(self) -> str:
        """The database URL, password hidden."""
        return redact(self.engine.url)

    def close(self) -> None:
        if self._owns_engine:
            self.engine.dispose()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ResultStore({self.url!r})"

    # -------------------------------------------------------------------------------- sessions

    @contextmanager
    def _reading(self) -> Iterator[Session]:
        with Session(self.engine) as session, session.begin():
            yield session

    def _write(self, work: Callable[[Session], T]) -> T:
        """Run ``work`` in one write transaction; committed when this returns."""
        with Session(self._write_engine, expire_on_commit=False) as session, session.begin():
            return work(session)

    @staticmethod
    def _part(session: Session, cell: str, part_id: str) -> Part | None:
        return session.scalars(select(Part).where(Part.cell == cell, Part.part_id == part_id)).one_or_none()

    # -------------------------------------------------------------------------------- writes

    def start_part(
        self,
        cell: str,
        part_id: str,
        recipe: str,
        *,
        ts: float,
        expected_views: int | None = None,
        meta: Mapping[str, Any] | None = None,
        recipe_version: str | None = None,
    ) -> bool:
        """Record that a part started (state ``in_progress``). False when it was already recorded (left unchanged)."""
        started = _finite(ts, "ts")
        meta_json = json.loads(json.dumps(dict(meta or {}), allow_nan=False))

        def work(session: Session) -> bool:
            existing = self._part(session, cell, part_id)
            if existing is not None:
                if existing.recipe != recipe:
                    log.warning("part %s/%s started again with recipe %r; keeping the first start (recipe %r)", cell, part_id, recipe, existing.recipe)
                return False
            session.add(
                Part(
                    cell=cell,
                    part_id=part_id,
                    recipe=recipe,
                    recipe_version=recipe_version,
                    state="in_progress",
                    started_ts=started,
                    expected_views=expected_views,
                    meta=meta_json,
                )
            )
            return True

        return self._idempotent(work, lambda s: self._part(s, cell, part_id) is not None)

    def record_view(
        self,
        cell: str,
        part_id: str,
        view: ViewResult,
        *,
        camera_id: str,
        ts: float,
        c2w: Any,
        anomaly_map_path: str | Path | None = None,
    ) -> bool:
        """Record one processed view. False for a duplicate (same part and ``frame_id``): the first is kept.

        Raises UnknownPartError when the part was never started.
        """
        row = dict(
            frame_id=view.frame_id,
            camera_id=camera_id,
            ts=_finite(ts, "ts"),
            c2w=_c2w_json(c2w),
            view_score=_finite(view.view_score, "view_score"),
            latency_ms=_finite(view.latency_ms, "latency_ms"),
            timings=_timings_json(view.timings_ms, "timings_ms"),
            anomaly_map_path=None if anomaly_map_path is None else str(anomaly_map_path),
        )

        def find(session: Session) -> Part:
            part = self._part(session, cell, part_id)
            if part is None:
                raise UnknownPartError(f"cannot record view {view.frame_id!r}: part {part_id!r} of cell {cell!r} was never started")
            return part

        def exists(session: Session) -> bool:
            return session.scalar(select(View.id).where(View.part_pk == find(session).id, View.frame_id == view.frame_id)) is not None

        def work(session: Session) -> bool:
            part = find(session)
            if session.scalar(select(View.id).where(View.part_pk == part.id, View.frame_id == view.frame_id)) is not None:
                return False
            session.add(View(part_pk=part.id, **row))
            return True

        return self._idempotent(work, exists)

    def revise_view(self, cell: str, part_id: str, view: ViewResult) -> bool:
        """Replace a recorded view's score and stage timings with the inspection's final ones (it scored the view again,
        at the placement it settled on). The latency, pose and map path stay. False when the view was never recorded."""
        score = _finite(view.view_score, "view_score")
        timings = _timings_json(view.timings_ms, "timings_ms")

        def work(session: Session) -> bool:
            part = self._part(session, cell, part_id)
            row = None if part is None else session.scalars(select(View).where(View.part_pk == part.id, View.frame_id == view.frame_id)).one_or_none()
            if row is None:
                return False
            row.view_score = score
            row.timings = timings
            return True

        return self._write(work)

    def record_verdict(self, cell: str, verdict: Verdict, *, created_ts: float | None = None, reason: str | None = None) -> bool:
        """Store a part's verdict and finish the part; returns after the commit.

        True: stored (publish it now). False: the part already has a verdict; this one is ignored
        (logged), the first one stands. A part that was never started is created from the verdict.
        ``reason``: why an ``incomplete`` verdict is incomplete (kept on the part; ValueError for other verdicts).
        """
        payload = json.loads(verdict.to_payload())  # validated exactly as it will be published
        created = time.time() if created_ts is None else _finite(created_ts, "created_ts")
        if reason is not None and verdict.verdict != "incomplete":
            raise ValueError(f"a reason is kept for incomplete verdicts only; part {verdict.part_id!r} has verdict {verdict.verdict!r}")

        def exists(session: Session) -> bool:
            part = self._part(session, cell, verdict.part_id)
            return part is not None and session.scalar(select(VerdictRow.id).where(VerdictRow.part_pk == part.id)) is not None

        def work(session: Session) -> bool:
            part = self._part(session, cell, verdict.part_id)
            if part is None:
                part = Part(cell=cell, part_id=verdict.part_id, recipe=verdict.recipe, state="in_progress", started_ts=verdict.ts, meta={})
                session.add(part)
                session.flush()
            elif session.scalar(select(VerdictRow.id).where(VerdictRow.part_pk == part.id)) is not None:
                return False
            part.state = STATE_FOR_VERDICT[verdict.verdict]
            part.finished_ts = verdict.ts
            part.incomplete_reason = reason
            if part.recipe_version is None:
                part.recipe_version = verdict.recipe_version
            row = VerdictRow(
                part_pk=part.id,
                verdict=payload["verdict"],
                score=payload["score"],
                threshold=payload["threshold"],
                n_views=payload["n_views"],
                placement=payload["placement"],
                timings=payload["timings_ms"],
                agent_version=payload["agent_version"],
                ts=payload["ts"],
                payload=payload,
                created_ts=created,
                defects=[
                    DefectRow(
                        defect_id=d["id"],
                        centroid=d["centroid"],
                        bbox_min=d["bbox_min"],
                        bbox_max=d["bbox_max"],
                        peak_score=d["peak_score"],
                        n_voxels=d["n_voxels"],
                        frames=d["frames"],
                    )
                    for d in payload["defects"]
                ],
            )
            session.add(row)
            return True

        stored = self._idempotent(work, exists)
        if not stored:
            log.warning("part %s/%s already has a verdict; the new %r verdict is ignored", cell, verdict.part_id, verdict.verdict)
        return stored

    def fail_part(self, cell: str, part_id: str, *, ts: float) -> bool:
        """Mark an in-progress part ``failed`` (the agent could not inspect it). False if it was not in progress."""
        finished = _finite(ts, "ts")

        def work(session: Session) -> bool:
            part = self._part(session, cell, part_id)
            if part is None:
                raise UnknownPartError(f"cannot fail part {part_id!r} of cell {cell!r}: it was never started")
            if part.state != "in_progress":
                return False
            part.state, part.finished_ts = "failed", finished
            return True

        return self._write(work)

    def record_error(self, cell: str, error: ErrorMessage, *, payload: bytes | str | None = None) -> None:
        """Keep an error the agent published, with the start of the offending payload."""
        row = ErrorRow(
            ts=_finite(error.ts, "ts"),
            cell=cell,
            code=error.code,
            message=error.message,
            topic=error.topic,
            part_id=error.part_id,
            payload_excerpt=payload_excerpt(payload),
        )
        self._write(lambda session: session.add(row))

    def _idempotent(self, work: Callable[[Session], bool], exists: Callable[[Session], bool]) -> bool:
        """``work`` in a write transaction; a unique-constraint race with a concurrent writer reads as "already there"."""
        try:
            return self._write(work)
        except IntegrityError:
            with self._reading() as session:
                if exists(session):
                    return False
            raise

    # -------------------------------------------------------------------------------- reads

    def list_parts(self, filters: PartFilter | None = None, **kwargs: Any) -> list[PartSummary]:
        """Parts, newest first. Filters as a PartFilter or its fields as keywords (default limit 100)."""
        if filters is None:
            filters = PartFilter(**{"limit": 100, **kwargs})
        elif kwargs:
            raise TypeError("pass either a PartFilter or filter keywords, not both")
        n_views = select(func.count(View.id)).where(View.part_pk == Part.id).correlate(Part).scalar_subquery()
        n_defects = select(func.count(DefectRow.id)).where(DefectRow.verdict_pk == VerdictRow.id).correlate(VerdictRow).scalar_subquery()
        query = filters.apply(
            select(Part, VerdictRow.verdict, VerdictRow.score, VerdictRow.threshold, n_views, n_defects).outerjoin(VerdictRow, VerdictRow.part_pk == Part.id)
        )
        with self._reading() as session:
            return [
                PartSummary(
                    cell=p.cell,
                    part_id=p.part_id,
                    recipe=p.recipe,
                    recipe_version=p.recipe_version,
                    state=p.state,
                    started_ts=p.started_ts,
                    finished_ts=p.finished_ts,
                    expected_views=p.expected_views,
                    views_recorded=int(nv),
                    verdict=v,
                    score=score,
                    threshold=thr,
                    n_defects=int(nd or 0),
                )
                for p, v, score, thr, nv, nd in session.execute(query)
            ]

    def get_part(self, part_id: str, cell: str | None = None) -> PartRecord | None:
        """A part with its views, verdict and defects; None if unknown.

        Without ``cell`` the part id must be unique across cells (ValueError naming the cells otherwise).
        """
        query = select(Part).where(Part.part_id == part_id).options(
            selectinload(Part.views), selectinload(Part.verdict).selectinload(VerdictRow.defects)
        )
        if cell is not None:
            query = query.where(Part.cell == cell)
        with self._reading() as session:
            parts = session.scalars(query).all()
            if len(parts) > 1:
                raise ValueError(f"part {part_id!r} exists in several cells ({', '.join(sorted(p.cell for p in parts))}): name the cell")
            return _part_record(parts[0], with_views=True) if parts else None

    def iter_part_records(self, filters: PartFilter | None = None, *, with_views: bool = False, batch: int = 500) -> Iterator[PartRecord]:
        """Parts with verdicts and defects (and views if asked), newest first, loaded ``batch`` at a time."""
        filters = filters or PartFilter()
        n_views = select(func.count(View.id)).where(View.part_pk == Part.id).correlate(Part).scalar_subquery()
        query = filters.apply(select(Part, n_views).outerjoin(VerdictRow, VerdictRow.part_pk == Part.id))
        options = [selectinload(Part.verdict).selectinload(VerdictRow.defects)]
        if with_views:
            options.append(selectinload(Part.views))
        with self._reading() as session:
            result = session.execute(query.options(*options).execution_options(yield_per=batch))
            for part, nv in result:
                yield _part_record(part, with_views=with_views, views_recorded=int(nv))

    def list_errors(self, *, cell: str | None = None, part_id: str | None = None, since: float | None = None, limit: int | None = 100) -> list[ErrorRecord]:
        """Recorded errors, newest first."""
        query = select(ErrorRow)
        if cell is not None:
            query = query.where(ErrorRow.cell == cell)
        if part_id is not None:
            query = query.where(ErrorRow.part_id == part_id)
        if since is not None:
            query = query.where(ErrorRow.ts >= since)
        query = query.order_by(ErrorRow.ts.desc(), ErrorRow.id.desc())
        if limit is not None:
            query = query.limit(limit)
        with self._reading() as session:
            return [
                ErrorRecord(ts=e.ts, cell=e.cell, code=e.code, message=e.message, topic=e.topic, part_id=e.part_id, payload_excerpt=e.payload_excerpt)
                for e in session.scalars(query)
            ]

    def export(self, path: str | Path, fmt: str, filters: PartFilter | None = None) -> int:
        """Write parts with their verdicts to ``path`` as ``csv`` or ``json``; returns the number of parts."""
        from storage.export import write_export

        return write_export(self.iter_part_records(filters), path, fmt)


def _part_record(part: Part, *, with_views: bool, views_recorded: int | None = None) -> PartRecord:
    views = [
        ViewRecord(
            frame_id=v.frame_id,
            camera_id=v.camera_id,
            ts=v.ts,
            c2w=v.c2w,
            view_score=v.view_score,
            latency_ms=v.latency_ms,
            timings_ms=v.timings,
            anomaly_map_path=v.anomaly_map_path,
        )
        for v in (part.views if with_views else [])
    ]
    verdict = None
    if part.verdict is not None:
        r = part.verdict
        verdict = VerdictRecord(
            verdict=r.verdict,
            score=r.score,
            threshold=r.threshold,
            n_views=r.n_views,
            placement=r.placement,
            timings_ms=r.timings,
            agent_version=r.agent_version,
            ts=r.ts,
            created_ts=r.created_ts,
            payload=r.payload,
            defects=[
                DefectRecord(
                    id=d.defect_id,
                    centroid=d.centroid,
                    bbox_min=d.bbox_min,
                    bbox_max=d.bbox_max,
                    peak_score=d.peak_score,
                    n_voxels=d.n_voxels,
                    frames=d.frames,
                )
                for d in r.defects
            ],
        )
    return PartRecord(
        cell=part.cell,
        part_id=part.part_id,
        recipe=part.recipe,
        recipe_version=part.recipe_version,
        state=part.state,
        started_ts=part.started_ts,
        finished_ts=part.finished_ts,
        expected_views=part.expected_views,
        meta=part.meta,
        views_recorded=len(views) if views_recorded is None else views_recorded,
        views=views,
        verdict=verdict,
        incomplete_reason=part.incomplete_reason,
    )


__all__: Sequence[str] = (
    "DefectRecord",
    "ErrorRecord",
    "PartFilter",
    "PartRecord",
    "PartSummary",
    "ResultStore",
    "UnknownPartError",
    "VerdictRecord",
    "ViewRecord",
    "payload_excerpt",
)
