"""replay_runs.owner, owner_since, lease_until: the lease of the process driving a run

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 11:30:00

Two `replay --resume RUN` at once (or one beside the process still running it) each read the
run's unanswered inputs and sent them all, so inputs went out twice; and a run whose process
was killed stayed "running", looking like a live one. The process driving a run now holds a
lease it renews while it works; another process may take the run only once the lease lapses,
or when told to (`--take-over`). Runs stored before have no owner: any process may take them.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("replay_runs", sa.Column("owner", sa.String(length=32), nullable=True))
    op.add_column("replay_runs", sa.Column("owner_since", sa.DateTime(), nullable=True))
    op.add_column("replay_runs", sa.Column("lease_until", sa.DateTime(), nullable=True))


def downgrade() -> None:
    op.drop_column("replay_runs", "lease_until")
    op.drop_column("replay_runs", "owner_since")
    op.drop_column("replay_runs", "owner")
