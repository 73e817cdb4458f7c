"""SQLAlchemy models, Alembic migrations and content-addressed blobs for the
service. Arrives with the service issue."""
