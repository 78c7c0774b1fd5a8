"""instructions: one row per (cluster_id, version)

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 11:00:00

`save_instruction` read a cluster's highest version and inserted the next one: two saves at
once (two people on the Replay page, a `replay --cluster --instruction` beside them) both
stored the same number, so "the latest version" was whichever the database returned first.
A unique index now makes the second insert fail, and `save_instruction` takes the next
number. A database that already holds such duplicates keeps every row: the earliest row of
a repeated version keeps its number and each later one (by creation time, then id) becomes
the cluster's next free version, after all its others, so no other version's number moves.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

INDEX = "uq_instructions_cluster_version"
COLUMNS = (
    "id",
    "cluster_id",
    "version",
    "text",
    "created_at",
    "replay_run_id",
    "mean_reward",
    "original_mean_reward",
)


def upgrade() -> None:
    bind = op.get_bind()
    renumbered = _renumbered(bind)
    if renumbered and bind.dialect.name == "duckdb":
        _rebuild_on_duckdb(bind)
    for row_id, version in renumbered.items():
        op.execute(
            sa.text("UPDATE instructions SET version = :version WHERE id = :id").bindparams(
                version=version, id=row_id
            )
        )
    op.create_index(INDEX, "instructions", ["cluster_id", "version"], unique=True)


def downgrade() -> None:
    op.drop_index(INDEX, table_name="instructions")


def _renumbered(bind: sa.Connection) -> dict[str, int]:
    """id → new version of each later row of a repeated (cluster, version): the cluster's
    next free versions, in the order the rows were created."""
    rows = bind.execute(
        sa.text(
            "SELECT id, cluster_id, version FROM instructions "
            "ORDER BY cluster_id, version, created_at, id"
        )
    ).all()
    highest: dict[str, int] = {}
    for _, cluster_id, version in rows:
        highest[cluster_id] = max(version, highest.get(cluster_id, version))
    seen: set[tuple[str, int]] = set()
    renumbered: dict[str, int] = {}
    for row_id, cluster_id, version in rows:
        if (cluster_id, version) in seen:
            highest[cluster_id] += 1
            renumbered[row_id] = highest[cluster_id]
        seen.add((cluster_id, version))
    return renumbered


def _rebuild_on_duckdb(bind: sa.Connection) -> None:
    """DuckDB refuses to create an index on a table updated in the same transaction ("outstanding
    updates"), and the migration is one transaction: copy the table into a new one, which the
    transaction may update and index, and put it in the old one's place with its indexes
    (ours, and any a user added)."""
    indexes = bind.execute(
        sa.text(
            "SELECT sql FROM duckdb_indexes() WHERE database_name = current_database() "
            "AND schema_name = current_schema() AND table_name = 'instructions'"
        )
    ).scalars()
    recreate = list(indexes)
    op.create_table(
        "instructions_renumbered",
        sa.Column("id", sa.String(length=32), primary_key=True),
        sa.Column("cluster_id", sa.String(length=32), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("replay_run_id", sa.String(length=32), nullable=True),
        sa.Column("mean_reward", sa.Double(), nullable=True),
        sa.Column("original_mean_reward", sa.Double(), nullable=True),
    )
    columns = ", ".join(COLUMNS)
    op.execute(
        sa.text(
            f"INSERT INTO instructions_renumbered ({columns}) SELECT {columns} FROM instructions"
        )
    )
    op.drop_table("instructions")
    op.rename_table("instructions_renumbered", "instructions")
    for sql in recreate:
        op.execute(sa.text(sql))
