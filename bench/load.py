"""Load on the service: many clients submit cheap jobs at once while others poll, against a real
deployment on loopback (the API and worker processes on Redis + PostgreSQL, tests/devstack.py),
to find lost jobs and double submissions, and to see what latency a busy API gives.

    python bench/load.py                               # 200 jobs, 50 submitters, 20 pollers, 60 s, 4 teams
    python bench/load.py --jobs 20 --duration 10       # a quick check
    python bench/load.py --embedded                    # `bitplan serve` alone (SQLite, in-process worker)
    python bench/load.py --retry-429                   # resubmit quota rejections after Retry-After

Every team uploads the digits CNN and its calibration data once; then every job is the same cheap
request (Fisher sensitivity on 64 samples, greedy solver) with one of a few budgets, so after the
first job the sensitivity table comes from the cache and the load is the API, the database and the
broker. Each submission carries its own Idempotency-Key, and a network error or a 5xx is retried
with the same key (up to 3 times): a retry must never create a second job. A 429 (per-team job
quota or per-key rate limit) is honoured: polls wait Retry-After and go on; submissions count as
rejected unless --retry-429.

The load phase ends when the pollers have run --duration seconds and every accepted job has
ended, but never later than --deadline seconds after it began. Then every accepted job is read
once more and each team's job list is compared with what the bench was told:

* lost: an accepted job that GET /v1/jobs/{id} could not find, or that had not ended by the deadline;
* duplicates: a key answered with two job ids, or a team holding more jobs than the bench accepted
  (beyond submissions it gave up on, whose job may exist unseen).

The exit code is 1 when either is above 0. The clients are asyncio tasks in one process on the
same cores as the service: latencies include the client's own scheduling; compare runs on one
machine with each other, not with other machines.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import shlex
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.devstack: the local deployment harness
from tests.devstack import DevStack

MODEL = "digits_cnn"
TERMINAL = frozenset({"succeeded", "failed", "cancelled"})
BUDGETS = (2.5, 3.0, 3.5, 4.0, 5.0, 6.0)  # avg_weight_bits: varied, yet all served by one cached sensitivity table
RETRIES = 3  # extra attempts after a network error or a 5xx, same Idempotency-Key
REQUEST_TIMEOUT = 30.0  # per request; a timed-out POST is retried, which is what the idempotency key is for
UPLOAD_TIMEOUT = 300.0


@dataclass
class Team:
    name: str
    key: str
    model_id: str = ""
    dataset_id: str = ""

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}


@dataclass
class Submission:
    index: int
    team: Team
    key: str  # the Idempotency-Key: one per job, kept across retries
    body: dict


@dataclass
class Tally:
    """Everything the clients saw; one event loop writes it, so no locks."""

    submit_ms: list[float] = field(default_factory=list)  # 202 answers only
    poll_ms: list[float] = field(default_factory=list)  # 200 answers only
    random_polls: int = 0  # 200 answers to the random pollers (the --duration stream)
    rejected: Counter[int] = field(default_factory=Counter)  # the final answer of a submission that was not 202
    rejected_samples: dict[int, str] = field(default_factory=dict)
    submit_429: int = 0  # every 429 to POST /v1/jobs, retried or not
    poll_429: int = 0
    codes_429: Counter[str] = field(default_factory=Counter)  # error.code of 429s: tells a quota from a rate limit
    server_errors: Counter[str] = field(default_factory=Counter)  # "POST 503" -> n, every 5xx answer
    network_errors: Counter[str] = field(default_factory=Counter)  # "POST ReadTimeout" -> n
    other_poll: Counter[int] = field(default_factory=Counter)
    retries: int = 0
    replays: int = 0  # 202s with Idempotent-Replay: a retry found its first attempt's job
    gave_up: Counter[str] = field(default_factory=Counter)  # team -> submissions with no answer after all retries
    ids_by_key: dict[str, set[str]] = field(default_factory=dict)
    accepted: dict[str, Team] = field(default_factory=dict)  # job id -> its team
    accepted_ids: list[str] = field(default_factory=list)  # the same ids, for random.choice
    state: dict[str, str] = field(default_factory=dict)  # job id -> last state seen during the load phase
    not_found: set[str] = field(default_factory=set)
    cache_hit: dict[str, bool] = field(default_factory=dict)  # job id -> its sensitivity table came from the cache
    failure_samples: list[str] = field(default_factory=list)
    started_at: float = 0.0  # time.monotonic() when the load phase began
    last_poll_at: float = 0.0


# --- setup --------------------------------------------------------------------------------------------------------


def export(out: Path) -> tuple[Path, Path]:
    """The catalog CNN and its calibration data as files, the way a user would upload them."""
    subprocess.run([sys.executable, "-m", "bitplan.cli", "catalog", "export", MODEL, "--out", str(out)], check=True,
                   capture_output=True, timeout=300)
    return out / f"{MODEL}.pt2", out / f"{MODEL}_calib.npz"


async def upload(http: httpx.AsyncClient, team: Team, path: Path, kind: str) -> str:
    """One multipart upload; a team sees only its own uploads, so every team uploads (the blob is shared)."""
    with open(path, "rb") as f:
        r = await http.post(f"/v1/{kind}", files={"file": (path.name, f.read())}, headers=team.auth)
    if r.status_code not in (200, 201):
        raise SystemExit(f"upload of {path.name} for {team.name} answered {r.status_code}: {r.text[:300]}")
    return r.json()["id"]


async def upload_all(url: str, teams: list[Team], model: Path, data: Path) -> None:
    """Uploads for all teams at once: each is read by a child process, so they overlap well."""
    async with httpx.AsyncClient(base_url=url, timeout=UPLOAD_TIMEOUT) as http:
        async def one(team: Team) -> None:
            team.model_id, team.dataset_id = await asyncio.gather(upload(http, team, model, "models"),
                                                                  upload(http, team, data, "datasets"))

        await asyncio.gather(*(one(t) for t in teams))


def submissions(teams: list[Team], jobs: int) -> Iterator[Submission]:
    """Jobs round-robin over teams (so no team's quota dominates) and over budgets."""
    for i in range(jobs):
        team = teams[i % len(teams)]
        body = {"model_id": team.model_id, "dataset_id": team.dataset_id,
                "budgets": {"avg_weight_bits": BUDGETS[i % len(BUDGETS)]}, "w_bits": [2, 3, 4, 8],
                "sensitivity": {"method": "fisher", "params": {"max_samples": 64}}, "solver": {"method": "greedy"}}
        yield Submission(i, team, str(uuid.uuid4()), body)


# --- requests -----------------------------------------------------------------------------------------------------


def retry_after(r: httpx.Response, default: float = 1.0) -> float:
    """Seconds to wait as the server asks (bounded, so a bad header cannot stall the bench)."""
    try:
        return min(max(float(r.headers.get("Retry-After", default)), 0.05), 60.0)
    except ValueError:  # an HTTP date: not worth parsing here
        return default


def error_code(r: httpx.Response) -> str:
    try:
        return str(r.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "?"


def backoff(attempt: int) -> float:
    """Exponential with jitter, so retries after a hiccup do not arrive in one wave."""
    return 0.25 * 2 ** (attempt - 1) * (0.5 + random.random())


async def submit(http: httpx.AsyncClient, sub: Submission, tally: Tally, retry_429: bool, stop_at: float) -> str | None:
    """POST /v1/jobs until an answer that settles it; returns the job id when accepted."""
    headers = {**sub.team.auth, "Idempotency-Key": sub.key}
    failures = 0
    while True:
        t = time.perf_counter()
        try:
            r = await http.post("/v1/jobs", json=sub.body, headers=headers)
        except httpx.TransportError as exc:  # timeouts included: the job may exist, the retry's key will find it
            tally.network_errors[f"POST {type(exc).__name__}"] += 1
            r = None
        if r is not None and r.status_code == 202:
            tally.submit_ms.append(1e3 * (time.perf_counter() - t))
            return accept(sub, r, tally)
        if r is not None and r.status_code == 429:
            tally.submit_429 += 1
            tally.codes_429[error_code(r)] += 1
            wait = retry_after(r)
            if retry_429 and time.monotonic() + wait < stop_at:
                await asyncio.sleep(wait)
                continue
            reject(sub, r, tally)
            return None
        if r is not None and r.status_code < 500:
            reject(sub, r, tally)
            return None
        if r is not None:
            tally.server_errors[f"POST {r.status_code}"] += 1
        failures += 1
        if failures > RETRIES or time.monotonic() >= stop_at:
            tally.gave_up[sub.team.name] += 1
            return None
        tally.retries += 1
        await asyncio.sleep(backoff(failures))


def accept(sub: Submission, r: httpx.Response, tally: Tally) -> str:
    job = r.json()
    ids = tally.ids_by_key.setdefault(sub.key, set())
    ids.add(job["id"])
    if r.headers.get("Idempotent-Replay") == "true":
        tally.replays += 1
    if job["id"] not in tally.accepted:
        tally.accepted[job["id"]] = sub.team
        tally.accepted_ids.append(job["id"])
        tally.state[job["id"]] = job["state"]
    return job["id"]


def reject(sub: Submission, r: httpx.Response, tally: Tally) -> None:
    tally.rejected[r.status_code] += 1
    tally.rejected_samples.setdefault(r.status_code, r.text[:300])


async def poll(http: httpx.AsyncClient, job_id: str, tally: Tally) -> bool:
    """One GET /v1/jobs/{id}; True when it answered 200 (its state is then in tally.state)."""
    team = tally.accepted[job_id]
    t = time.perf_counter()
    try:
        r = await http.get(f"/v1/jobs/{job_id}", headers=team.auth)
    except httpx.TransportError as exc:
        tally.network_errors[f"GET {type(exc).__name__}"] += 1
        return False
    tally.last_poll_at = time.monotonic()
    if r.status_code == 200:
        tally.poll_ms.append(1e3 * (time.perf_counter() - t))
        job = r.json()
        tally.state[job_id] = job["state"]
        tally.cache_hit[job_id] = bool(job.get("cache_hit"))
        if job["state"] == "failed" and len(tally.failure_samples) < 3:
            tally.failure_samples.append(f"{job_id}: {job['error']}")
        return True
    if r.status_code == 404:
        tally.not_found.add(job_id)
    elif r.status_code == 429:
        tally.poll_429 += 1
        tally.codes_429[error_code(r)] += 1
        await asyncio.sleep(retry_after(r))
    elif r.status_code >= 500:
        tally.server_errors[f"GET {r.status_code}"] += 1
    else:
        tally.other_poll[r.status_code] += 1
    return False


def ended(job_id: str, tally: Tally) -> bool:
    return tally.state.get(job_id) in TERMINAL or job_id in tally.not_found


# --- clients ------------------------------------------------------------------------------------------------------


async def submitter(url: str, plan: Iterator[Submission], tally: Tally, opts: argparse.Namespace, stop_at: float) -> None:
    """Takes jobs from the shared plan until it is empty, then polls its own jobs until they end, as a client would."""
    mine: list[str] = []
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT) as http:
        for sub in plan:  # one event loop: next() on the shared iterator needs no lock
            job_id = await submit(http, sub, tally, opts.retry_429, stop_at)
            if job_id is not None:
                mine.append(job_id)
        while time.monotonic() < stop_at:
            mine = [j for j in mine if not ended(j, tally)]
            if not mine:
                return
            for job_id in mine:
                await poll(http, job_id, tally)
            await asyncio.sleep(opts.own_poll_interval)


async def poller(url: str, tally: Tally, until: float, rng: random.Random) -> None:
    """Closed-loop GETs on random accepted jobs (any team's, with that team's key) for --duration seconds."""
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT) as http:
        while time.monotonic() < until:
            if not tally.accepted_ids:
                await asyncio.sleep(0.05)
                continue
            if await poll(http, rng.choice(tally.accepted_ids), tally):
                tally.random_polls += 1


