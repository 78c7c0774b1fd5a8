"""exchanges.context_parent: contexts stored as a reference to the exchange they continue

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04 21:00:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Rows stored before keep their whole context and no parent: nothing to rewrite.
    op.add_column("exchanges", sa.Column("context_parent", sa.String(length=32), nullable=True))


def downgrade() -> None:
    # Dropping the column would leave every referencing exchange with a partial context.
    raise NotImplementedError("exchanges.context_parent cannot be dropped without losing contexts")
