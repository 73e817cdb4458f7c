"""A local deployment for tests and benchmarks: the API and N workers as real
processes on a fresh PostgreSQL database and a Redis database of their own
(or the embedded default: one ``bitplan serve`` with SQLite and no Redis).

    with DevStack(workers=2) as stack:
        key = stack.create_key("vision")
        httpx.get(stack.url + "/v1/jobs", headers={"Authorization": f"Bearer {key}"})
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

PG_ADMIN_URL = os.environ.get("BITPLAN_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("BITPLAN_TEST_REDIS", "redis://127.0.0.1:6379")


@contextmanager
def fresh_database(admin_url: str = PG_ADMIN_URL) -> Iterator[str]:
    """A new, empty PostgreSQL database for one test module; its SQLAlchemy URL. Dropped afterwards."""
    import psycopg

    name = f"bitplan_test_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield admin_url.replace("postgresql://", "postgresql+psycopg://").rsplit("/", 1)[0] + f"/{name}"
    finally:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


#: Redis databases tests may take (0 holds the claims; 15 is the rate-limit tests', which use key prefixes)
CLAIMABLE_DBS = range(1, 15)


def claim_redis_db(redis_url: str = REDIS_URL, hold_s: int = 3600) -> int:
    """A Redis database no other test process is using now (tests run in parallel under pytest-xdist): claimed
    with SET NX on database 0, given back by :func:`release_redis_db` (or by expiry after ``hold_s``)."""
    import redis

    client = redis.Redis.from_url(f"{redis_url}/0", socket_timeout=5)
    try:
        for _ in range(600):
            for db in CLAIMABLE_DBS:
                if client.set(f"bitplan-test-claim:{db}", os.getpid(), nx=True, ex=hold_s):
                    return db
            time.sleep(0.5)
    except Exception as exc:
        raise RuntimeError(f"Redis at {redis_url} is needed for the service tests: {exc}") from exc
    finally:
        client.close()
    raise RuntimeError(f"no free test database in Redis at {redis_url} after 5 minutes")


def release_redis_db(db: int, redis_url: str = REDIS_URL) -> None:
    import redis

    try:
        client = redis.Redis.from_url(f"{redis_url}/0", socket_timeout=5)
        client.delete(f"bitplan-test-claim:{db}")
        client.close()
    except Exception:  # down in a fault test: the claim expires
        pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DevStack:
    def __init__(self, workers: int = 2, embedded: bool = False, redis_db: int | None = None,
                 workdir: str | Path | None = None, extra_env: dict[str, str] | None = None,
                 redis_url: str | None = None, pg_admin_url: str | None = None) -> None:
        self.redis_url = redis_url or REDIS_URL
        self.pg_admin_url = pg_admin_url or PG_ADMIN_URL
        self.n_workers = 0 if embedded else workers
        self.embedded = embedded
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="bitplan-stack-"))
        self.data_dir = self.workdir / "data"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._claimed = redis_db is None and not embedded
        self.redis_db = redis_db if redis_db is not None else (claim_redis_db(self.redis_url) if self._claimed else 0)
        self.pg_db = f"bitplan_test_{secrets.token_hex(4)}"
        self.extra_env = extra_env or {}
        self.api: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self._logs: list = []

    # --- environment ------------------------------------------------------------------------------

    @property
    def database_url(self) -> str:
        if self.embedded:
            return f"sqlite:///{self.data_dir / 'bitplan.db'}"
        return self.pg_admin_url.replace("postgresql://", "postgresql+psycopg://").rsplit("/", 1)[0] + f"/{self.pg_db}"

    @property
    def broker_url(self) -> str:
        return "memory://" if self.embedded else f"{self.redis_url}/{self.redis_db}"

    @property
    def tmp_dir(self) -> Path:
        """TMPDIR of the stack's processes: their sandboxes (``bitplan-sandbox/``) live here, apart from others'."""
        path = Path(self.workdir) / "tmp"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["TMPDIR"] = str(self.tmp_dir)
        env.update(BITPLAN_DATA_DIR=str(self.data_dir), BITPLAN_DATABASE_URL=self.database_url,
                   BITPLAN_BROKER_URL=self.broker_url, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
                   # the tests' callback receivers listen on loopback: the operator's exception to the SSRF guard
                   BITPLAN_CALLBACK_ALLOW="127.0.0.1")
        env.pop("BITPLAN_RESULT_BACKEND", None)
        env.update(self.extra_env)
        return env

    def _bitplan(self, *args: str, log: str, **kw) -> subprocess.Popen:
        out = open(self.workdir / log, "ab")  # noqa: SIM115 (closed in stop())
        self._logs.append(out)
        return subprocess.Popen([sys.executable, "-m", "bitplan.cli", *args], env=self.env(), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.workdir, **kw)

    # --- lifecycle --------------------------------------------------------------------------------

    def start(self) -> DevStack:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not self.embedded:
            self._create_database()
            self._flush_redis()
        self.start_api()
        for _ in range(self.n_workers):
            self.start_worker()
        return self

    def start_api(self) -> None:
        args = ["serve", "--port", str(self.port)]
        if not self.embedded:
            args.append("--no-worker")
        self.api = self._bitplan(*args, log="api.log")
        self.wait_ready()

    def start_worker(self, name: str | None = None) -> subprocess.Popen:
        name = name or f"w{len(self.workers) + 1}"
        proc = self._bitplan("worker", f"--hostname={name}@%h", "--loglevel=INFO", log=f"{name}.log")
        self.workers.append(proc)
        self._wait_log(f"{name}.log", "ready.", proc)
        return proc

    def wait_ready(self, timeout: float = 120) -> None:
        import httpx

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.api is not None and self.api.poll() is not None:
                raise RuntimeError(f"the API exited ({self.api.returncode}):\n{self.log('api.log')}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"the API was not ready within {timeout} s:\n{self.log('api.log')}")

    def _wait_log(self, name: str, marker: str, proc: subprocess.Popen, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if marker in self.log(name):
                return
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited ({proc.returncode}):\n{self.log(name)}")
            time.sleep(0.2)
        raise TimeoutError(f"{name} not ready within {timeout} s:\n{self.log(name)}")

    def log(self, name: str) -> str:
        path = self.workdir / name
        return path.read_text(errors="replace") if path.exists() else ""

    def create_key(self, team: str) -> str:
        out = subprocess.run([sys.executable, "-m", "bitplan.cli", "keys", "create", "--team", team], env=self.env(),
                             capture_output=True, text=True, check=True, timeout=120)
        return out.stdout.strip()

    def stop(self) -> None:
        for proc in [*self.workers, self.api]:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in [*self.workers, self.api]:
            if proc is not None:
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for f in self._logs:
            f.close()
        if not self.embedded:
            self._drop_database()
        if self._claimed:
            release_redis_db(self.redis_db, self.redis_url)
            self._claimed = False

    def __enter__(self) -> DevStack:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- services ---------------------------------------------------------------------------------

    def _admin(self):
        import psycopg

        return psycopg.connect(self.pg_admin_url, autocommit=True, connect_timeout=10)

    def _create_database(self) -> None:
        try:
            with self._admin() as conn:
                conn.execute(f'CREATE DATABASE "{self.pg_db}"')
        except Exception as exc:
            raise RuntimeError(f"PostgreSQL at {self.pg_admin_url} is needed for the service tests: {exc}") from exc

    def _drop_database(self) -> None:
        try:
            with self._admin() as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{self.pg_db}" WITH (FORCE)')
        except Exception:  # the server may be down in a fault test; the name is random anyway
            pass

    def _flush_redis(self) -> None:
        import redis

        try:
            redis.Redis.from_url(self.broker_url, socket_timeout=5).flushdb()
        except Exception as exc:
            raise RuntimeError(f"Redis at {self.redis_url} is needed for the service tests: {exc}") from exc


class PrivateRedis:
    """A redis-server of its own on a free port (no persistence), to stop and start in fault tests."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> PrivateRedis:
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if redis.Redis.from_url(self.url, socket_timeout=1).ping():
                    return self
            except redis.RedisError:
                time.sleep(0.1)
        raise TimeoutError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class PrivatePostgres:
    """A PostgreSQL cluster of its own (initdb in a temporary folder, trust auth, a free port), to stop and
    start in fault tests. Runs as the ``postgres`` user when this process is root (initdb refuses root)."""

    BIN = sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1] if Path("/usr/lib/postgresql").exists() else None

    def __init__(self) -> None:
        # its own folder under /tmp: the postgres user must be able to reach it (pytest's tmp_path is root-only)
        self.root = Path(tempfile.mkdtemp(prefix="bitplan-pg-"))
        self.dir = self.root / "pgdata"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        cmd = [str(self.BIN / args[0]), *args[1:]]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)

    def init(self) -> PrivatePostgres:
        if self.BIN is None:
            raise RuntimeError("PostgreSQL server binaries not found under /usr/lib/postgresql")
        self.dir.mkdir(parents=True)
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            shutil.chown(self.root, "postgres", "postgres")
        self._run("initdb", "-D", str(self.dir), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        return self.start()

    def start(self) -> PrivatePostgres:
        self._run("pg_ctl", "-D", str(self.dir), "-w", "-l", str(self.dir / "server.log"), "-o",
                  f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        return self

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.dir), "-w", "-m", "immediate", "stop")
        except subprocess.CalledProcessError:
            pass

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
