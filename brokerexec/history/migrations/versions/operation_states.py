"""An index over each job's operation and state: an operation's jobs counted by state
(``HistoryStore.operation_counts``, ``client.operation_counts``) read the index alone, not
each row (9 ms instead of 190 ms for 100,000 jobs on SQLite).

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("jobs_operation_state", "jobs", ["operation", "state"])


def downgrade() -> None:
    op.drop_index("jobs_operation_state", "jobs")
