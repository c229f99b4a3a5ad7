"""The history store's versioned migrations (Alembic): ``versions/``, one file per change."""
