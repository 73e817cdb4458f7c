"""docker-compose.yml is accepted by Compose and defines a scalable worker."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


def compose_command() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_config_accepts_the_file():
    cmd = compose_command()
    if cmd is None:
        if os.environ.get("CI"):
            pytest.fail("neither `docker compose` nor `docker-compose` is installed (make test installs docker-compose)")
        pytest.skip("no docker compose here (make test installs docker-compose)")
    run = subprocess.run([*cmd, "-f", str(ROOT / "docker-compose.yml"), "config"], capture_output=True, text=True,
                         cwd=ROOT)
    assert run.returncode == 0, run.stderr
    services = yaml.safe_load(run.stdout)["services"]
    assert set(services) == {"api", "worker", "redis", "postgres"}
    worker = services["worker"]
    assert "container_name" not in worker and "ports" not in worker  # `--scale worker=N` needs both absent
    assert "worker" in worker["command"]
    for name in ("api", "worker"):
        env = services[name]["environment"]
        assert env["BITPLAN_DATABASE_URL"].startswith("postgresql+psycopg://")
        assert env["BITPLAN_BROKER_URL"].startswith("redis://redis:6379")