async def load(url: str, teams: list[Team], opts: argparse.Namespace) -> tuple[Tally, float]:
    """The load phase; returns what was seen and its wall time."""
    tally = Tally()
    start = tally.started_at = time.monotonic()
    stop_at = start + opts.deadline
    plan = submissions(teams, opts.jobs)
    rng = random.Random(opts.seed)
    tasks = [asyncio.create_task(submitter(url, plan, tally, opts, stop_at)) for _ in range(opts.clients)]
    tasks += [asyncio.create_task(poller(url, tally, start + opts.duration, rng)) for _ in range(opts.pollers)]
    done, late = await asyncio.wait(tasks, timeout=max(0.0, stop_at - time.monotonic()))
    for task in late:  # past the deadline: in-flight requests are abandoned
        task.cancel()
    await asyncio.gather(*late, return_exceptions=True)
    for task in done:
        if task.exception() is not None:
            raise task.exception()
    return tally, time.monotonic() - start


# --- checks after the load ----------------------------------------------------------------------------------------


async def recheck(url: str, tally: Tally) -> tuple[set[str], int]:
    """Every accepted job once more: (ids not found, jobs whose ended state changed since) — both must be empty."""
    missing: set[str] = set()
    changed = 0
    gate = asyncio.Semaphore(8)

    async def one(http: httpx.AsyncClient, job_id: str) -> None:
        nonlocal changed
        async with gate:
            for attempt in range(RETRIES + 1):
                try:
                    r = await http.get(f"/v1/jobs/{job_id}", headers=tally.accepted[job_id].auth)
                except httpx.TransportError:
                    await asyncio.sleep(backoff(attempt + 1))
                    continue
                if r.status_code == 429 or r.status_code >= 500:
                    await asyncio.sleep(retry_after(r) if r.status_code == 429 else backoff(attempt + 1))
                    continue
                if r.status_code == 404:
                    missing.add(job_id)
                elif tally.state.get(job_id) in TERMINAL and r.json()["state"] != tally.state[job_id]:
                    changed += 1
                return

    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT) as http:
        await asyncio.gather(*(one(http, j) for j in tally.accepted_ids))
    return missing, changed


