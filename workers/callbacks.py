"""Job callbacks: a POST of the ended job's JSON to the team's ``callback_url``, sent
from an outbox so that a slow or dead receiver never holds up a job or a worker.

* ``check_callback_url`` refuses URLs that would reach the service's own network
  (loopback, link-local and cloud metadata, private ranges, multicast, ...) unless the
  operator allowed the host or network with ``BITPLAN_CALLBACK_ALLOW``; it runs at
  submit and again at send time, because DNS answers can change in between.
* ``deliver`` connects to exactly the addresses it checked (no second DNS lookup),
  verifies TLS against the host name, never follows redirects, caps the total time
  and the bytes it reads, and returns a short status (never the response body).
* ``schedule_callback`` marks an ending job's callback as due, inside the session
  that ends the job; ``deliver_due`` claims due callbacks (``FOR UPDATE SKIP LOCKED``
  and a lease), sends them outside any transaction and records the outcome, retrying
  with backoff; ``CallbackDispatcher`` runs it in a thread with a small pool.

Torch-free: the API process runs the dispatcher.
"""

from __future__ import annotations

import datetime as dt
import http.client
import io
import ipaddress
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

from sqlalchemy import select
from sqlalchemy.orm import Session

from bitplan.errors import BitplanError
from storage import Database
from storage.models import Job, utcnow
from storage.views import job_dict

log = logging.getLogger("bitplan.callbacks")

ALLOW_HINT = ("use a public http(s) URL; an operator can let callbacks reach other hosts or networks with "
              "BITPLAN_CALLBACK_ALLOW (host names or CIDRs, e.g. BITPLAN_CALLBACK_ALLOW=hooks.internal,10.1.0.0/16)")
USER_AGENT = "bitplan-callback"
LEASE_S = 60.0  # a claimed callback is not taken by another dispatcher for this long (more than one send takes)
BACKOFF_S = (5.0, 15.0, 45.0, 120.0, 300.0, 600.0)  # wait before the 2nd, 3rd, ... attempt
STATUS_MAX = 200

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class CallbackError(BitplanError):
    """A callback URL that may not be used; ``retry`` says whether trying later could help (DNS failure)."""

    code = "bad_callback"

    def __init__(self, message: str, hint: str | None = ALLOW_HINT, retry: bool = False) -> None:
        super().__init__(message, hint)
        self.retry = retry


@dataclass(frozen=True)
class Target:
    """A checked callback URL: where to connect (``addresses``, in resolver order) and what to ask for."""

    scheme: str
    host: str  # as in the Host header and the TLS server name (IDNA-encoded, no brackets)
    port: int
    path: str  # path and query
    addresses: tuple[IPAddress, ...]


# --- the address check -------------------------------------------------------------------------------------------------

