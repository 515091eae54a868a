"""consent ledger keeps every statement: when it was stated and received, action or snapshot, applied or not

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("consents", schema=None) as batch_op:
        batch_op.add_column(sa.Column("stated_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column("received_at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))
        batch_op.add_column(sa.Column("action", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column("applied", sa.Boolean(), nullable=False, server_default=sa.true()))
        batch_op.add_column(sa.Column("reason", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("consents", schema=None) as batch_op:
        for column in ("reason", "applied", "action", "received_at", "stated_at"):
            batch_op.drop_column(column)
