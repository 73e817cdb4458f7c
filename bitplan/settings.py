"""One place for configuration: environment variables read by the CLI, the API
server and the workers alike (so ``bitplan submit`` and ``bitplan serve`` agree).

Typed and checked once, at start (pydantic-settings): a malformed value stops the process with a
message naming the variable, and an explicit override always wins, 0 included
(``BITPLAN_RATE_LIMIT=0`` switches the rate limit off).

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
| BITPLAN_MAX_ATTEMPTS   | 3: a job whose worker died this often fails | server, workers  |
| BITPLAN_RATE_BURST     | 200 requests per key in a burst           | server             |
| BITPLAN_GPU_WORKERS    | false: jobs with device auto go to the "gpu" queue when true | server |
| BITPLAN_WORKER_DEVICE  | cpu: where this worker runs jobs (`bitplan worker --device`) | workers |
| BITPLAN_URL            | http://127.0.0.1:8000                     | client verbs       |
| BITPLAN_API_KEY        | $BITPLAN_DATA_DIR/local-key if present    | client verbs       |
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from bitplan.errors import BitplanError
from bitplan.schemas import check_device


def _default_memory_mb() -> int:
    """Three quarters of the machine's memory: a hostile or huge model fails its own job, not the machine."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.75 / (1 << 20))
    except (ValueError, OSError, AttributeError):
        return 0


class Settings(BaseSettings):
    """Every setting, from keyword overrides, else ``BITPLAN_<NAME>``, else the default."""

    model_config = SettingsConfigDict(env_prefix="BITPLAN_", frozen=True, extra="forbid", env_ignore_empty=True)

    data_dir: Path = Path("bitplan-data")
    database_url: str = Field("", description="empty: SQLite in data_dir")
    broker_url: str = "memory://"
    result_backend: str = Field("", description="empty: the broker when it is Redis, else in-process")
    max_upload_mb: float = Field(512.0, gt=0)
    url: str = "http://127.0.0.1:8000"
    api_key: str | None = None
    job_time_limit_s: float = Field(3600.0, gt=0)
    max_active_jobs: int = Field(20, ge=1)
    rate_limit: float = Field(50.0, ge=0, description="requests per second per key; 0 switches the limit off")
    rate_burst: int = Field(200, ge=1)
    heartbeat_stale_s: float = Field(60.0, gt=0)
    requeue_after_s: float = Field(60.0, ge=0)
    max_attempts: int = Field(3, ge=1, description="a job whose worker died this often fails instead of killing another")
    callback_allow: Annotated[tuple[str, ...], NoDecode] = Field(
        (), description="hosts or CIDRs a callback may reach although not public")
    max_json_kb: float = Field(1024.0, ge=0, description="0: no cap")
    worker_memory_mb: int = Field(default_factory=_default_memory_mb, ge=0,
                                  description="address-space limit of the processes that read models; 0: none")
    session_hours: float = Field(168.0, gt=0)
    gpu_workers: bool = Field(False, description="the deployment runs GPU workers (bitplan worker --device cuda): "
                                                 "jobs with device auto are queued for them too, not only device cuda")
    worker_device: str = Field("cpu", description="where this worker runs jobs: cpu, cuda, cuda:N or auto (cuda if "
                                                  "the machine has one); a job's own cpu or cuda:N wins")

    @field_validator("worker_device", mode="before")
    @classmethod
    def _device(cls, value: object) -> str:
        return check_device(value)

    @field_validator("callback_allow", mode="before")
    @classmethod
    def _words(cls, value: object) -> tuple[str, ...]:
        """A list setting: a sequence, or a string separated by commas or spaces."""
        if isinstance(value, (list, tuple)):
            return tuple(str(v).strip() for v in value if str(v).strip())
        return tuple(part for part in str(value or "").replace(",", " ").split() if part)

    @model_validator(mode="after")
    def _derived(self) -> Settings:
        data_dir = self.data_dir.resolve()
        object.__setattr__(self, "data_dir", data_dir)
        if not self.database_url:
            object.__setattr__(self, "database_url", f"sqlite:///{data_dir / 'bitplan.db'}")
        if not self.result_backend:
            redis = self.broker_url.startswith(("redis://", "rediss://"))
            object.__setattr__(self, "result_backend", self.broker_url if redis else "cache+memory://")
        object.__setattr__(self, "url", self.url.rstrip("/"))
        if self.api_key is None and (data_dir / "local-key").is_file():
            object.__setattr__(self, "api_key", (data_dir / "local-key").read_text().strip() or None)
        return self

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1e6)

    @property
    def max_json_bytes(self) -> int:
        return int(self.max_json_kb * 1024)

    @property
    def embedded(self) -> bool:
        """True when the broker lives in this process (no Redis): the API runs its own worker."""
        return self.broker_url.startswith("memory://")

    @property
    def local_key_file(self) -> Path:
        return self.data_dir / "local-key"


def load_settings(**overrides: Any) -> Settings:
    """The settings, with ``overrides`` (keyword: value; None means "not given") over the environment.

    A bad value raises a BitplanError naming the variable and what it must be."""
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = str(err["loc"][0]) if err["loc"] else "?"
            source = name if name in given else f"BITPLAN_{name.upper()}"
            problems.append(f"{source}: {err['msg']} (got {err.get('input')!r})")
        raise BitplanError("invalid setting: " + "; ".join(problems),
                           "fix the environment variable (README, 'Configuration')") from None
