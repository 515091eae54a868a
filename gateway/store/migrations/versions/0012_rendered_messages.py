"""rendered_messages: each sent message as it was rendered, for the contact's timeline

Revision ID: 0012
Revises: 0005
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0012"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "rendered_messages",
        sa.Column("delivery_key", sqlmodel.sql.sqltypes.AutoString(length=400), nullable=False),
        sa.Column("contact_id", sa.Integer(), nullable=False),
        sa.Column("at", sqlmodel.sql.sqltypes.UTCDateTime(), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("delivery_key"),
    )
    with op.batch_alter_table("rendered_messages", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_rendered_messages_at"), ["at"], unique=False)
        batch_op.create_index(batch_op.f("ix_rendered_messages_contact_id"), ["contact_id"], unique=False)


def downgrade() -> None:
    op.drop_table("rendered_messages")
