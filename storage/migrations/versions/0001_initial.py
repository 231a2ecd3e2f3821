"""Initial schema: parts, views, verdicts, defects, errors.

Revision ID: 0001
Revises:
Create Date: 2026-05-09
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "parts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("cell", sa.String(length=128), nullable=False),
        sa.Column("part_id", sa.String(length=128), nullable=False),
        sa.Column("recipe", sa.String(length=128), nullable=False),
        sa.Column("recipe_version", sa.String(length=256), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("started_ts", sa.Float(), nullable=False),
        sa.Column("finished_ts", sa.Float(), nullable=True),
        sa.Column("expected_views", sa.Integer(), nullable=True),
        sa.Column("meta", sa.JSON(), nullable=False),
        sa.CheckConstraint("state IN ('in_progress', 'finalised', 'incomplete', 'failed')", name=op.f("ck_parts_state")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_parts")),
        sa.UniqueConstraint("cell", "part_id", name=op.f("uq_parts_cell_part_id")),
    )
    op.create_index(op.f("ix_parts_started_ts"), "parts", ["started_ts"])
    op.create_index(op.f("ix_parts_recipe"), "parts", ["recipe"])

    op.create_table(
        "views",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("part_pk", sa.Integer(), nullable=False),
        sa.Column("frame_id", sa.String(length=128), nullable=False),
        sa.Column("camera_id", sa.String(length=128), nullable=False),
        sa.Column("ts", sa.Float(), nullable=False),
        sa.Column("c2w", sa.JSON(), nullable=False),
        sa.Column("view_score", sa.Float(), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Column("timings", sa.JSON(), nullable=False),
        sa.Column("anomaly_map_path", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(["part_pk"], ["parts.id"], name=op.f("fk_views_part_pk_parts"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_views")),
        sa.UniqueConstraint("part_pk", "frame_id", name=op.f("uq_views_part_pk_frame_id")),
    )

    op.create_table(
        "verdicts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("part_pk", sa.Integer(), nullable=False),
        sa.Column("verdict", sa.String(length=16), nullable=False),
        sa.Column("score", sa.Float(), nullable=True),
        sa.Column("threshold", sa.Float(), nullable=False),
        sa.Column("n_views", sa.Integer(), nullable=False),
        sa.Column("placement", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("timings", sa.JSON(), nullable=False),
        sa.Column("agent_version", sa.String(length=64), nullable=False),
        sa.Column("ts", sa.Float(), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("created_ts", sa.Float(), nullable=False),
        sa.CheckConstraint("verdict IN ('pass', 'fail', 'incomplete')", name=op.f("ck_verdicts_verdict")),
        sa.ForeignKeyConstraint(["part_pk"], ["parts.id"], name=op.f("fk_verdicts_part_pk_parts"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_verdicts")),
        sa.UniqueConstraint("part_pk", name=op.f("uq_verdicts_part_pk")),
    )
    op.create_index(op.f("ix_verdicts_verdict"), "verdicts", ["verdict"])

    op.create_table(
        "defects",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("verdict_pk", sa.Integer(), nullable=False),
        sa.Column("defect_id", sa.Integer(), nullable=False),
        sa.Column("centroid", sa.JSON(), nullable=False),
        sa.Column("bbox_min", sa.JSON(), nullable=False),
        sa.Column("bbox_max", sa.JSON(), nullable=False),
        sa.Column("peak_score", sa.Float(), nullable=False),
        sa.Column("n_voxels", sa.Integer(), nullable=False),
        sa.Column("frames", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["verdict_pk"], ["verdicts.id"], name=op.f("fk_defects_verdict_pk_verdicts"), ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_defects")),
        sa.UniqueConstraint("verdict_pk", "defect_id", name=op.f("uq_defects_verdict_pk_defect_id")),
    )

    op.create_table(
        "errors",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("ts", sa.Float(), nullable=False),
        sa.Column("cell", sa.String(length=128), nullable=False),
        sa.Column("code", sa.String(length=64), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("part_id", sa.String(length=128), nullable=True),
        sa.Column("payload_excerpt", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_errors")),
    )
    op.create_index(op.f("ix_errors_ts"), "errors", ["ts"])
    op.create_index(op.f("ix_errors_cell_part_id"), "errors", ["cell", "part_id"])


def downgrade() -> None:
    op.drop_table("errors")
    op.drop_table("defects")
    op.drop_table("verdicts")
    op.drop_table("views")
    op.drop_table("parts")