async def team_job_ids(http: httpx.AsyncClient, team: Team) -> set[str]:
    """All of a team's jobs as the server lists them (paged, 200 at a time)."""
    ids: set[str] = set()
    offset = 0
    while True:
        r = await http.get("/v1/jobs", params={"limit": 200, "offset": offset}, headers=team.auth)
        if r.status_code == 429:
            await asyncio.sleep(retry_after(r))
            continue
        r.raise_for_status()
        page = r.json()
        ids.update(j["id"] for j in page["items"])
        offset += len(page["items"])
        if not page["items"] or offset >= page["total"]:
            return ids


async def unseen_jobs(url: str, teams: list[Team], tally: Tally) -> tuple[int, int]:
    """(jobs the server holds that the bench was never given, of those more than its given-up submissions explain):
    the second is the double submissions a lost response would hide from the client."""
    unseen = excess = 0
    async with httpx.AsyncClient(base_url=url, timeout=REQUEST_TIMEOUT) as http:
        for team in teams:
            extra = len(await team_job_ids(http, team) - set(tally.accepted))
            unseen += extra
            excess += max(0, extra - tally.gave_up[team.name])
    return unseen, excess


# --- report -------------------------------------------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    """Nearest rank; nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(p * len(ordered)) - 1))]


def report(tally: Tally, wall: float, opts: argparse.Namespace, missing: set[str], changed: int,
           unseen: int, excess: int, log_notes: list[str]) -> int:
    """Prints the table and the oddities; returns the exit code."""
    states = Counter(tally.state[j] for j in tally.accepted_ids)
    lost_ids = tally.not_found | missing | {j for j in tally.accepted_ids if tally.state.get(j) not in TERMINAL}
    unfinished = sum(1 for j in tally.accepted_ids if tally.state.get(j) not in TERMINAL)
    cached = sum(1 for j in tally.accepted_ids if tally.state[j] == "succeeded" and tally.cache_hit.get(j, False))
    doubled = sum(len(ids) - 1 for ids in tally.ids_by_key.values() if len(ids) > 1)
    duplicates = doubled + excess
    rejected_4xx = {s: n for s, n in sorted(tally.rejected.items()) if s != 429}
    poll_span = max(tally.last_poll_at - tally.started_at, 1e-9)
    deployment = "embedded `bitplan serve` (SQLite, in-process worker)" if opts.embedded else \
        f"Redis + PostgreSQL, API + {opts.workers} worker processes"
    print(f"\ndeployment: {deployment}; {opts.teams} teams, {opts.clients} submitting clients, {opts.pollers} pollers, "
          f"duration {opts.duration:g} s, deadline {opts.deadline:g} s\n")
    rows = [
        ("jobs submitted", f"{opts.jobs}"),
        ("accepted (202)", f"{len(tally.accepted)}"),
        ("rejected 4xx (not 429)", ", ".join(f"{s}: {n}" for s, n in rejected_4xx.items()) or "0"),
        ("rejected 429 (final)", f"{tally.rejected[429]}"),
        ("429 answers (submit / poll)", f"{tally.submit_429} / {tally.poll_429}"),
        ("gave up (no answer after retries)", f"{sum(tally.gave_up.values())}"),
        ("completed (succeeded)", f"{states['succeeded']}"),
        ("of those, sensitivity from the cache", f"{cached}"),
        ("failed", f"{states['failed']}"),
        ("cancelled", f"{states['cancelled']}"),
        ("still unfinished at the deadline", f"{unfinished}"),
        ("**lost**", f"**{len(lost_ids)}**"),
        ("**duplicates**", f"**{duplicates}**"),
        ("submit p50 / p99 ms", f"{percentile(tally.submit_ms, 0.5):.0f} / {percentile(tally.submit_ms, 0.99):.0f}"),
        ("poll p50 / p99 ms", f"{percentile(tally.poll_ms, 0.5):.0f} / {percentile(tally.poll_ms, 0.99):.0f}"),
        ("polls (all 200s) / per s", f"{len(tally.poll_ms)} / {len(tally.poll_ms) / poll_span:.0f}"),
        ("random-poller polls / per s over --duration", f"{tally.random_polls} / {tally.random_polls / opts.duration:.0f}"),
        ("wall time s", f"{wall:.1f}"),
    ]
    print("| | |\n|---|---:|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    notes = oddities(tally, missing, changed, unseen, excess) + log_notes
    if notes:
        print("\n" + "\n".join(f"- {n}" for n in notes))
    return 1 if lost_ids or duplicates else 0


def oddities(tally: Tally, missing: set[str], changed: int, unseen: int, excess: int) -> list[str]:
    """Anything a reader of the table should know about: errors, retries, samples of rejections and failures."""
    notes = []
    if tally.server_errors:
        notes.append("5xx answers: " + ", ".join(f"{k}: {n}" for k, n in sorted(tally.server_errors.items())))
    if tally.network_errors:
        notes.append("network errors: " + ", ".join(f"{k}: {n}" for k, n in sorted(tally.network_errors.items())))
    if tally.retries or tally.replays:
        notes.append(f"submission retries: {tally.retries}; answered as idempotent replays: {tally.replays}")
    if tally.codes_429:
        notes.append("429 error codes: " + ", ".join(f"{k}: {n}" for k, n in sorted(tally.codes_429.items())))
    for status, text in sorted(tally.rejected_samples.items()):
        notes.append(f"a {status} to POST /v1/jobs: {text}")
    if tally.other_poll:
        notes.append("other poll answers: " + ", ".join(f"{s}: {n}" for s, n in sorted(tally.other_poll.items())))
    if tally.not_found or missing:
        notes.append(f"accepted jobs answered 404: during the load {len(tally.not_found)}, afterwards {len(missing)}")
    if changed:
        notes.append(f"{changed} jobs changed state after they had ended")
    if unseen:
        notes.append(f"jobs the server lists that the bench was never given: {unseen} ({excess} beyond given-up submissions)")
    notes += [f"failed job {s}" for s in tally.failure_samples]
    return notes


def log_trouble(stack: DevStack) -> list[str]:
    """Tracebacks and errors in the service's own logs: a 202 and a clean table can still hide a worker that crashed."""
    notes = []
    for path in sorted(stack.workdir.glob("*.log")):
        text = stack.log(path.name)
        tracebacks, errors = text.count("Traceback (most recent call last)"), text.count("ERROR")
        if tracebacks or errors:
            notes.append(f"{path.name}: {tracebacks} tracebacks, {errors} lines with ERROR (in {stack.workdir})")
    return notes


# --- main ---------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=200, help="job submissions (default 200)")
    ap.add_argument("--clients", type=int, default=50, help="concurrent submitting clients (default 50)")
    ap.add_argument("--pollers", type=int, default=20, help="clients polling random accepted jobs (default 20)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of random polling (default 60)")
    ap.add_argument("--deadline", type=float, default=600.0, help="hard end of the load phase, seconds (default 600)")
    ap.add_argument("--teams", type=int, default=4, help="teams (one key each) the jobs are spread over (default 4)")
    ap.add_argument("--workers", type=int, default=2, help="worker processes (default 2; not with --embedded)")
    ap.add_argument("--embedded", action="store_true", help="`bitplan serve` alone (SQLite, in-process worker)")
    ap.add_argument("--retry-429", action="store_true", help="resubmit a 429 after Retry-After instead of counting it")
    ap.add_argument("--own-poll-interval", type=float, default=0.5, help="a submitter's pause between its polls (s)")
    ap.add_argument("--seed", type=int, default=0, help="seed for the pollers' choice of jobs")
    opts = ap.parse_args(argv)
    for name in ("jobs", "clients", "teams", "workers"):
        if getattr(opts, name) < 1:
            ap.error(f"--{name} must be at least 1")
    if opts.pollers < 0 or opts.duration <= 0 or opts.deadline <= 0:
        ap.error("--pollers must be >= 0, --duration and --deadline > 0")
    return opts


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    print("$ " + shlex.join([Path(sys.executable).name, *sys.argv]), flush=True)
    work = Path(tempfile.mkdtemp(prefix="bitplan-load-"))
    model, data = export(work / "export")
    with DevStack(workers=opts.workers, embedded=opts.embedded, workdir=work / "stack") as stack:
        teams = [Team(f"load{i}", stack.create_key(f"load{i}")) for i in range(opts.teams)]
        t = time.perf_counter()
        asyncio.run(upload_all(stack.url, teams, model, data))
        print(f"uploads: {2 * len(teams)} in {time.perf_counter() - t:.1f} s; load phase starts", flush=True)
        tally, wall = asyncio.run(load(stack.url, teams, opts))
        missing, changed = asyncio.run(recheck(stack.url, tally))
        unseen, excess = asyncio.run(unseen_jobs(stack.url, teams, tally))
        log_notes = log_trouble(stack)
    return report(tally, wall, opts, missing, changed, unseen, excess, log_notes)


if __name__ == "__main__":
    sys.exit(main())