def address_problem(ip: IPAddress) -> str | None:
    """Why ``ip`` is not a public unicast address ("a loopback address", ...), or None if it is one."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            inner = address_problem(embedded)
            return None if inner is None else f"{inner} (IPv4 {embedded} inside IPv6)"
        if ip.is_site_local:
            return "a site-local address"
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address (cloud metadata lives there)"
    if ip.is_multicast:
        return "a multicast address"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT:
        return "a shared (carrier-grade NAT) address"
    if ip.is_reserved:
        return "a reserved address"
    if ip.is_private:
        return "a private address"
    if not ip.is_global:
        return "not a public address"
    return None


def _parse_allow(allow: Iterable[str]) -> tuple[set[str], list[ipaddress.IPv4Network | ipaddress.IPv6Network]]:
    names, networks = set(), []
    for entry in allow:
        entry = str(entry).strip()
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            names.add(entry.lower().rstrip("."))
    return names, networks


def _in_networks(ip: IPAddress, networks) -> bool:
    forms = [ip]
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        forms.append(ip.ipv4_mapped)
    return any(form.version == net.version and form in net for form in forms for net in networks)


def _resolve(host: str, port: int) -> tuple[IPAddress, ...]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise CallbackError(f"callback_url host {host} does not resolve ({reason})",
                            "check the host name in callback_url; it must resolve in the service's DNS",
                            retry=True) from None
    seen: dict[IPAddress, None] = {}
    for _family, _type, _proto, _canon, sockaddr in infos:
        try:
            seen.setdefault(ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0]), None)
        except ValueError:
            continue
    if not seen:
        raise CallbackError(f"callback_url host {host} does not resolve to any IP address",
                            "check the host name in callback_url", retry=True)
    return tuple(seen)


def resolve_callback(url: str, allow: Iterable[str] = ()) -> Target:
    """Parse and check ``url``; the Target's addresses are the ones checked (connect to these only).
    Raises CallbackError saying what was refused and why."""
    if not isinstance(url, str) or not url:
        raise CallbackError("callback_url is empty", "send an http:// or https:// URL, or leave callback_url out")
    if any(ord(c) < 33 or ord(c) == 127 for c in url):
        raise CallbackError("callback_url contains spaces or control characters", "percent-encode them")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise CallbackError(f"callback_url is not a valid URL ({exc})", "send an http:// or https:// URL") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise CallbackError(f"callback_url scheme '{parts.scheme}' is not allowed; only http and https are",
                            "send an http:// or https:// URL")
    if "@" in parts.netloc:
        raise CallbackError("callback_url carries a user name or password (user:pass@host); that is refused",
                            "put credentials in the path or query (e.g. a secret token), not before the host")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise CallbackError("callback_url has no host", "send a URL like https://hooks.example.com/bitplan")
    if port is None:
        port = 443 if scheme == "https" else 80
    if not 1 <= port <= 65535:
        raise CallbackError(f"callback_url port {port} is not a valid port (1-65535)", "fix the port in callback_url")
    try:
        ascii_host = host.encode("idna").decode("ascii")
    except UnicodeError:
        raise CallbackError(f"callback_url host {host!r} is not a valid host name", "fix the host in callback_url") from None
    names, networks = _parse_allow(allow)
    addresses = _resolve(ascii_host, port)
    if ascii_host.lower() not in names:
        shown = host if len(host) <= 100 else host[:100] + "..."
        try:
            literal = ipaddress.ip_address(host) is not None
        except ValueError:
            literal = False
        for ip in addresses:
            problem = address_problem(ip)
            if problem is None or _in_networks(ip, networks):
                continue
            said = f"host {shown} is" if literal else f"host {shown} resolves to {ip},"
            raise CallbackError(f"callback_url {said} {problem}; callbacks go only to public addresses")
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(scheme, ascii_host, port, path, addresses)


def check_callback_url(url: str, allow: tuple[str, ...] = ()) -> None:
    """Raise CallbackError (code ``bad_callback``) unless ``url`` may be used as a callback: http(s), a host, no
    user:pass@, a valid port, and every address the host resolves to public, or allowed by ``allow`` (host names,
    exact and case-insensitive, or CIDRs: BITPLAN_CALLBACK_ALLOW)."""
    resolve_callback(url, allow)


# --- one delivery ------------------------------------------------------------------------------------------------------

class _CappedReader(io.RawIOBase):
    """Reads from a socket, at most ``budget`` bytes in all (then EOF), so an endless answer is not read."""

    def __init__(self, sock: socket.socket, budget: int) -> None:
        self._sock, self.budget = sock, budget

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.budget <= 0:
            return 0
        view = memoryview(buffer)[: self.budget]
        n = self._sock.recv_into(view)
        self.budget -= n
        return n


class _CappedSocket:
    """What http.client needs of a socket (sendall, makefile, close), with every read counted against one budget."""

    def __init__(self, sock: socket.socket, budget: int) -> None:
        self._sock = sock
        self._reader = _CappedReader(sock, budget)

    def sendall(self, data) -> None:
        self._sock.sendall(data)

    def makefile(self, mode: str = "rb", *args, **kwargs):
        return io.BufferedReader(self._reader, buffer_size=8192)

    def close(self) -> None:
        self._sock.close()


def _short(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= STATUS_MAX else text[: STATUS_MAX - 3] + "..."


def _reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not accepted ({exc.verify_message or exc})"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, http.client.HTTPException):
        return f"bad HTTP answer ({type(exc).__name__})"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def send(target: Target, body: bytes, timeout_s: float = 10.0, max_response_bytes: int = 65536) -> str:
    """POST ``body`` to an already checked Target; the short status (see ``deliver``)."""
    deadline = time.monotonic() + timeout_s
    sock: socket.socket | None = None
    last: BaseException | None = None
    for ip in target.addresses:  # the checked addresses only: no second lookup
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            sock = socket.create_connection((str(ip), target.port), timeout=remaining)
            break
        except OSError as exc:
            last = exc
    if sock is None:
        return _short(f"error: {_reason(last) if last else 'timed out'}")
    expired = threading.Event()

    def _expire() -> None:  # the total time is capped, also for an answer dripped a byte at a time
        expired.set()
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    timer = threading.Timer(max(0.0, deadline - time.monotonic()), _expire)
    timer.daemon = True
    timer.start()
    conn = None
    try:
        if target.scheme == "https":
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=target.host)
            conn = http.client.HTTPSConnection(target.host, target.port, timeout=timeout_s)
        else:
            conn = http.client.HTTPConnection(target.host, target.port, timeout=timeout_s)
        conn.sock = _CappedSocket(sock, max_response_bytes)
        conn.request("POST", target.path, body=body, headers={
            "Content-Type": "application/json", "User-Agent": USER_AGENT, "Connection": "close"})
        response = conn.getresponse()
        if expired.is_set():  # the headers were cut short by the time limit, not ended by the receiver
            return f"error: timed out after {timeout_s:g} s"
        status = response.status
        try:
            response.read(max_response_bytes)  # politely take some of the answer; never more than the cap
        except Exception:  # the status is what counts
            pass
        if 300 <= status < 400:
            return f"{status} (redirect not followed)"
        return str(status)
    except Exception as exc:
        if expired.is_set():
            return f"error: timed out after {timeout_s:g} s"
        return _short(f"error: {_reason(exc)}")
    finally:
        timer.cancel()
        try:
            if conn is not None:
                conn.close()
            sock.close()
        except Exception:
            pass


def deliver(url: str, body: bytes, allow: tuple[str, ...] = (), timeout_s: float = 10.0,
            max_response_bytes: int = 65536) -> str:
    """Check ``url`` again (DNS may have changed since submit), then POST ``body`` as JSON to the checked addresses.

    Returns a short status: the HTTP status ("200", "500"), "302 (redirect not followed)", "refused: <why>" for an
    address that is not allowed, or "error: <reason>" (DNS, connection, TLS, time limit). Never the response body.
    """
    try:
        target = resolve_callback(url, allow)
    except CallbackError as exc:
        return _short(("error: " if exc.retry else "refused: ") + exc.message)
    return send(target, body, timeout_s, max_response_bytes)


def is_success(status: str) -> bool:
    return len(status) == 3 and status.startswith("2") and status.isdigit()


# --- the outbox --------------------------------------------------------------------------------------------------------

def schedule_callback(session: Session, job: Job) -> None:
    """Mark the ending job's callback as due now (nothing if it has none); call it inside the session that ends
    the job, so the job's end and its callback are committed together."""
    if job.callback_url:
        job.callback_due_at = utcnow()
        job.callback_attempts = 0
        job.callback_status = "pending"


