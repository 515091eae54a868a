"""sink_rates: each rated sink's shared send schedule, so a rate holds for all replicas together

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "sink_rates",
        sa.Column("sink", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=False),
        sa.Column("tat", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("sink"),
    )


def downgrade() -> None:
    op.drop_table("sink_rates")
