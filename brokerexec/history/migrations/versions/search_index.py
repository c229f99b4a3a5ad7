"""Each row says which ingest transaction changed it last (``changed``, growing with every
transaction), so that the text-search index can follow the rows behind the ingest, never in
its way; and that index (``search.py``): the text of each row indexed, ``search_docs``, a
trigram index over it (SQLite: FTS5, PostgreSQL: ``pg_trgm``), and how far it has taken the
rows, ``search_mark``.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Rows from before: changed 0, so the search index takes them first.
    op.add_column("jobs", sa.Column("changed", sa.BigInteger, nullable=False, server_default="0"))
    op.create_index("jobs_changed", "jobs", ["changed"])
    op.create_table(
        "search_mark",
        sa.Column("changed", sa.BigInteger, nullable=False),
        sa.Column("job_id", sa.String(64), nullable=False),
    )
    # Below every row: the rows there are indexed by the indexer's next calls, not here.
    op.execute("INSERT INTO search_mark (changed, job_id) VALUES (-1, '')")
    if op.get_bind().dialect.name == "sqlite":
        op.execute("CREATE TABLE search_docs (doc INTEGER PRIMARY KEY, job_id VARCHAR(64) NOT NULL UNIQUE, "
                   "body TEXT NOT NULL)")
        # External content (the text is in search_docs once); no positions (detail=none): a
        # text is asked as all its trigrams, and what they find is checked against the row.
        op.execute("CREATE VIRTUAL TABLE search_index USING fts5(body, content='search_docs', "
                   "content_rowid='doc', tokenize='trigram', detail=none)")
    else:
        op.execute("CREATE EXTENSION IF NOT EXISTS pg_trgm")  # trusted: a database owner may
        op.create_table(
            "search_docs",
            sa.Column("job_id", sa.String(64), primary_key=True),
            sa.Column("body", sa.Text, nullable=False),
        )
        op.execute("CREATE INDEX search_docs_body ON search_docs USING gin (body gin_trgm_ops)")


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TABLE search_index")
    op.drop_table("search_docs")
    op.drop_table("search_mark")
    op.drop_index("jobs_changed", "jobs")
    op.drop_column("jobs", "changed")
