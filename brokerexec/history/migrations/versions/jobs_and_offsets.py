"""The first tables: jobs and the streams' offsets.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("job_id", sa.String(64), primary_key=True),
        sa.Column("service", sa.String(255), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("workers", sa.Text, nullable=False),
        sa.Column("launched", sa.Float),
        sa.Column("started", sa.Float),
        sa.Column("ended", sa.Float),
        sa.Column("at", sa.Float, nullable=False),
        sa.Column("request", sa.Text),
        sa.Column("request_bytes", sa.Integer, nullable=False),
        sa.Column("result", sa.Text),
        sa.Column("result_bytes", sa.Integer, nullable=False),
        sa.Column("error_type", sa.String(255)),
        sa.Column("error", sa.Text),
        sa.Column("reason", sa.Text),
        sa.Column("last_checkpoint", sa.Float),
        sa.Column("labels", sa.Text, nullable=False),
        sa.Column("operation", sa.String(64)),
    )
    op.create_index("jobs_at", "jobs", ["at", "job_id"])
    op.create_index("jobs_service_at", "jobs", ["service", "at"])
    op.create_index("jobs_state_at", "jobs", ["state", "at"])
    op.create_index("jobs_operation", "jobs", ["operation"])
    op.create_table(
        "offsets",
        sa.Column("stream", sa.String(255), primary_key=True),
        sa.Column("next", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("offsets")
    op.drop_table("jobs")
