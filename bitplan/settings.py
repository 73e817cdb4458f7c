"""One place for configuration: environment variables read by the CLI, the API
server and the workers alike (so ``bitplan submit`` and ``bitplan serve`` agree).

| variable               | default                                   | used by            |
|------------------------|-------------------------------------------|--------------------|
| BITPLAN_DATA_DIR       | ./bitplan-data                            | server, workers    |
| BITPLAN_DATABASE_URL   | sqlite:///$BITPLAN_DATA_DIR/bitplan.db    | server, workers    |
| BITPLAN_BROKER_URL     | memory:// (in-process; `bitplan serve`)   | server, workers    |
| BITPLAN_RESULT_BACKEND | the broker URL if redis, else in-process  | server, workers    |
| BITPLAN_MAX_UPLOAD_MB  | 512                                       | server             |
| BITPLAN_MAX_UNPACKED_MB | 4000 (read by bitplan.core.data)         | upload reader      |
| BITPLAN_JOB_TIME_LIMIT_S | 3600 (a job running longer fails)       | workers            |
| BITPLAN_MAX_ACTIVE_JOBS  | 20 queued or running jobs per team      | server             |
| BITPLAN_RATE_LIMIT       | 50 requests/s per key (bursts of 200)   | server             |
| BITPLAN_HEARTBEAT_STALE_S | 60: a running job silent this long is requeued | server, workers |
| BITPLAN_REQUEUE_AFTER_S  | 60: a job still queued this long is sent again  | server     |
| BITPLAN_CALLBACK_ALLOW | (none) hosts/CIDRs callbacks may reach besides public addresses | server, workers |
| BITPLAN_MAX_JSON_KB    | 1024: larger JSON request bodies answer 413 | server           |
| BITPLAN_WORKER_MEMORY_MB | 3/4 of RAM: address-space limit of the model reader and job processes (0: none) | server, workers |
| BITPLAN_SESSION_HOURS  | 168: web sign-in sessions last this long  | server             |
| BITPLAN_URL            | http://127.0.0.1:8000                     | client verbs       |
| BITPLAN_API_KEY        | $BITPLAN_DATA_DIR/local-key if present    | client verbs       |
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    database_url: str
    broker_url: str
    result_backend: str
    max_upload_bytes: int
    url: str
    api_key: str | None
    job_time_limit_s: float = 3600.0
    max_active_jobs: int = 20
    rate_limit: float = 50.0
    rate_burst: int = 200
    heartbeat_stale_s: float = 60.0
    requeue_after_s: float = 60.0
    max_attempts: int = 3  # a job whose worker died this many times fails instead of killing another
    callback_allow: tuple[str, ...] = ()  # hosts or CIDRs a callback may reach although not public
    max_json_bytes: int = 1 << 20
    worker_memory_mb: int = 0  # 0: no address-space limit on the processes that read models
    session_hours: float = 168.0

    @property
    def embedded(self) -> bool:
        """True when the broker lives in this process (no Redis): the API runs its own worker."""
        return self.broker_url.startswith("memory://")

    @property
    def local_key_file(self) -> Path:
        return self.data_dir / "local-key"


def load_settings(**overrides) -> Settings:
    env = os.environ
    data_dir = Path(overrides.get("data_dir") or env.get("BITPLAN_DATA_DIR") or "bitplan-data").resolve()
    database_url = overrides.get("database_url") or env.get("BITPLAN_DATABASE_URL") or f"sqlite:///{data_dir / 'bitplan.db'}"
    broker_url = overrides.get("broker_url") or env.get("BITPLAN_BROKER_URL") or "memory://"
    result_backend = overrides.get("result_backend") or env.get("BITPLAN_RESULT_BACKEND") or (
        broker_url if broker_url.startswith(("redis://", "rediss://")) else "cache+memory://"
    )
    max_mb = float(overrides.get("max_upload_mb") or env.get("BITPLAN_MAX_UPLOAD_MB") or 512)
    url = (overrides.get("url") or env.get("BITPLAN_URL") or "http://127.0.0.1:8000").rstrip("/")
    key = overrides.get("api_key") or env.get("BITPLAN_API_KEY")
    if key is None:
        local = data_dir / "local-key"
        if local.is_file():
            key = local.read_text().strip() or None

    def num(name: str, default: float) -> float:
        raw = overrides.get(name.lower())
        if raw is None:  # an override of 0 is still an override
            raw = env.get(f"BITPLAN_{name}")
        return float(raw) if raw not in (None, "") else default

    return Settings(data_dir, database_url, broker_url, result_backend, int(max_mb * 1e6), url, key,
                    job_time_limit_s=num("JOB_TIME_LIMIT_S", 3600.0), max_active_jobs=int(num("MAX_ACTIVE_JOBS", 20)),
                    rate_limit=num("RATE_LIMIT", 50.0), rate_burst=int(num("RATE_BURST", 200)),
                    heartbeat_stale_s=num("HEARTBEAT_STALE_S", 60.0), requeue_after_s=num("REQUEUE_AFTER_S", 60.0),
                    max_attempts=int(num("MAX_ATTEMPTS", 3)),
                    callback_allow=_words(overrides.get("callback_allow", env.get("BITPLAN_CALLBACK_ALLOW", ""))),
                    max_json_bytes=int(num("MAX_JSON_KB", 1024) * 1024),
                    worker_memory_mb=int(num("WORKER_MEMORY_MB", _default_memory_mb())),
                    session_hours=num("SESSION_HOURS", 168.0))


def _words(value) -> tuple[str, ...]:
    """A list setting: a sequence, or a string separated by commas or spaces."""
    if isinstance(value, (list, tuple)):
        return tuple(str(v).strip() for v in value if str(v).strip())
    return tuple(part for part in str(value or "").replace(",", " ").split() if part)


def _default_memory_mb() -> int:
    """Three quarters of the machine's memory: a hostile or huge model fails its own job, not the machine."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.75 / (1 << 20))
    except (ValueError, OSError, AttributeError):
        return 0
