"""Storage: migrations match the models (SQLite and PostgreSQL), keys are stored hashed,
and an upload that is refused leaves no file behind."""

from __future__ import annotations

import io

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import select

from storage import BlobStore, Database, TooLarge
from storage.models import ApiKey, Base
from tests.devstack import fresh_database


@pytest.fixture
def pg_url():
    with fresh_database() as url:
        yield url


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_migrations_build_exactly_the_models_schema(backend, tmp_path, request):
    url = f"sqlite:///{tmp_path / 'x.db'}" if backend == "sqlite" else request.getfixturevalue("pg_url")
    db = Database(url)
    db.migrate()
    db.migrate()  # idempotent: every start runs it
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []
    db.engine.dispose()


def test_keys_are_stored_hashed_and_can_be_revoked(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'k.db'}")
    db.migrate()
    assert not db.has_keys()
    key = db.create_key("vision")
    other = db.create_key("vision")
    assert key.startswith("bp_") and len(key) > 40 and key != other
    with db.session() as s:
        stored = s.scalars(select(ApiKey)).all()
    assert len(stored) == 2 and all(key not in (row.key_sha256, row.prefix + "x") for row in stored)
    assert db.team_for_key(key).name == "vision" and db.team_for_key(key + "x") is None
    assert db.revoke_key(key) and db.team_for_key(key) is None and db.team_for_key(other).name == "vision"


def test_blob_store_is_content_addressed_and_leaves_nothing_half_written(tmp_path):
    store = BlobStore(tmp_path)
    with pytest.raises(TooLarge):
        store.stage(io.BytesIO(b"x" * 5000), max_bytes=4096)
    assert list(store.tmp_dir.iterdir()) == [] and not (tmp_path / "blobs").exists()
    a = store.stage(io.BytesIO(b"weights"), max_bytes=4096)
    path = a.commit()
    assert path == store.path(a.sha256) and path.read_bytes() == b"weights" and path.parent.name == a.sha256[:2]
    b = store.stage(io.BytesIO(b"weights"), max_bytes=4096)
    assert b.sha256 == a.sha256 and b.commit() == path
    store.stage(io.BytesIO(b"refused"), max_bytes=4096).discard()
    assert list(store.tmp_dir.iterdir()) == []
