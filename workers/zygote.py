"""The sandbox's zygote: a process started with a minimal environment that imports
torch once and then forks one child per piece of untrusted work (reading an
upload, a job, a shard). See ``workers/sandbox.py`` for the side that asks.

Protocol, over the SOCK_SEQPACKET socket passed as fd ``--fd``: the zygote says
``{"ready": pid}``; each request is ``{"id", "task", "args", "limits", "workdir"}``
with one file descriptor attached (the write end of the pipe the child reports
on); the zygote answers ``{"id", "pid"}`` and, when that child ends,
``{"exit": pid, "code": n}`` (a negative code is the signal that ended it).

Each child, before it runs anything: starts its own session (so its whole tree
can be killed), dies with the zygote (PR_SET_PDEATHSIG), sets CPU-time,
address-space and core-size limits (resource.setrlimit), moves into its own
temporary working directory, and points stdin/stdout/stderr away from the
zygote's. It writes JSON lines on its pipe: ``{"progress": [stage, fraction,
detail]}`` while it works, then ``{"result": ...}`` or ``{"error": ...}``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import select
import signal
import socket
import sys
import traceback

MAX_REQUEST = 1 << 20


def _die_with_parent() -> None:
    """Linux: receive SIGKILL when the process that started this one ends (best effort elsewhere)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _limits(limits: dict) -> None:
    cpu = int(limits.get("cpu_s") or 0)
    if cpu > 0:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))
    memory = int(limits.get("memory_mb") or 0)
    if memory > 0:
        resource.setrlimit(resource.RLIMIT_AS, (memory << 20, memory << 20))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _child(request: dict, out_fd: int, sock: socket.socket) -> None:
    """In the forked child: isolate, run the task, report, exit (never returns)."""
    code = 0
    try:
        sock.close()
        os.setsid()
        _die_with_parent()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        workdir = request["workdir"]
        os.chdir(workdir)
        os.environ["TMPDIR"] = workdir
        os.environ["HOME"] = workdir
        for key, value in (request.get("env") or {}).items():
            os.environ[str(key)] = str(value)
        import tempfile

        tempfile.tempdir = workdir
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        log = os.open(os.path.join(workdir, "stderr.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.dup2(log, 1)  # stray prints from model code must not reach anyone's protocol
        os.dup2(log, 2)
        _limits(request.get("limits") or {})
        out = os.fdopen(out_fd, "w", buffering=1)
        from workers import untrusted

        try:
            result = untrusted.run(request["task"], request.get("args") or {}, out)
            message = {"result": result}
        except BaseException as exc:  # every failure becomes the answer; the parent decides what it means
            message = {"error": untrusted.describe_error(exc)}
            code = 2
        out.write(json.dumps(message) + "\n")
        out.flush()
    except BaseException:
        traceback.print_exc()
        code = 3
    finally:
        os._exit(code)


def _preload() -> None:
    """Import what every child needs once, here, so a fork starts in milliseconds, not seconds."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch  # noqa: F401
        import torch._dynamo  # noqa: F401  (what torch.export.load imports on first use)
        import torch._export.converter  # noqa: F401
        import torch._export.serde.serialize  # noqa: F401
        import torch._functorch.aot_autograd  # noqa: F401
        import torch._inductor.config  # noqa: F401
        import torch.export  # noqa: F401
        import torch.fx.experimental.symbolic_shapes  # noqa: F401

        import bitplan.core.describe  # noqa: F401
        import bitplan.core.pipeline  # noqa: F401
        import solver.greedy  # noqa: F401
        import solver.ilp

        solver.ilp.silence_banner()  # single-threaded here, before any fork
        import workers.untrusted  # noqa: F401


def serve(sock: socket.socket) -> None:
    children: set[int] = set()
    sock.sendmsg([json.dumps({"ready": os.getpid()}).encode()])
    while True:
        ready, _, _ = select.select([sock], [], [], 0.2)
        if ready:
            try:
                data, fds, _flags, _addr = socket.recv_fds(sock, MAX_REQUEST, 4)
            except (ConnectionResetError, OSError):
                data, fds = b"", []
            if not data:  # the parent is gone: so are we (children die with us)
                return
            request = json.loads(data)
            if not fds:
                sock.sendmsg([json.dumps({"id": request.get("id"), "error": "no pipe attached"}).encode()])
                continue
            pid = os.fork()
            if pid == 0:
                _child(request, fds[0], sock)
            for fd in fds:
                os.close(fd)
            children.add(pid)
            sock.sendmsg([json.dumps({"id": request["id"], "pid": pid}).encode()])
        while children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            children.discard(pid)
            code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            sock.sendmsg([json.dumps({"exit": pid, "code": code}).encode()])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m workers.zygote")
    parser.add_argument("--fd", type=int, required=True)
    args = parser.parse_args(argv)
    # (no PR_SET_PDEATHSIG here: it fires when the *thread* that started us ends, and API threads come and go;
    # the socket tells us when the parent process is gone)
    sock = socket.socket(fileno=args.fd)
    _preload()
    try:
        serve(sock)
    except (BrokenPipeError, ConnectionResetError):
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
