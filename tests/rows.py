"""Rows for tests that drive the reconciler directly: a migrated SQLite database with one team and one model,
and jobs added in any state, without the API or a worker."""

from __future__ import annotations

from storage import Database
from storage.models import Job, ModelFile, Team


def database_with_jobs(settings, *jobs: dict) -> tuple[Database, list[str]]:
    """``settings``' database, migrated, holding team 'vision', a model, and one job per ``jobs`` entry (the
    Job columns to set, e.g. ``{"state": "queued", "enqueued_at": ...}``); returns it and the job ids."""
    db = Database(settings.database_url)
    db.migrate()
    with db.session() as s:
        team = Team(name="vision")
        s.add(team)
        s.flush()
        model = ModelFile(team_id=team.id, sha256="0" * 64, name="m.pt2", format="pt2", size_bytes=1, description={})
        s.add(model)
        s.flush()
        rows = [Job(team_id=team.id, model_id=model.id, request={}, **columns) for columns in jobs]
        s.add_all(rows)
    return db, [row.id for row in rows]
