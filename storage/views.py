"""The JSON shape of stored rows, as the API returns them and job callbacks send them."""

from __future__ import annotations

import datetime as dt

from storage.models import DatasetFile, Job, ModelFile


def iso(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    return value.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")


#: each kind of job's result endpoints (plan: POST /v1/jobs; profile: POST /v1/profiles; apply: POST .../apply)
RESULT_LINKS = {
    "plan": lambda base: {"plan": f"{base}/plan", "frontier": f"{base}/frontier"},
    "profile": lambda base: {"latency": f"{base}/latency"},
    "apply": lambda base: {"report": f"{base}/report", "checkpoint": f"{base}/checkpoint"},
}


def job_dict(job: Job) -> dict:
    base = f"/v1/jobs/{job.id}"
    return {
        "id": job.id,
        "state": job.state,
        "stage": job.stage,
        "progress": round(job.progress, 4),
        "detail": job.detail,
        "model_id": job.model_id,
        "dataset_id": job.dataset_id or "synthetic",
        "request": job.request,
        "cache_hit": job.cache_hit,
        "attempts": job.attempts,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
        "error": None if job.error_message is None else {"code": job.error_code or "failed", "message": job.error_message,
                                                          "hint": job.error_hint},
        "callback_url": job.callback_url,
        "callback_status": job.callback_status,
        "kind": (job.request or {}).get("kind", "plan"),
        "links": {"self": base, **RESULT_LINKS.get((job.request or {}).get("kind", "plan"), RESULT_LINKS["plan"])(base)},
    }


def model_dict(row: ModelFile) -> dict:
    d = row.description
    return {"id": row.id, "sha256": row.sha256, "name": row.name, "format": row.format, "size_bytes": row.size_bytes,
            "inputs": d.get("inputs", []), "layers": d.get("layers", []), "other_bytes": d.get("other_bytes"),
            "created_at": iso(row.created_at)}


def dataset_dict(row: DatasetFile) -> dict:
    d = row.description
    return {"id": row.id, "sha256": row.sha256, "name": row.name, "samples": d.get("samples"),
            "has_targets": d.get("has_targets"), "inputs": d.get("inputs", []), "text": d.get("text"),
            "size_bytes": row.size_bytes,
            "created_at": iso(row.created_at)}
