"""judge_runs: the lease of the process judging a replay run with one judge

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-08 09:00:00

Two `replay judge RUN --model J` at once (a re-run beside one still going, the UI's Judge
button beside the CLI) each read the pairs without a verdict from J and sent them all, so
every pair was paid for twice; and a judge run had no record at all, so a killed one could
not be told from a live one. The process judging a run with a judge now holds a lease on
that (run, judge), as a replay holds its run (0007): another process may judge the same run
with the same judge only once the lease lapses, or when told to (`--take-over`). Runs judged
before have no row: the first judge run after the upgrade makes it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "judge_runs",
        sa.Column("run_id", sa.String(length=32), nullable=False),
        sa.Column("judge", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("owner", sa.String(length=32), nullable=True),
        sa.Column("owner_since", sa.DateTime(), nullable=True),
        sa.Column("lease_until", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("run_id", "judge"),
    )


def downgrade() -> None:
    op.drop_table("judge_runs")
