"""The results schema: parts, views, verdicts, defects, errors (SQLAlchemy 2 typed declarative).

Timestamps are Unix seconds (float), as in the MQTT contract. The schema in a database is created only
by the Alembic migrations in storage/migrations/; tests check that those and these models agree.
Unique constraints make redelivery idempotent: one part per (cell, part_id), one view per
(part, frame_id), one verdict per part, one defect per (verdict, id).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import JSON, CheckConstraint, Float, ForeignKey, Index, Integer, MetaData, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

PART_STATES = ("in_progress", "finalised", "incomplete", "failed")
VERDICTS = ("pass", "fail", "incomplete")
ID_LENGTH = 128  # the contract's ids are [A-Za-z0-9._-]{1,128}
PAYLOAD_EXCERPT_CHARS = 1024  # errors keep at most this much of the offending payload

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Part(Base):
    """One inspected part of a cell."""

    __tablename__ = "parts"
    __table_args__ = (
        UniqueConstraint("cell", "part_id"),
        CheckConstraint(_in("state", PART_STATES), name="state"),
        Index(None, "started_ts"),
        Index(None, "recipe"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    cell: Mapped[str] = mapped_column(String(ID_LENGTH))
    part_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    recipe: Mapped[str] = mapped_column(String(ID_LENGTH))
    recipe_version: Mapped[str | None] = mapped_column(String(256))
    state: Mapped[str] = mapped_column(String(16))
    started_ts: Mapped[float] = mapped_column(Float)
    finished_ts: Mapped[float | None] = mapped_column(Float)
    expected_views: Mapped[int | None] = mapped_column(Integer)
    meta: Mapped[dict[str, Any]] = mapped_column(JSON)
    incomplete_reason: Mapped[str | None] = mapped_column(Text)  # why the agent recorded the part incomplete (revision 0002)

    views: Mapped[list[View]] = relationship(back_populates="part", cascade="all, delete-orphan", passive_deletes=True, order_by="View.ts")
    verdict: Mapped[VerdictRow | None] = relationship(back_populates="part", cascade="all, delete-orphan", passive_deletes=True)


class View(Base):
    """One processed view of a part."""

    __tablename__ = "views"
    __table_args__ = (UniqueConstraint("part_pk", "frame_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    part_pk: Mapped[int] = mapped_column(ForeignKey("parts.id", ondelete="CASCADE"))
    frame_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    camera_id: Mapped[str] = mapped_column(String(ID_LENGTH))
    ts: Mapped[float] = mapped_column(Float)
    c2w: Mapped[list[Any]] = mapped_column(JSON)  # 4x4 camera-to-world, OpenGL convention, metres
    view_score: Mapped[float] = mapped_column(Float)
    latency_ms: Mapped[float] = mapped_column(Float)
    timings: Mapped[dict[str, Any]] = mapped_column(JSON)  # stage -> milliseconds
    anomaly_map_path: Mapped[str | None] = mapped_column(Text)

    part: Mapped[Part] = relationship(back_populates="views")


class VerdictRow(Base):
    """The verdict of a part (one per part), with the full verdict object as published."""

    __tablename__ = "verdicts"
    __table_args__ = (
        CheckConstraint(_in("verdict", VERDICTS), name="verdict"),
        Index(None, "verdict"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    part_pk: Mapped[int] = mapped_column(ForeignKey("parts.id", ondelete="CASCADE"), unique=True)
    verdict: Mapped[str] = mapped_column(String(16))
    score: Mapped[float | None] = mapped_column(Float)
    threshold: Mapped[float] = mapped_column(Float)
    n_views: Mapped[int] = mapped_column(Integer)
    placement: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    timings: Mapped[dict[str, Any]] = mapped_column(JSON)  # the verdict's timings_ms
    agent_version: Mapped[str] = mapped_column(String(64))
    ts: Mapped[float] = mapped_column(Float)  # the verdict's ts
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)  # the verdict object exactly as published
    created_ts: Mapped[float] = mapped_column(Float)  # when it was committed here

    part: Mapped[Part] = relationship(back_populates="verdict")
    defects: Mapped[list[DefectRow]] = relationship(
        back_populates="verdict", cascade="all, delete-orphan", passive_deletes=True, order_by="DefectRow.defect_id"
    )


class DefectRow(Base):
    """One fused 3D defect of a verdict, world (cell) frame, metres."""

    __tablename__ = "defects"
    __table_args__ = (UniqueConstraint("verdict_pk", "defect_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    verdict_pk: Mapped[int] = mapped_column(ForeignKey("verdicts.id", ondelete="CASCADE"))
    defect_id: Mapped[int] = mapped_column(Integer)  # the verdict's defects[].id
    centroid: Mapped[list[Any]] = mapped_column(JSON)
    bbox_min: Mapped[list[Any]] = mapped_column(JSON)
    bbox_max: Mapped[list[Any]] = mapped_column(JSON)
    peak_score: Mapped[float] = mapped_column(Float)
    n_voxels: Mapped[int] = mapped_column(Integer)
    frames: Mapped[list[Any]] = mapped_column(JSON)

    verdict: Mapped[VerdictRow] = relationship(back_populates="defects")


class ErrorRow(Base):
    """An error the agent published (a rejected message or a failure while processing one)."""

    __tablename__ = "errors"
    __table_args__ = (Index(None, "ts"), Index(None, "cell", "part_id"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ts: Mapped[float] = mapped_column(Float)
    cell: Mapped[str] = mapped_column(String(ID_LENGTH))
    code: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text)
    topic: Mapped[str] = mapped_column(Text)
    part_id: Mapped[str | None] = mapped_column(String(ID_LENGTH))
    payload_excerpt: Mapped[str | None] = mapped_column(Text)
