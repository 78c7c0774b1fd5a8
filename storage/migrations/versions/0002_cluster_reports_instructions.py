"""cluster reports, versioned instructions, LLM cache, cluster radius and map position

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 08:55:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "cluster_reports",
        sa.Column("run_id", sa.String(length=32), nullable=False),
        sa.Column("cluster_id", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("weakness", sa.Float(), nullable=True),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("run_id", "cluster_id"),
    )
    op.create_table(
        "instructions",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("cluster_id", sa.String(length=32), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("replay_run_id", sa.String(length=32), nullable=True),
        sa.Column("mean_reward", sa.Float(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(
        op.f("ix_instructions_cluster_id"), "instructions", ["cluster_id"], unique=False
    )
    op.add_column("replay_runs", sa.Column("finished_at", sa.DateTime(), nullable=True))
    op.add_column("clusters", sa.Column("radius", sa.Float(), nullable=True))
    op.add_column("clusters", sa.Column("x", sa.Float(), nullable=True))
    op.add_column("clusters", sa.Column("y", sa.Float(), nullable=True))
    op.create_table(
        "llm_cache",
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )


def downgrade() -> None:
    op.drop_table("llm_cache")
    op.drop_column("clusters", "y")
    op.drop_column("clusters", "x")
    op.drop_column("clusters", "radius")
    op.drop_column("replay_runs", "finished_at")
    op.drop_index(op.f("ix_instructions_cluster_id"), table_name="instructions")
    op.drop_table("instructions")
    op.drop_table("cluster_reports")
