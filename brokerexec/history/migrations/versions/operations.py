"""Operations, each its header entry from the journal: listed, and found by name, from the
store (``client.operations``, ``brokerexec op list``), also after the journal dropped them.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "operations",
        sa.Column("operation", sa.String(64), primary_key=True),
        sa.Column("service", sa.String(255), nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("created", sa.Float, nullable=False),
        sa.Column("header", sa.Text, nullable=False),
    )
    op.create_index("operations_created", "operations", ["created", "operation"])
    op.create_index("operations_service_name", "operations", ["service", "name", "created"])


def downgrade() -> None:
    op.drop_index("operations_service_name", "operations")
    op.drop_index("operations_created", "operations")
    op.drop_table("operations")