@dataclass(frozen=True)
class _Claim:
    job_id: str
    url: str
    body: bytes
    attempt: int  # this attempt's number (1 for the first); also the token that the claim is still ours


def backoff_s(attempt: int) -> float:
    """The wait after failed attempt number ``attempt`` (1-based)."""
    return BACKOFF_S[min(attempt, len(BACKOFF_S)) - 1]


def _claim(db: Database, limit: int, now: dt.datetime, lease_s: float) -> list[_Claim]:
    claims = []
    with db.session() as s:
        jobs = s.scalars(select(Job).where(Job.callback_due_at.is_not(None), Job.callback_due_at <= now)
                         .order_by(Job.callback_due_at).limit(limit).with_for_update(skip_locked=True)).all()
        for job in jobs:
            if not job.callback_url:
                job.callback_due_at = None
                continue
            job.callback_attempts = (job.callback_attempts or 0) + 1
            job.callback_due_at = now + dt.timedelta(seconds=lease_s)  # ours for the lease; resent after it if we die
            claims.append(_Claim(job.id, job.callback_url, json.dumps(job_dict(job)).encode(), job.callback_attempts))
    return claims


def _record(db: Database, claim: _Claim, status: str, max_attempts: int, now: dt.datetime | None) -> None:
    when = now or utcnow()
    with db.session() as s:
        job = s.get(Job, claim.job_id, with_for_update=True)
        if job is None or job.callback_attempts != claim.attempt:  # rescheduled or reclaimed meanwhile
            return
        if is_success(status) or status.startswith("refused:"):  # a refused address is not retried
            job.callback_due_at, job.callback_status = None, status
        elif claim.attempt >= max_attempts:
            job.callback_due_at = None
            job.callback_status = _short(f"gave up after {claim.attempt} attempts: {status}")
        else:
            job.callback_due_at = when + dt.timedelta(seconds=backoff_s(claim.attempt))
            job.callback_status = status


