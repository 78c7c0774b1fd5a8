"""instructions.original_mean_reward: the original answers' mean reward on a version's inputs

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 15:00:00

A version's mean reward alone cannot say whether it helped: its replay answered one cluster's
inputs, whose original answers may have scored higher still. `replay report` now stores both
means of the same inputs, and `route --export` carries a version only when it beat the
originals. Versions scored before keep no original mean (NULL) until their run is reported
again.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    real = sa.Float().with_variant(sa.Double(), "duckdb")  # storage.schema.Real
    op.add_column("instructions", sa.Column("original_mean_reward", real, nullable=True))


def downgrade() -> None:
    op.drop_column("instructions", "original_mean_reward")
