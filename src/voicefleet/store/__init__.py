"""SQLAlchemy models and the writers that keep them; SQLite by default."""
