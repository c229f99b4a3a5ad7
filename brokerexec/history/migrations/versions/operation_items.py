"""Each job's item of its operation (``item_key``: ``brokerexec/operations/``), and one index
over the operation and the item where there was one over the operation alone: an operation's
jobs, by item or by state, are a range of it.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("item_key", sa.String(200)))
    op.drop_index("jobs_operation", "jobs")
    op.create_index("jobs_operation_key", "jobs", ["operation", "item_key"])


def downgrade() -> None:
    op.drop_index("jobs_operation_key", "jobs")
    op.create_index("jobs_operation", "jobs", ["operation"])
    op.drop_column("jobs", "item_key")
