"""History: every job kept and searchable, in a database fed by the journal.

``rows.py`` folds a job's journal entries into its row (sans-I/O); ``schema.py`` and
``migrations/`` are the tables; ``store.py`` is the store, on SQLite or PostgreSQL.
"""

from .rows import JobRow
from .store import Entry, HistoryStore, Page

__all__ = ["Entry", "HistoryStore", "JobRow", "Page"]
