"""How many jobs there are by service and state, kept as rows change: counting a million rows
at every question (and every metrics scrape) took seconds on SQLite.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "counts",
        sa.Column("service", sa.String(255), primary_key=True),
        sa.Column("state", sa.String(16), primary_key=True),
        sa.Column("n", sa.BigInteger, nullable=False),
    )
    op.execute("INSERT INTO counts (service, state, n) "
               "SELECT service, state, count(*) FROM jobs GROUP BY service, state")


def downgrade() -> None:
    op.drop_table("counts")
