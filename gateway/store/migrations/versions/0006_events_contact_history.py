"""events and deliveries: indexes that start with the contact, for `contact.count(...)`, `contact.sent(...)` and
the other history helpers in `if:`

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.create_index("ix_events_contact_history", ["contact_id", "type", "occurred_at"], unique=False)
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        columns = ["contact_id", "rule", "status", "sent_at"]
        batch_op.create_index("ix_deliveries_contact_history", columns, unique=False)


def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index("ix_deliveries_contact_history")
    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_index("ix_events_contact_history")
