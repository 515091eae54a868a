"""The KPI index carries deliveries.kind: internal messages (`to:`) are left out of the funnel, from the index alone

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index("ix_deliveries_kpi")
        batch_op.create_index(
            "ix_deliveries_kpi", ["rule", "sent_at", "step", "status", "feedback", "kind"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index("ix_deliveries_kpi")
        batch_op.create_index("ix_deliveries_kpi", ["rule", "sent_at", "step", "status", "feedback"], unique=False)
