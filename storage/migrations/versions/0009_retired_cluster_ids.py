"""retired_cluster_ids: the cluster ids of clustering runs `prune` removed

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 14:05:00

A fresh cluster takes an id no run has used, because names, notes, tags and instructions are
kept by cluster id and must not land on an unrelated topic. "Used" was read from the stored
runs' clusters, so once `prune` removes superseded runs their ids would be handed out again.
`prune` now records the ids it takes out of the database here, and a fresh id skips them.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "retired_cluster_ids",
        sa.Column("cluster_id", sa.String(length=32), nullable=False),
        sa.Column("retired_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("cluster_id"),
    )


def downgrade() -> None:
    op.drop_table("retired_cluster_ids")
