"""Faults, against real processes: a worker killed with SIGKILL in the middle of a
sensitivity computation, Redis restarted (empty) while jobs are queued and running,
PostgreSQL restarted, the API process restarted, a job past its time limit. Every job
still reaches a terminal state, once; nothing is lost.

Recovery timings are shortened for the tests (heartbeat stale after 6 s, queued jobs
resent after 4 s); the defaults are 60 s each."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from tests.devstack import DevStack, PrivatePostgres, PrivateRedis
from tests.integration.service_client import TERMINAL, Callbacks, Team, wait_until

FAST_RECOVERY = {"BITPLAN_HEARTBEAT_STALE_S": "6", "BITPLAN_REQUEUE_AFTER_S": "4"}

pytestmark = pytest.mark.slow  # processes killed and restarted: minutes



def slow(team: Team, probes: int = 64, **extra) -> dict:
    """A hessian_trace job that runs for a while: a fixed number of single-probe passes, no cache."""
    body = {"model_id": team.model["id"], "dataset_id": team.data["id"], "budgets": {"avg_weight_bits": 4},
            "reuse_sensitivity": False,
            "sensitivity": {"method": "hessian_trace",
                            "params": {"max_probes": probes, "min_probes": probes, "probes_per_pass": 1, "tol": 1e-6}},
            **extra}
    r = team.submit(**body)
    assert r.status_code == 202, r.text
    return r.json()


def test_worker_killed_mid_sensitivity_job_finishes_once_elsewhere(digits_files, tmp_path):
    hooks = Callbacks()
    with DevStack(workers=2, workdir=tmp_path, extra_env=FAST_RECOVERY) as stack:
        team = Team(stack, "vision").setup(digits_files)
        job = slow(team, probes=64, callback_url=hooks.url)

        def in_sensitivity():
            j = team.http.get(f"/v1/jobs/{job['id']}").json()
            return j if j["stage"] == "sensitivity" and j["progress"] >= 0.1 else None

        running = wait_until(in_sensitivity, timeout=120)
        assert running["attempts"] == 1
        victim = next(p for p in stack.workers if _runs(stack, p, job["id"]))
        orphans = _sandboxed_jobs(stack)
        os.kill(victim.pid, signal.SIGKILL)
        killed = time.monotonic()
        victim.wait()
        wait_until(lambda: not any(_alive(pid) for pid in orphans), timeout=15)  # its sandbox dies with it
        print(f"\n[fault] the killed worker's sandboxed job process was gone {time.monotonic() - killed:.2f} s later")
        done = team.wait(job["id"], timeout=300)
        print(f"\n[fault] worker killed at sensitivity {running['progress']:.0%}; job succeeded "
              f"{time.monotonic() - killed:.1f} s later on the other worker, attempts {done['attempts']}")
        assert done["state"] == "succeeded", done
        assert done["attempts"] == 2
        survivor = next(p for p in stack.workers if p.pid != victim.pid)
        assert survivor.poll() is None and _runs(stack, survivor, job["id"])
        wait_until(lambda: hooks.received, timeout=30)
        time.sleep(2)
        assert [h["id"] for h in hooks.received] == [job["id"]]  # finished once
        plan = team.http.get(f"/v1/jobs/{job['id']}/plan").json()
        assert plan["sensitivity"]["notes"] and plan["cost"]["avg_weight_bits"] <= 4 + 1e-9
    hooks.close()


def _sandboxed_jobs(stack: DevStack) -> list[int]:
    """Pids of the stack's sandboxed job processes (their working directories are in its TMPDIR's sandbox)."""
    root = str(stack.tmp_dir / "bitplan-sandbox") + "/"
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cwd = os.readlink(f"/proc/{entry}/cwd")
            except OSError:
                continue
            if cwd.startswith(root + "plan-") or cwd.startswith(root + "shard-"):
                pids.append(int(entry))
    return pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][:1] != "Z"  # a zombie is dead, only not yet reaped
    except OSError:
        return False


def _runs(stack: DevStack, proc, job_id: str) -> bool:
    """Whether this worker process received the job (its log names the task id when it starts it)."""
    name = f"w{stack.workers.index(proc) + 1}.log"
    return job_id in stack.log(name)


def test_redis_restarted_while_jobs_are_queued_and_running(digits_files, tmp_path):
    redis = PrivateRedis().start()
    try:
        with DevStack(workers=2, workdir=tmp_path, extra_env=FAST_RECOVERY, redis_url=redis.url, redis_db=0) as stack:
            team = Team(stack, "vision").setup(digits_files)
            jobs = [slow(team, probes=24, seed=i) for i in range(5)]
            wait_until(lambda: sum(team.http.get(f"/v1/jobs/{j['id']}").json()["state"] == "running" for j in jobs) >= 2,
                       timeout=120)
            queued = [j["id"] for j in jobs if team.http.get(f"/v1/jobs/{j['id']}").json()["state"] == "queued"]
            assert queued, "expected some jobs still queued when Redis went away"
            redis.stop()
            time.sleep(2)
            assert team.http.get("/healthz").status_code == 200  # the API lives on without its broker
            redis.start()  # empty: the queued messages are gone
            back = time.monotonic()
            ends = [team.wait(j["id"], timeout=400) for j in jobs]
            print(f"\n[fault] Redis restarted empty with {len(queued)} jobs queued and {5 - len(queued)} running; all 5 "
                  f"succeeded {time.monotonic() - back:.1f} s after it came back")
            assert [e["state"] for e in ends] == ["succeeded"] * 5, ends
    finally:
        redis.stop()


def test_postgres_restart_answers_503_then_recovers(digits_files, tmp_path):
    pg = PrivatePostgres().init()
    try:
        with DevStack(workers=1, workdir=tmp_path / "stack", extra_env=FAST_RECOVERY, pg_admin_url=pg.url) as stack:
            team = Team(stack, "vision").setup(digits_files)
            assert team.http.get("/v1/jobs").status_code == 200
            pg.stop()
            down = team.http.get("/v1/jobs")
            assert down.status_code == 503, down.text
            assert down.json()["error"]["code"] == "unavailable" and down.headers["retry-after"]
            assert httpx.get(stack.url + "/readyz").status_code == 503
            assert team.submit(model_id=team.model["id"], budgets={"avg_weight_bits": 4}).status_code == 503
            pg.start()
            back = time.monotonic()
            wait_until(lambda: team.http.get("/v1/jobs").status_code == 200, timeout=60)
            print(f"\n[fault] PostgreSQL down: 503 (code unavailable, Retry-After); answering again "
                  f"{time.monotonic() - back:.1f} s after it restarted")
            assert httpx.get(stack.url + "/readyz").status_code == 200
            job = team.submit(model_id=team.model["id"], dataset_id=team.data["id"], budgets={"avg_weight_bits": 4},
                              sensitivity={"method": "fisher", "params": {"max_samples": 64}}).json()
            assert team.wait(job["id"], timeout=240)["state"] == "succeeded"
    finally:
        pg.remove()


def test_api_restart_loses_nothing_and_time_limit_fails_clearly(digits_files, tmp_path):
    env = {**FAST_RECOVERY, "BITPLAN_JOB_TIME_LIMIT_S": "8"}
    with DevStack(workers=1, workdir=tmp_path, extra_env=env) as stack:
        team = Team(stack, "vision").setup(digits_files)
        long = slow(team, probes=10000)
        quick = [team.submit(model_id=team.model["id"], dataset_id=team.data["id"], budgets={"avg_weight_bits": b},
                             sensitivity={"method": "fisher", "params": {"max_samples": 64}}).json() for b in (3, 4)]
        stack.api.kill()  # SIGKILL: no goodbye
        stack.api.wait()
        down = time.monotonic()
        stack.start_api()
        print(f"\n[fault] API killed and restarted ({time.monotonic() - down:.1f} s to ready); every job still listed")
        ids = {j["id"] for j in team.http.get("/v1/jobs").json()["items"]}
        assert {long["id"], *(q["id"] for q in quick)} <= ids
        wait_until(lambda: _sandboxed_jobs(stack), timeout=120)  # the long job's process, running
        child = _sandboxed_jobs(stack)[0]
        timed_out = team.wait(long["id"], timeout=120)
        failed = time.monotonic()
        wait_until(lambda: not _alive(child), timeout=10)
        killed = time.monotonic() - failed
        wait_until(lambda: any(team.http.get(f"/v1/jobs/{q['id']}").json()["state"] != "queued"
                                              for q in quick), timeout=30)
        print(f"[fault] time limit: the job's sandboxed process was gone {killed:.2f} s after the job failed; "
              f"the next job left the queue {time.monotonic() - failed:.2f} s after it failed")
        assert timed_out["state"] == "failed" and "time limit of 8 s" in timed_out["error"]["message"]
        assert timed_out["error"]["code"] == "time_limit"
        assert "max_probes" in timed_out["error"]["hint"]
        for q in quick:
            assert team.wait(q["id"], timeout=240)["state"] == "succeeded"
        assert all(team.http.get(f"/v1/jobs/{j}").json()["state"] in TERMINAL for j in ids)
        print(f"[fault] time limit: {timed_out['error']['message']}")
