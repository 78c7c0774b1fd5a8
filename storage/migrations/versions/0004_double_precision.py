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

from storage.engine import StorageError

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


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name != "duckdb":
        return
    # DuckDB refuses to retype a column of a table that has an index: drop the indexes of
    # these tables (ours, and any a user added), retype, and create them again as they were.
    # Within one transaction it still refuses when a dropped index covered the column itself
    # (none of ours does): that is a user's index, named in the error.
    indexes = bind.execute(
        sa.text(
            "SELECT index_name, table_name, sql FROM duckdb_indexes() "
            "WHERE database_name = current_database() AND schema_name = current_schema() "
            "AND table_name IN :tables"
        ).bindparams(sa.bindparam("tables", expanding=True)),
        {"tables": list(FLOAT_COLUMNS)},
    ).all()
    for name, _, _ in indexes:
        quoted = name.replace('"', '""')
        op.execute(sa.text(f'DROP INDEX "{quoted}"'))
    for table, columns in FLOAT_COLUMNS.items():
        for column in columns:
            try:
                op.execute(sa.text(f'ALTER TABLE "{table}" ALTER COLUMN "{column}" TYPE DOUBLE'))
            except sa.exc.DBAPIError as error:
                if "index depends on it" not in str(error):
                    raise
                names = ", ".join(repr(n) for n, t, _ in indexes if t == table)
                raise StorageError(
                    f"cannot widen {table}.{column} to double precision (schema 0004): an "
                    f"index covers it ({names}), which DuckDB cannot retype around. Nothing "
                    "was changed. Drop that index, run the command again, then create the "
                    "index again."
                ) from error
    for _, _, sql in indexes:
        op.execute(sa.text(sql))


def downgrade() -> None:
    raise NotImplementedError("narrowing floats to 32 bits would lose digits")
