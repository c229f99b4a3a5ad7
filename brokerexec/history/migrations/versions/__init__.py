"""One file per change of the history store's schema, named by its revision."""
