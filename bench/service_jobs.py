"""Service timings: a first job and a cached one (same model, data and method; another
budget and solver) on the digits CNN and on MiniLM, and how many job polls per second
the API answers.

    python bench/service_jobs.py                  # Redis + PostgreSQL, API + 1 worker processes
    python bench/service_jobs.py --embedded       # `bitplan serve` alone (SQLite, in-process worker)
    python bench/service_jobs.py --models digits_cnn --poll-seconds 5

Times are wall-clock from POST /v1/jobs to the poll that sees `succeeded`, on a shared
2-core machine: compare the rows with each other, not with other runs. The per-key rate limit
is switched off (BITPLAN_RATE_LIMIT=0), or the poll rate would be the limit's 50/s.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.devstack: the local deployment harness
from tests.devstack import DevStack


def export(name: str, out: Path) -> tuple[Path, Path]:
    subprocess.run([sys.executable, "-m", "bitplan.cli", "catalog", "export", name, "--out", str(out)], check=True,
                   capture_output=True)
    return out / f"{name}.pt2", out / f"{name}_calib.npz"


def run_job(http: httpx.Client, body: dict) -> tuple[float, dict, dict]:
    start = time.perf_counter()
    job = http.post("/v1/jobs", json=body).json()
    while job["state"] not in ("succeeded", "failed", "cancelled"):
        time.sleep(0.1)
        job = http.get(f"/v1/jobs/{job['id']}").json()
    seconds = time.perf_counter() - start
    if job["state"] != "succeeded":
        raise SystemExit(f"job failed: {job['error']}")
    return seconds, job, http.get(f"/v1/jobs/{job['id']}/plan").json()


def polls(url: str, key: str, job_id: str, clients: int, seconds: float) -> tuple[int, list[float]]:
    latencies: list[float] = []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client() -> None:
        mine = []
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
            while time.perf_counter() < stop:
                t = time.perf_counter()
                r = http.get(f"/v1/jobs/{job_id}")
                if r.status_code == 200:
                    mine.append(time.perf_counter() - t)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(latencies), latencies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="digits_cnn,minilm")
    ap.add_argument("--embedded", action="store_true")
    ap.add_argument("--method", default="hessian_trace")
    ap.add_argument("--poll-clients", type=int, default=8)
    ap.add_argument("--poll-seconds", type=float, default=10.0)
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bitplan-bench-"))
    rows = []
    # The poll count measures the API, not the per-key rate limit (50/s by default), so the limit is off here.
    with DevStack(workers=1, embedded=args.embedded, workdir=work, extra_env={"BITPLAN_RATE_LIMIT": "0"}) as stack:
        key = stack.create_key("bench")
        http = httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {key}"}, timeout=600)
        last_job = None
        for name in args.models.split(","):
            model_path, data_path = export(name, work / name)
            t = time.perf_counter()
            with open(model_path, "rb") as f:
                model = http.post("/v1/models", files={"file": (model_path.name, f)}).json()
            upload_s = time.perf_counter() - t
            with open(data_path, "rb") as f:
                data = http.post("/v1/datasets", files={"file": (data_path.name, f)}).json()
            base = {"model_id": model["id"], "dataset_id": data["id"], "sensitivity": {"method": args.method}}
            first_s, first, p1 = run_job(http, {**base, "budgets": {"avg_weight_bits": 4}})
            cached_s, cached, p2 = run_job(http, {**base, "budgets": {"avg_weight_bits": 3}, "solver": {"method": "greedy"}})
            last_job = cached["id"]
            rows.append((name, len(model["layers"]), upload_s, first_s, p1["timings"].get("sensitivity", 0.0), first["cache_hit"],
                         cached_s, p2["timings"].get("sensitivity", 0.0), cached["cache_hit"]))
        n, lat = polls(stack.url, key, last_job, args.poll_clients, args.poll_seconds)

    mode = "embedded (SQLite, in-process worker)" if args.embedded else "Redis + PostgreSQL, API + 1 worker process"
    print(f"deployment: {mode}; sensitivity method: {args.method}\n")
    print("| model | layers | upload s | first job s | its sensitivity s | cached job s | its sensitivity s | speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, layers, up, f, fs, fhit, c, cs, chit in rows:
        assert fhit is False and chit is True, (fhit, chit)
        print(f"| {name} | {layers} | {up:.1f} | {f:.1f} | {fs:.1f} | {c:.1f} | {cs:.3f} | {f / c:.1f}x |")
    lat.sort()
    print(f"\npolls: {n} GET /v1/jobs/{{id}} in {args.poll_seconds:.0f} s from {args.poll_clients} clients = "
          f"{n / args.poll_seconds:.0f}/s; latency p50 {1e3 * statistics.median(lat):.1f} ms, "
          f"p99 {1e3 * lat[int(0.99 * (len(lat) - 1))]:.1f} ms")


if __name__ == "__main__":
    main()
