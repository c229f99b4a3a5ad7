"""Each ended job's whole final record, kept apart from the rows that pages scan; a job's
last progress and best improved value on its row.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as jobs:  # batch: SQLite alters by copying the table
        jobs.add_column(sa.Column("progress", sa.Text))
        jobs.add_column(sa.Column("improved", sa.Text))
    op.create_table(
        "records",
        sa.Column("job_id", sa.String(64), primary_key=True),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("body", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("records")
    with op.batch_alter_table("jobs") as jobs:
        jobs.drop_column("improved")
        jobs.drop_column("progress")
