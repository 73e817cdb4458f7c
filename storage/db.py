"""Engine, sessions and migrations for ``BITPLAN_DATABASE_URL`` (SQLite by
default, PostgreSQL in production and in the tests)."""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import create_engine, delete, event, select, text
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from storage.models import ApiKey, Team, WebSession, utcnow

KEY_PREFIX = "bp_"
KEY_CACHE_S = 5.0
SESSION_CACHE_S = 5.0


class Unavailable(RuntimeError):
    """The database cannot be reached (the API answers 503)."""


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        kwargs: dict = {"pool_pre_ping": True}
        if url.startswith("sqlite"):
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs.update(pool_size=10, max_overflow=20, pool_timeout=10)
        self.engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._key_cache: dict[str, tuple[Team | None, float]] = {}
        # sha256(session id) -> ((team, csrf token, expires at) or None, cached until (monotonic))
        self._session_cache: dict[str, tuple[tuple[Team, str, dt.datetime] | None, float]] = {}
        self._sessions_deleted = 0  # bumped by delete_web_session: a lookup that raced a delete is not cached

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session that commits on success and rolls back on error."""
        session = self.sessions()
        try:
            yield session
            session.commit()
        except (OperationalError, InterfaceError) as exc:
            session.rollback()
            raise Unavailable(f"database unavailable: {str(exc).splitlines()[0]}") from exc
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def ping(self) -> None:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except (OperationalError, InterfaceError) as exc:
            raise Unavailable(f"database unavailable: {str(exc).splitlines()[0]}") from exc

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision (safe to call on every start)."""
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
        cfg.set_main_option("sqlalchemy.url", self.url.replace("%", "%%"))
        try:
            with self.engine.begin() as conn:
                if conn.dialect.name == "postgresql":  # an API and workers starting together migrate once
                    conn.execute(text("SELECT pg_advisory_xact_lock(7201)"))
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
        except (OperationalError, InterfaceError) as exc:
            raise Unavailable(f"cannot reach the database: {str(exc).strip().splitlines()[0]}") from exc

    # --- teams and keys -------------------------------------------------------------------------

    def create_key(self, team_name: str) -> str:
        """Create the team if new and a key for it; return the key (only its hash is stored)."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        with self.session() as s:
            team = s.scalar(select(Team).where(Team.name == team_name))
            if team is None:
                team = Team(name=team_name)
                s.add(team)
                s.flush()
            s.add(ApiKey(team_id=team.id, key_sha256=hash_key(key), prefix=key[:10]))
        return key

    def team_for_key(self, key: str) -> Team | None:
        """The key's team. Answers are cached for KEY_CACHE_S seconds (a poll costs one query, not two);
        a revoked key therefore stops working within that time in processes that saw it before."""
        digest = hash_key(key)
        now = time.monotonic()
        hit = self._key_cache.get(digest)
        if hit is not None and hit[1] > now:
            return hit[0]
        team = self._lookup_key(key)
        if len(self._key_cache) > 10_000:
            self._key_cache.clear()
        self._key_cache[digest] = (team, now + KEY_CACHE_S)
        return team

    def _lookup_key(self, key: str) -> Team | None:
        with self.session() as s:
            row = s.execute(
                select(Team).join(ApiKey, ApiKey.team_id == Team.id)
                .where(ApiKey.key_sha256 == hash_key(key), ApiKey.revoked_at.is_(None))
            ).scalar_one_or_none()
            return row

    def has_keys(self) -> bool:
        with self.session() as s:
            return s.scalar(select(ApiKey.id).limit(1)) is not None

    def revoke_key(self, key: str) -> bool:
        with self.session() as s:
            row = s.scalar(select(ApiKey).where(ApiKey.key_sha256 == hash_key(key)))
            if row is None:
                return False
            row.revoked_at = utcnow()
        self._key_cache.pop(hash_key(key), None)
        return True

    # --- web sign-in sessions -------------------------------------------------------------------

    def create_session(self, team_id: str, hours: float) -> tuple[str, str]:
        """A web session for the team lasting ``hours``: return (session id, CSRF token). Only the id's sha256
        is stored, so the table alone does not sign anyone in. Expired sessions are deleted here."""
        session_id = secrets.token_urlsafe(32)
        csrf_token = secrets.token_urlsafe(32)
        now = utcnow()
        with self.session() as s:
            s.execute(delete(WebSession).where(WebSession.expires_at <= now))
            s.add(WebSession(id_sha256=hash_key(session_id), team_id=team_id, csrf_token=csrf_token, created_at=now,
                             expires_at=now + dt.timedelta(hours=hours)))
        return session_id, csrf_token

    def web_session_for(self, session_id: str) -> tuple[Team, str] | None:
        """(team, CSRF token) of a live session, None if unknown, signed out or expired. Answers are cached for
        SESSION_CACHE_S seconds (never past the expiry); ``delete_web_session`` drops the entry at once, so
        a sign-out ends the session in this process immediately, in other API processes within that time."""
        digest = hash_key(session_id)
        now = time.monotonic()
        hit = self._session_cache.get(digest)
        if hit is None or hit[1] <= now:
            deletions = self._sessions_deleted
            hit = (self._lookup_session(digest), now + SESSION_CACHE_S)
            if len(self._session_cache) > 10_000:
                self._session_cache.clear()
            if deletions == self._sessions_deleted:
                self._session_cache[digest] = hit
        found = hit[0]
        if found is None or found[2] <= utcnow():
            return None
        return found[0], found[1]

    def _lookup_session(self, digest: str) -> tuple[Team, str, dt.datetime] | None:
        with self.session() as s:
            row = s.execute(
                select(Team, WebSession.csrf_token, WebSession.expires_at).join(WebSession, WebSession.team_id == Team.id)
                .where(WebSession.id_sha256 == digest, WebSession.expires_at > utcnow())
            ).one_or_none()
        if row is None:
            return None
        team, csrf_token, expires_at = row
        return team, csrf_token, expires_at

    def delete_web_session(self, session_id: str) -> bool:
        """Sign out: the session stops working at once (in this process; in others within SESSION_CACHE_S)."""
        digest = hash_key(session_id)
        with self.session() as s:
            deleted = s.execute(delete(WebSession).where(WebSession.id_sha256 == digest)).rowcount  # type: ignore[attr-defined]
        self._sessions_deleted += 1
        self._session_cache.pop(digest, None)
        return bool(deleted)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers do not block the worker's progress writes
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()
