"""deliveries.variant: the A/B variant a step sent, and the KPI index that reads it

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_KPI_BEFORE = ["rule", "sent_at", "step", "status", "feedback", "kind"]


def upgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("variant", sqlmodel.sql.sqltypes.AutoString(length=40), nullable=True))
    # The funnel groups by variant too: keep it an index-only read (insight/kpis.py).
    op.drop_index("ix_deliveries_kpi", table_name="deliveries")
    op.create_index("ix_deliveries_kpi", "deliveries", [*_KPI_BEFORE, "variant"])


def downgrade() -> None:
    op.drop_index("ix_deliveries_kpi", table_name="deliveries")
    op.create_index("ix_deliveries_kpi", "deliveries", _KPI_BEFORE)
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_column("variant")
