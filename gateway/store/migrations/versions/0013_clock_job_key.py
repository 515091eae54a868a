"""uq_jobs_clock_key: one pending or running clock job (poll, tick) per key

A replica starting while another ran a poll queued a second one, due at once: the same source
was polled twice side by side. Duplicates already there are cancelled, the oldest kept.

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

LIVE = "kind IN ('poll', 'tick') AND status IN ('pending', 'running')"


def upgrade() -> None:
    op.execute(
        f"UPDATE jobs SET status = 'cancelled' WHERE {LIVE} AND id NOT IN "
        f"(SELECT min(id) FROM jobs WHERE {LIVE} GROUP BY key)"
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index(
            "uq_jobs_clock_key", ["key"], unique=True, sqlite_where=sa.text(LIVE), postgresql_where=sa.text(LIVE)
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("uq_jobs_clock_key", sqlite_where=sa.text(LIVE), postgresql_where=sa.text(LIVE))