def _send_and_record(db: Database, claim: _Claim, allow: tuple[str, ...], max_attempts: int, now: dt.datetime | None,
                     timeout_s: float) -> str:
    try:
        status = deliver(claim.url, claim.body, allow, timeout_s=timeout_s)
    except Exception as exc:  # a bug here must not lose the callback: it is retried like any failure
        log.exception("callback of %s failed", claim.job_id)
        status = _short(f"error: {type(exc).__name__}")
    try:
        _record(db, claim, status, max_attempts, now)
    except Exception as exc:  # database away: the lease runs out and the callback is sent again
        log.warning("could not record the callback of %s (%s): %s", claim.job_id, status, exc)
    log.info("callback of %s (attempt %d): %s", claim.job_id, claim.attempt, status)
    return status


def deliver_due(db: Database, allow: tuple[str, ...] = (), limit: int = 20, max_attempts: int = 5,
                now: dt.datetime | None = None, *, timeout_s: float = 10.0, executor=None) -> int:
    """Send the callbacks that are due at ``now`` (default: the current time); returns how many were taken.

    They are claimed in one short transaction (``FOR UPDATE SKIP LOCKED``, and their due time pushed past a lease so
    no other dispatcher takes them), then sent outside any transaction, each outcome recorded on its job: 2xx ends
    the callback; a refused address ends it too (retrying cannot help); other failures are retried after
    ``BACKOFF_S`` until ``max_attempts``. With ``executor`` the sends are submitted to it and not waited for.
    """
    claimed_at = now or utcnow()
    claims = _claim(db, limit, claimed_at, max(LEASE_S, 3 * timeout_s))
    for claim in claims:
        if executor is None:
            _send_and_record(db, claim, tuple(allow), max_attempts, now, timeout_s)
        else:
            executor.submit(_send_and_record, db, claim, tuple(allow), max_attempts, now, timeout_s)
    return len(claims)


class CallbackDispatcher:
    """``deliver_due`` every ``every_s`` seconds in a daemon thread until ``stop()``, sends on a pool of at most
    ``workers`` threads (a slow receiver holds one thread, not the others' callbacks). Errors are logged and the
    next pass tries again (the database may be down)."""

    def __init__(self, db: Database, allow: tuple[str, ...] = (), every_s: float = 1.0, workers: int = 4,
                 max_attempts: int = 5, timeout_s: float = 10.0) -> None:
        self.db, self.allow, self.every_s = db, tuple(allow), every_s
        self.workers, self.max_attempts, self.timeout_s = max(1, min(int(workers), 4)), max_attempts, timeout_s
        self._pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="bitplan-callback")
        self._busy = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bitplan-callbacks", daemon=True)

    def start(self) -> CallbackDispatcher:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop claiming; sends in flight are abandoned (their lease runs out and another pass sends them again)."""
        self._stop.set()
        self._thread.join(timeout=10)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def submit(self, fn, *args) -> None:
        with self._lock:
            self._busy += 1
        future = self._pool.submit(fn, *args)
        future.add_done_callback(self._done)

    def _done(self, _future) -> None:
        with self._lock:
            self._busy -= 1

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                free = self.workers - self._busy
            taken = 0
            if free > 0:
                try:
                    taken = deliver_due(self.db, self.allow, limit=free, max_attempts=self.max_attempts,
                                        timeout_s=self.timeout_s, executor=self)
                except Exception as exc:  # the database may be down; the next pass tries again
                    log.warning("callback pass failed: %s", exc)
            if self._stop.wait(0.05 if taken == free and taken else self.every_s):
                break
