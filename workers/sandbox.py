"""Where untrusted work runs: never in the API process or a worker's own process,
but in a child forked from a zygote (``workers/zygote.py``) that was started with a
minimal environment (no database URL, broker URL or API key), in a temporary
working directory, and that sets CPU-time and memory limits before it reads a
byte. A child that must stop (cancelled, timed out, its job taken over) is
killed with its whole process group, so the worker is free again at once.

Torch-free: the API process uses this to read uploads.

    sandbox = shared_sandbox()
    result = sandbox.run("describe", {...}, limits=Limits(wall_s=300, memory_mb=8192))
"""

from __future__ import annotations

import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bitplan.errors import BitplanError

log = logging.getLogger("bitplan.sandbox")

#: Variables a child may see, from the environment of the process that starts the zygote. Everything else
#: (BITPLAN_DATABASE_URL, BITPLAN_BROKER_URL, BITPLAN_API_KEY, cloud credentials, ...) stays behind.
PASSED_ENV = ("PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "PYTHONPATH", "VIRTUAL_ENV", "LD_LIBRARY_PATH",
              "OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "CUDA_VISIBLE_DEVICES",
              "NVIDIA_VISIBLE_DEVICES", "PYTHONWARNINGS")
FIXED_ENV = {"TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
             "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}
MAX_OUTPUT = 512 << 20
START_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Limits:
    wall_s: float = 3600.0  # the child is killed after this long
    memory_mb: int = 0  # address space (RLIMIT_AS); 0: none
    cpu_s: int = 0  # CPU seconds (RLIMIT_CPU) as a backstop; 0: derived from wall_s


class SandboxStopped(Exception):
    """The child was killed because ``should_stop`` said so; ``reason`` is what it said."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SandboxError(BitplanError):
    """The child ended without an answer: killed by a limit, out of memory, or crashed."""

    code = "worker_error"


class InternalError(RuntimeError):
    """The child raised an unexpected exception (a bug); ``traceback`` is the child's."""

    def __init__(self, type_name: str, message: str, traceback: str) -> None:
        super().__init__(f"{type_name}: {message}")
        self.type_name, self.message, self.traceback = type_name, message, traceback


def child_error(error: dict) -> Exception:
    """The exception a child's ``{"error": ...}`` stands for: a BitplanError as it was raised, else InternalError."""
    if error.get("kind") == "user":
        return BitplanError.from_dict(error)
    return InternalError(str(error.get("type", "Error")), str(error.get("message", "")), str(error.get("traceback", "")))


class Sandbox:
    """One zygote per process, started on first use and again if it dies; safe to use from many threads."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root or tempfile.gettempdir()) / "bitplan-sandbox"
        self._lock = threading.Lock()
        self._zygote: _Zygote | None = None
        self.children: dict[int, str] = {}  # pid -> task, while they run (for operators and tests)

    def run(self, task: str, args: dict, limits: Limits, on_progress: Callable[[str, float, str], None] | None = None,
            should_stop: Callable[[], str | None] | None = None, env: dict[str, str] | None = None,
            poll_s: float = 0.2) -> dict:
        """Run ``task`` in a fresh child and return its result; raise what the child raised, SandboxStopped when
        ``should_stop()`` returned a reason (checked every ``poll_s``), or SandboxError when it died."""
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        workdir = Path(tempfile.mkdtemp(prefix=f"{task}-", dir=self.root))
        read_fd, write_fd = os.pipe()
        cpu = limits.cpu_s or int(limits.wall_s * max(1, os.cpu_count() or 1)) + 30
        request = {"task": task, "args": args, "workdir": str(workdir), "env": env or {},
                   "limits": {"cpu_s": cpu, "memory_mb": limits.memory_mb}}
        try:
            try:
                zygote, pid = self._spawn(request, write_fd)
            finally:
                os.close(write_fd)
            self.children[pid] = task
            try:
                return self._follow(zygote, pid, read_fd, workdir, limits, on_progress, should_stop, poll_s)
            finally:
                self.children.pop(pid, None)
        finally:
            os.close(read_fd)
            shutil.rmtree(workdir, ignore_errors=True)

    def warm(self) -> None:
        """Start the zygote now (it imports torch: seconds), rather than on the first request."""
        with self._lock:
            if self._zygote is None or not self._zygote.alive():
                self.root.mkdir(parents=True, exist_ok=True, mode=0o700)  # a fresh TMPDIR has none yet
                self._zygote = _Zygote.start(self.root)

    def warm_in_background(self) -> None:
        def warm() -> None:
            try:
                self.warm()
            except Exception as exc:  # the first request will try again and report it
                log.warning("could not start the sandbox: %s", exc)

        threading.Thread(target=warm, name="bitplan-sandbox-warm", daemon=True).start()

    def close(self) -> None:
        with self._lock:
            if self._zygote is not None:
                self._zygote.close()
                self._zygote = None

    def _spawn(self, request: dict, write_fd: int) -> tuple[_Zygote, int]:
        for attempt in range(2):
            with self._lock:
                if self._zygote is None or not self._zygote.alive():
                    self._zygote = _Zygote.start(self.root)
                zygote = self._zygote
            try:
                return zygote, zygote.spawn(request, write_fd)
            except OSError as exc:  # the zygote died between requests: start another once
                log.warning("sandbox zygote unavailable (%s); starting a new one", exc)
                zygote.close()
                if attempt:
                    raise SandboxError("the sandbox process could not be started", "see the worker log") from exc
        raise AssertionError("unreachable")

    def _follow(self, zygote: _Zygote, pid: int, read_fd: int, workdir: Path, limits: Limits,
                on_progress, should_stop, poll_s: float) -> dict:
        deadline = time.monotonic() + limits.wall_s
        buffer = b""
        total = 0
        answer: dict | None = None
        poller = select.poll()  # (not select(): a busy API process may hand out descriptors above 1024)
        poller.register(read_fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        try:
            while True:
                if poller.poll(poll_s * 1000):
                    chunk = os.read(read_fd, 1 << 16)
                    if not chunk:
                        break
                    total += len(chunk)
                    if total > MAX_OUTPUT:
                        raise SandboxError("the sandboxed process wrote more output than allowed")
                    buffer += chunk
                    *lines, buffer = buffer.split(b"\n")
                    for line in lines:
                        message = _message(line)
                        if "progress" in message and on_progress is not None:
                            stage, fraction, detail = (list(message["progress"]) + ["", 0.0, ""])[:3]
                            on_progress(str(stage)[:32], float(fraction), str(detail)[:500])
                        elif "result" in message or "error" in message:
                            answer = message
                if should_stop is not None:
                    reason = should_stop()
                    if reason:
                        raise SandboxStopped(reason)
                if time.monotonic() > deadline:
                    raise SandboxStopped(f"time limit of {limits.wall_s:g} s")
        except BaseException:
            _kill(pid)
            zygote.wait_exit(pid, 10.0)
            raise
        code = zygote.wait_exit(pid, 30.0)
        if answer is not None and "result" in answer:
            return answer["result"]
        if answer is not None:
            raise child_error(answer["error"])
        raise SandboxError(_death(code, limits, workdir), "see the worker log for the process's last output")


def _message(line: bytes) -> dict:
    try:
        message = json.loads(line)
    except ValueError:
        raise SandboxError("the sandboxed process wrote something that is not JSON") from None
    if not isinstance(message, dict):
        raise SandboxError("the sandboxed process wrote something that is not a JSON object")
    return message


def _death(code: int | None, limits: Limits, workdir: Path) -> str:
    tail = ""
    try:
        tail = (workdir / "stderr.log").read_text(errors="replace")[-2000:]
    except OSError:
        pass
    if tail:
        log.warning("sandboxed process ended with code %s; its last output:\n%s", code, tail)
    if code == -signal.SIGKILL:
        memory = f" (memory limit {limits.memory_mb} MB)" if limits.memory_mb else ""
        return f"the sandboxed process running the model was killed, most likely for running out of memory{memory}"
    if code == -signal.SIGXCPU:
        return "the sandboxed process running the model used up its CPU-time limit"
    if code is not None and code < 0:
        return f"the sandboxed process running the model crashed (signal {-code})"
    if tail and "MemoryError" in tail:
        return f"the sandboxed process running the model ran out of memory (limit {limits.memory_mb} MB)"
    return f"the sandboxed process running the model stopped without an answer (exit code {code})"


def _kill(pid: int) -> None:
    """Kill the child and everything it started (it leads its own process group)."""
    for target in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            target()
            return
        except (ProcessLookupError, PermissionError):
            continue


class _Zygote:
    """The zygote process and the thread that reads its answers."""

    def __init__(self, proc: subprocess.Popen, sock: socket.socket, home: Path) -> None:
        self.proc, self.sock, self.home = proc, sock, home
        self._send = threading.Lock()
        self._cond = threading.Condition()
        self._pids: dict[int, int | str] = {}  # request id -> pid (or an error)
        self._exits: dict[int, int] = {}
        self._next = 0
        self._closed = False
        self._reader = threading.Thread(target=self._read, name="bitplan-sandbox-reader", daemon=True)

    @classmethod
    def start(cls, root: Path) -> _Zygote:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        home = Path(tempfile.mkdtemp(prefix="zygote-", dir=root))
        env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        project = str(Path(__file__).resolve().parent.parent)  # so `workers` imports without an install
        env["PYTHONPATH"] = os.pathsep.join(p for p in (project, env.get("PYTHONPATH")) if p)
        env.update(FIXED_ENV, HOME=str(home), TMPDIR=str(home))
        log_file = open(home / "zygote.log", "ab")
        try:
            proc = subprocess.Popen([sys.executable, "-m", "workers.zygote", "--fd", str(child.fileno())],
                                    env=env, cwd=home, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
                                    pass_fds=[child.fileno()], start_new_session=True)
        finally:
            child.close()
            log_file.close()
        parent.settimeout(START_TIMEOUT_S)
        try:
            hello = json.loads(parent.recv(1 << 16) or b"{}")
        except (OSError, ValueError):
            hello = {}
        if "ready" not in hello:
            proc.kill()
            parent.close()
            tail = (home / "zygote.log").read_text(errors="replace")[-2000:]
            raise SandboxError("the sandbox process did not start", f"its output: {tail}" if tail else None)
        parent.settimeout(None)
        zygote = cls(proc, parent, home)
        zygote._reader.start()
        return zygote

    def alive(self) -> bool:
        return not self._closed and self.proc.poll() is None

    def spawn(self, request: dict, write_fd: int) -> int:
        with self._cond:
            self._next += 1
            ident = self._next
        payload = json.dumps({**request, "id": ident}).encode()
        with self._send:
            socket.send_fds(self.sock, [payload], [write_fd])
        with self._cond:
            if not self._cond.wait_for(lambda: ident in self._pids or self._closed, timeout=30):
                raise OSError("the sandbox did not answer")
            if ident not in self._pids:
                raise OSError("the sandbox ended")
            pid = self._pids.pop(ident)
        if not isinstance(pid, int):
            raise OSError(str(pid))
        return pid

    def wait_exit(self, pid: int, timeout: float) -> int | None:
        with self._cond:
            self._cond.wait_for(lambda: pid in self._exits or self._closed, timeout=timeout)
            return self._exits.pop(pid, None)

    def _read(self) -> None:
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except OSError:
                data = b""
            if not data:
                break
            try:
                message = json.loads(data)
            except ValueError:
                continue
            with self._cond:
                if "exit" in message:
                    self._exits[int(message["exit"])] = int(message["code"])
                elif "id" in message:
                    self._pids[int(message["id"])] = message.get("pid") or str(message.get("error"))
                self._cond.notify_all()
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def close(self) -> None:
        self._closed = True
        try:
            self.sock.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.home, ignore_errors=True)


_SHARED: Sandbox | None = None
_SHARED_LOCK = threading.Lock()


def _forget_after_fork() -> None:
    """A forked process (a Celery prefork child) must not use its parent's zygote: its reader thread is not here."""
    global _SHARED, _SHARED_LOCK
    _SHARED, _SHARED_LOCK = None, threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)


def shared_sandbox() -> Sandbox:
    """The process's sandbox (one zygote per process, shared by the API's upload reader and its worker)."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = Sandbox()
        return _SHARED
