"""Settings: typed, checked at start, overrides (0 included) win over the environment."""

from __future__ import annotations

import pytest

from bitplan.errors import BitplanError
from bitplan.settings import load_settings


def test_explicit_zero_and_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("BITPLAN_RATE_LIMIT", "7")
    monkeypatch.setenv("BITPLAN_CALLBACK_ALLOW", "10.0.0.0/8, hooks.example.com")
    monkeypatch.setenv("BITPLAN_MAX_UNPACKED_MB", "3")  # read elsewhere; not an error here
    s = load_settings(data_dir=str(tmp_path), rate_limit=0, max_upload_mb=2)
    assert s.rate_limit == 0  # an override of 0 is an override (0 switches the limit off)
    assert s.callback_allow == ("10.0.0.0/8", "hooks.example.com")
    assert s.max_upload_bytes == 2_000_000
    assert s.database_url == f"sqlite:///{tmp_path / 'bitplan.db'}"
    assert s.result_backend == "cache+memory://" and s.embedded
    assert load_settings(data_dir=str(tmp_path)).rate_limit == 7
    assert load_settings(data_dir=str(tmp_path), rate_limit=None).rate_limit == 7  # None: not given


def test_redis_broker_is_the_result_backend_and_local_key(monkeypatch, tmp_path):
    (tmp_path / "local-key").write_text("k-123\n")
    s = load_settings(data_dir=str(tmp_path), broker_url="redis://127.0.0.1:6379/3", url="http://h:1/")
    assert s.result_backend == "redis://127.0.0.1:6379/3" and not s.embedded
    assert s.api_key == "k-123" and s.url == "http://h:1"


def test_bad_values_name_the_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("BITPLAN_JOB_TIME_LIMIT_S", "an hour")
    with pytest.raises(BitplanError) as info:
        load_settings(data_dir=str(tmp_path), max_active_jobs=0)
    message = str(info.value)
    assert "BITPLAN_JOB_TIME_LIMIT_S" in message and "'an hour'" in message
    assert "max_active_jobs" in message and "greater than or equal to 1" in message
    with pytest.raises(BitplanError, match="unknown_thing"):
        load_settings(unknown_thing=1)
