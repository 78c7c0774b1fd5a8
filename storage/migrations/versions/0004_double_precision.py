"""floats in double precision on DuckDB: its FLOAT is 32 bits

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 08:00:00

DuckDB reads FLOAT as a 4-byte REAL, so a judge's preference of 1.732832 came back as
1.7328319549560547, and seconds, ratings and reward scores lost their digits past the
seventh. SQLite's REAL and PostgreSQL's FLOAT are 8 bytes already: nothing changes there.
Values stored before keep what 32 bits kept of them; what is written from now on is whole.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# Every floating-point column, by table (storage.schema.Real from here on).
FLOAT_COLUMNS: dict[str, tuple[str, ...]] = {
    "conversations": ("rating",),
    "exchanges": ("rating", "seconds_to_next_user_message"),
    "battles": ("judge_preference",),
    "cluster_runs": ("unassigned_share",),
    "clusters": ("share", "radius", "x", "y"),
    "assignments": ("distance", "x", "y"),
    "scores": ("value",),
    "replay_items": ("latency_s",),
    "cluster_reports": ("weakness",),
    "instructions": ("mean_reward",),
}
# DuckDB refuses to retype a column of a table that has an index: (table, index, columns).
INDEXES = (
    ("exchanges", "ix_exchanges_conversation_id", ("conversation_id",)),
    ("instructions", "ix_instructions_cluster_id", ("cluster_id",)),
)


def upgrade() -> None:
    if op.get_bind().dialect.name != "duckdb":
        return
    for table, name, _ in INDEXES:
        op.drop_index(name, table_name=table)
    for table, columns in FLOAT_COLUMNS.items():
        for column in columns:
            op.execute(sa.text(f'ALTER TABLE "{table}" ALTER COLUMN "{column}" TYPE DOUBLE'))
    for table, name, columns in INDEXES:
        op.create_index(name, table, list(columns))


def downgrade() -> None:
    raise NotImplementedError("narrowing floats to 32 bits would lose digits")
