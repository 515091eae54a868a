"""jobs.failing_since: when a job first failed, which `retry_for` counts from

A step that quiet hours or the pressure cap had deferred for longer than `retry_for` went to the dead letter at
its second failure: its retries were counted from when it was first due. Jobs retrying as this runs start
counting at their next failure.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("failing_since", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("failing_since")
