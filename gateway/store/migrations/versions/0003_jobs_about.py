"""a call waiting for a retry records who it is about, so it holds back only their steps

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("about", sa.Text(), nullable=True))
        batch_op.create_index(
            "ix_jobs_about",
            ["created_at"],
            unique=False,
            sqlite_where=sa.text("about IS NOT NULL"),
            postgresql_where=sa.text("about IS NOT NULL"),
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_about")
        batch_op.drop_column("about")
