"""Storage for the service: SQLAlchemy 2.x models (``storage.models``), Alembic
migrations applied on start (``storage.db``), and uploaded files in a
content-addressed directory (``storage.blobs``)."""

from storage.blobs import BlobStore, TooLarge
from storage.db import Database, Unavailable

__all__ = ["BlobStore", "Database", "TooLarge", "Unavailable"]
