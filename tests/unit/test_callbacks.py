"""Job callbacks (workers/callbacks.py): no SSRF, no redirects, bounded time and bytes, and delivery from an outbox with
retries, outside job completion. Real HTTP receivers on loopback (allowed as the documented operator exception
BITPLAN_CALLBACK_ALLOW), a SQLite database, no PostgreSQL or Redis."""

from __future__ import annotations

import datetime as dt
import http.server
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time

import pytest

from storage import Database
from storage.models import Job, ModelFile, Team, utcnow
from workers import callbacks
from workers.callbacks import (
    CallbackDispatcher,
    CallbackError,
    check_callback_url,
    deliver,
    deliver_due,
    resolve_callback,
    schedule_callback,
)

LOOPBACK = ("127.0.0.1",)
PUBLIC = "93.184.216.34"  # a literal: checked without any network


class Receiver:
    """An HTTP server on 127.0.0.1 that records every request and answers as told."""

    def __init__(self, status: int = 200, delay: float = 0.0, location: str | None = None, body_bytes: int = 0,
                 drip: bool = False, tls: tuple[str, str] | None = None) -> None:
        self.requests: list[dict] = []
        self.written: list[int] = []  # bytes of body written, per request, once the answer is over
        self.got = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.requests.append({"path": self.path, "headers": dict(self.headers), "body": body, "at": time.monotonic()})
                outer.got.set()
                if drip:  # a status line and headers a byte at a time: no single read ever waits long
                    try:
                        for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 200:
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                            time.sleep(0.05)
                    except OSError:
                        pass
                    return
                time.sleep(delay)
                self.send_response(status)
                if location:
                    self.send_header("Location", location)
                self.send_header("Content-Length", str(body_bytes))
                self.end_headers()
                sent, chunk = 0, b"x" * (1 << 20)
                try:
                    while sent < body_bytes:
                        self.wfile.write(chunk[: body_bytes - sent])
                        sent += min(len(chunk), body_bytes - sent)
                except OSError:
                    pass
                outer.written.append(sent)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_port
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}/hook?token=t1"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receivers():
    made: list[Receiver] = []

    def make(**kwargs) -> Receiver:
        made.append(Receiver(**kwargs))
        return made[-1]

    yield make
    for r in made:
        r.close()


# --- the address check at submit ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("url, why", [
    ("http://127.0.0.1:9/x", "host 127.0.0.1 is a loopback address"),
    ("http://localhost:8080/", "host localhost resolves to 127.0.0.1, a loopback address"),
    ("http://[::1]/", "host ::1 is a loopback address"),
    ("http://169.254.169.254/latest/meta-data/", "host 169.254.169.254 is a link-local address"),
    ("http://[fe80::1]/", "is a link-local address"),
    ("http://10.0.0.1/", "host 10.0.0.1 is a private address"),
    ("http://192.168.1.1/", "host 192.168.1.1 is a private address"),
    ("https://172.16.0.1/", "host 172.16.0.1 is a private address"),
    ("http://[fd00::1]/", "is a private address"),
    ("http://100.64.0.1/", "carrier-grade NAT"),
    ("http://0.0.0.0:80/", "host 0.0.0.0 is an unspecified address"),
    ("http://[::]/", "is an unspecified address"),
    ("http://[::ffff:127.0.0.1]/", "a loopback address (IPv4 127.0.0.1 inside IPv6)"),
    ("http://[::ffff:169.254.169.254]/", "a link-local address"),
    ("http://[2002:7f00:1::]/", "a loopback address (IPv4 127.0.0.1 inside IPv6)"),  # 6to4 of 127.0.0.1
    ("http://224.0.0.1/", "host 224.0.0.1 is a multicast address"),
    ("http://[ff02::1]/", "is a multicast address"),
    ("http://[fec0::1]/", "is a site-local address"),
    ("http://240.0.0.1/", "is a reserved address"),
    ("http://2130706433/", "resolves to 127.0.0.1, a loopback address"),  # 127.0.0.1 as one decimal number
    ("http://127.1/", "resolves to 127.0.0.1, a loopback address"),
])
def test_internal_addresses_are_refused_at_submit(url, why):
    with pytest.raises(CallbackError) as refused:
        check_callback_url(url, ())
    err = refused.value
    assert err.code == "bad_callback"
    assert why in err.message and "callbacks go only to public addresses" in err.message, err.message
    assert "BITPLAN_CALLBACK_ALLOW" in err.hint


@pytest.mark.parametrize("url, why", [
    (f"http://user:secret@{PUBLIC}/hook", "user name or password"),
    (f"http://user@{PUBLIC}/hook", "user name or password"),
    (f"http://{PUBLIC}@127.0.0.1/", "user name or password"),
    ("http://no-such-host.invalid/hook", "host no-such-host.invalid does not resolve"),
    (f"ftp://{PUBLIC}/x", "scheme 'ftp' is not allowed"),
    ("http:///hook", "has no host"),
    (f"http://{PUBLIC}:0/", "port 0 is not a valid port"),
    (f"http://{PUBLIC}:70000/", "not a valid URL"),
    (f"http://{PUBLIC}/a b", "spaces or control characters"),
])
def test_malformed_and_unresolvable_urls_are_refused(url, why):
    with pytest.raises(CallbackError) as refused:
        check_callback_url(url, ("127.0.0.0/8",))
    assert why in refused.value.message, refused.value.message


def test_public_addresses_pass_and_the_checked_addresses_are_returned():
    check_callback_url(f"https://{PUBLIC}/hook", ())
    target = resolve_callback(f"https://{PUBLIC}:8443/hook?x=1#frag", ())
    assert (target.scheme, target.host, target.port, target.path) == ("https", PUBLIC, 8443, "/hook?x=1")
    assert [str(a) for a in target.addresses] == [PUBLIC]
    check_callback_url("http://[2606:4700:4700::1111]/hook", ())
    check_callback_url("http://[::ffff:8.8.8.8]/hook", ())  # IPv4-mapped public is public


def test_the_allow_list_opens_names_and_networks():
    check_callback_url("http://LocalHost:9/x", ("localhost",))  # by name, case-insensitive
    check_callback_url("http://127.0.0.1:9/x", ("127.0.0.0/8",))  # by CIDR
    check_callback_url("http://[::ffff:127.0.0.1]:9/x", ("127.0.0.0/8",))
    check_callback_url("http://10.1.2.3/x", ("10.1.0.0/16",))
    check_callback_url("http://10.1.2.3/x", ("10.1.9.9/16",))  # strict=False: host bits are ignored
    for url, allow in (("http://10.2.0.1/x", ("10.1.0.0/16",)), ("http://localhost/x", ("hooks.internal",)),
                       ("http://192.168.1.1/x", ("127.0.0.0/8",)), ("http://[::1]/x", ("127.0.0.0/8",))):
        with pytest.raises(CallbackError):
            check_callback_url(url, allow)


def test_every_resolved_address_must_pass(monkeypatch):
    """A name with one public and one internal address is refused (the sender might pick either)."""
    def fake(host, port, *args, **kwargs):
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (PUBLIC, port)),
                (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", port))]

    monkeypatch.setattr(callbacks.socket, "getaddrinfo", fake)
    with pytest.raises(CallbackError, match="host hooks.example.com resolves to 10.0.0.7, a private address"):
        check_callback_url("https://hooks.example.com/x", ())


def test_api_refuses_an_internal_callback_url_with_bad_callback(tmp_path):
    from fastapi.testclient import TestClient

    from bitplan.settings import load_settings
    from service.app import create_app

    def client(allow):
        settings = load_settings(data_dir=str(tmp_path / "data"), callback_allow=allow)
        db = Database(settings.database_url)
        db.migrate()
        c = TestClient(create_app(settings, worker=False, reconcile=False))
        c.headers["Authorization"] = f"Bearer {db.create_key('vision')}"
        return c

    body = {"model_id": "m_0000", "budgets": {"avg_weight_bits": 4}, "callback_url": "http://127.0.0.1:9/x"}
    with client(()) as api:
        r = api.post("/v1/jobs", json=body)
        assert r.status_code == 422, r.text
        error = r.json()["error"]
        assert error["code"] == "bad_callback" and "127.0.0.1 is a loopback address" in error["message"]
        assert "BITPLAN_CALLBACK_ALLOW" in error["hint"]
        assert api.get("/v1/jobs").json()["total"] == 0
    with client("127.0.0.0/8") as api:  # the operator's exception: the URL passes, the (missing) model is next
        assert api.post("/v1/jobs", json=body).status_code == 404


# --- one delivery ------------------------------------------------------------------------------------------------------

def test_delivery_posts_json_to_the_checked_address(receivers, monkeypatch):
    hook = receivers()
    assert deliver(hook.url, b'{"id": "j_1"}', LOOPBACK) == "200"
    (req,) = hook.requests
    assert req["path"] == "/hook?token=t1" and req["body"] == b'{"id": "j_1"}'
    assert req["headers"]["Content-Type"] == "application/json" and req["headers"]["User-Agent"] == "bitplan-callback"
    # a name is resolved once, and the connection goes to the address checked, with the name as Host
    lookups = []

    def fake(host, port, *args, **kwargs):
        lookups.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    monkeypatch.setattr(callbacks.socket, "getaddrinfo", fake)
    assert deliver(f"http://hooks.test:{hook.port}/named", b"{}", ("hooks.test",)) == "200"
    assert lookups.count("hooks.test") == 1 and set(lookups) <= {"hooks.test", "127.0.0.1"}  # (a literal: no DNS)
    assert hook.requests[-1]["headers"]["Host"] == f"hooks.test:{hook.port}"


def test_the_address_is_checked_again_at_send_time(receivers, monkeypatch):
    hook = receivers()
    check_callback_url(hook.url, LOOPBACK)  # accepted at submit under the operator's allow list
    status = deliver(hook.url, b"{}", ())  # the allow list was emptied since
    assert status.startswith("refused: callback_url host 127.0.0.1 is a loopback address"), status
    # DNS rebinding: the name was public at submit and points at the service's own network at send
    answers = iter([PUBLIC, "127.0.0.1"])
    monkeypatch.setattr(callbacks.socket, "getaddrinfo",
                        lambda host, port, *a, **k: [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (next(answers), port))])
    check_callback_url(f"http://rebind.test:{hook.port}/", ())
    status = deliver(f"http://rebind.test:{hook.port}/", b"{}", ())
    assert status.startswith("refused:") and "resolves to 127.0.0.1" in status, status
    time.sleep(0.1)
    assert hook.requests == []


def test_redirects_are_not_followed(receivers):
    target = receivers()
    hook = receivers(status=302, location=target.url)
    assert deliver(hook.url, b"{}", LOOPBACK) == "302 (redirect not followed)"
    assert len(hook.requests) == 1
    time.sleep(0.2)
    assert target.requests == []
    assert deliver(receivers(status=307, location=target.url).url, b"{}", LOOPBACK) == "307 (redirect not followed)"
    assert target.requests == []


def test_a_slow_receiver_gives_an_error_within_the_time_limit(receivers):
    slow = receivers(delay=3.0)
    start = time.monotonic()
    status = deliver(slow.url, b"{}", LOOPBACK, timeout_s=0.5)
    assert status.startswith("error:") and "timed out" in status, status
    assert time.monotonic() - start < 1.5
    # an answer dripped a byte at a time never lets one read time out: the total is capped all the same
    drip = receivers(drip=True)
    start = time.monotonic()
    status = deliver(drip.url, b"{}", LOOPBACK, timeout_s=0.8)
    assert status == "error: timed out after 0.8 s", status
    assert time.monotonic() - start < 1.8


def test_a_huge_answer_is_not_read_beyond_the_cap(receivers):
    huge = receivers(body_bytes=400 << 20)
    start = time.monotonic()
    assert deliver(huge.url, b"{}", LOOPBACK, max_response_bytes=65536) == "200"
    assert time.monotonic() - start < 3
    deadline = time.monotonic() + 10
    while not huge.written and time.monotonic() < deadline:
        time.sleep(0.05)
    assert huge.written and huge.written[0] < (64 << 20), huge.written  # the rest was never taken off the wire


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command to make a certificate")
def test_https_verifies_the_certificate_against_the_host_name(receivers, monkeypatch, tmp_path):
    cert, key = str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", key, "-out", cert, "-days", "1", "-subj", "/CN=hooks.test",
                    "-addext", "subjectAltName=DNS:hooks.test"], check=True, capture_output=True)
    hook = receivers(tls=(cert, key))
    real_lookup, real_context = socket.getaddrinfo, ssl.create_default_context
    monkeypatch.setattr(callbacks.socket, "getaddrinfo", lambda host, port, *a, **k: real_lookup(
        "127.0.0.1" if host.endswith(".test") else host, port, *a, **k))
    status = deliver(f"https://hooks.test:{hook.port}/x", b"{}", ("hooks.test",))
    assert status.startswith("error: TLS certificate not accepted") and "self-signed" in status, status
    monkeypatch.setattr(callbacks.ssl, "create_default_context", lambda *a, **k: real_context(cafile=cert))
    assert deliver(f"https://hooks.test:{hook.port}/x", b"{}", ("hooks.test",)) == "200"
    assert hook.requests[-1]["headers"]["Host"] == f"hooks.test:{hook.port}"
    status = deliver(f"https://other.test:{hook.port}/x", b"{}", ("other.test",))  # the same server, another name
    assert status.startswith("error: TLS certificate not accepted") and "other.test" in status, status
    assert len(hook.requests) == 1


def test_connection_errors_are_short_statuses(receivers):
    hook = receivers()
    port = hook.port
    hook.close()
    assert deliver(f"http://127.0.0.1:{port}/", b"{}", LOOPBACK) == "error: connection refused"
    assert deliver("http://no-such-host.invalid/", b"{}", ()).startswith("error: callback_url host no-such-host.invalid")


# --- the outbox --------------------------------------------------------------------------------------------------------

@pytest.fixture
def db(tmp_path):
    database = Database("sqlite:///" + str(tmp_path / "db.sqlite"))
    database.migrate()
    yield database
    database.engine.dispose()


def ended_job(db: Database, url: str | None, state: str = "succeeded", due: dt.datetime | None = None) -> str:
    """A job ended with its callback scheduled in the same session, as finish() and the reconciler do."""
    with db.session() as s:
        team = Team(name=f"team-{time.monotonic_ns()}")
        s.add(team)
        s.flush()
        model = ModelFile(team_id=team.id, sha256="0" * 64, name="m.pt2", format="pt2", size_bytes=1, description={})
        s.add(model)
        s.flush()
        job = Job(team_id=team.id, model_id=model.id, request={}, state=state, callback_url=url, finished_at=utcnow())
        s.add(job)
        s.flush()
        schedule_callback(s, job)
        if due is not None and job.callback_due_at is not None:
            job.callback_due_at = due
        return job.id


def row(db: Database, job_id: str) -> Job:
    with db.session() as s:
        return s.get(Job, job_id)


def aware(moment: dt.datetime | None) -> dt.datetime | None:
    return moment if moment is None or moment.tzinfo else moment.replace(tzinfo=dt.timezone.utc)


def test_schedule_marks_the_callback_due_and_success_clears_it(db, receivers):
    hook = receivers()
    assert row(db, ended_job(db, None)).callback_due_at is None  # no URL, nothing to send
    job_id = ended_job(db, hook.url)
    job = row(db, job_id)
    assert job.callback_due_at is not None and job.callback_attempts == 0 and job.callback_status == "pending"
    assert hook.requests == []  # ending a job sends nothing by itself
    assert deliver_due(db, LOOPBACK) == 1
    job = row(db, job_id)
    assert (job.callback_status, job.callback_due_at, job.callback_attempts) == ("200", None, 1)
    sent = json.loads(hook.requests[0]["body"])
    assert sent["id"] == job_id and sent["state"] == "succeeded"
    assert deliver_due(db, LOOPBACK, now=utcnow() + dt.timedelta(days=1)) == 0  # sent once


def test_failures_are_retried_with_backoff_then_given_up(db, receivers):
    hook = receivers(status=500)
    t0 = utcnow()
    job_id = ended_job(db, hook.url, due=t0)
    expected_waits = [5, 15, 45]
    now = t0
    for attempt, wait in enumerate(expected_waits, start=1):
        assert deliver_due(db, LOOPBACK, max_attempts=4, now=now) == 1
        job = row(db, job_id)
        assert (job.callback_attempts, job.callback_status) == (attempt, "500")
        assert aware(job.callback_due_at) == now + dt.timedelta(seconds=wait)
        assert deliver_due(db, LOOPBACK, max_attempts=4, now=now + dt.timedelta(seconds=wait - 1)) == 0  # not yet
        now += dt.timedelta(seconds=wait)
    assert deliver_due(db, LOOPBACK, max_attempts=4, now=now) == 1
    job = row(db, job_id)
    assert job.callback_attempts == 4 and job.callback_due_at is None
    assert job.callback_status == "gave up after 4 attempts: 500"
    assert len(hook.requests) == 4
    assert deliver_due(db, LOOPBACK, max_attempts=4, now=now + dt.timedelta(days=1)) == 0


def test_a_refused_address_is_recorded_and_not_retried(db, receivers):
    hook = receivers()
    job_id = ended_job(db, hook.url)
    assert deliver_due(db, ()) == 1  # the operator's allow list no longer covers it
    job = row(db, job_id)
    assert job.callback_due_at is None and job.callback_attempts == 1
    assert job.callback_status.startswith("refused: callback_url host 127.0.0.1 is a loopback address")
    assert hook.requests == []


def test_a_claimed_callback_is_not_taken_twice(db, receivers):
    slow = receivers(delay=1.0)
    job_id = ended_job(db, slow.url)
    first = threading.Thread(target=deliver_due, args=(db, LOOPBACK))
    first.start()
    assert slow.got.wait(5)
    assert deliver_due(db, LOOPBACK) == 0  # leased by the first dispatcher while it sends
    first.join(5)
    assert row(db, job_id).callback_status == "200" and len(slow.requests) == 1


def test_a_job_the_reconciler_fails_gets_its_callback_from_the_outbox(db, receivers, tmp_path):
    from bitplan.settings import load_settings
    from workers.reconcile import reconcile_once

    hook = receivers()
    settings = load_settings(data_dir=str(tmp_path / "data"), heartbeat_stale_s=30, max_attempts=3)
    job_id = ended_job(db, hook.url, state="running")
    old = utcnow() - dt.timedelta(seconds=120)
    with db.session() as s:
        job = s.get(Job, job_id)
        job.callback_due_at, job.callback_status, job.attempts, job.heartbeat_at, job.started_at = None, None, 3, old, old
    assert reconcile_once(db, lambda _id: None, settings) == {"requeued": 0, "failed": 1, "still_queued": 0}
    job = row(db, job_id)
    assert job.state == "failed" and job.callback_due_at is not None and job.callback_status == "pending"
    assert hook.requests == []  # not sent from inside the reconciler
    assert deliver_due(db, LOOPBACK) == 1
    assert json.loads(hook.requests[0]["body"])["state"] == "failed"


def test_the_dispatcher_does_not_let_a_slow_receiver_hold_back_others(db, receivers):
    slow, fast = receivers(delay=2.0), receivers()
    early = utcnow() - dt.timedelta(seconds=10)
    slow_id = ended_job(db, slow.url, due=early)  # claimed first
    fast_id = ended_job(db, fast.url)
    dispatcher = CallbackDispatcher(db, LOOPBACK, every_s=0.05, timeout_s=5.0).start()
    try:
        start = time.monotonic()
        assert fast.got.wait(5) and slow.got.wait(5)
        assert time.monotonic() - start < 1.5  # sent while the slow one (2 s) is still waiting for its answer
        deadline = time.monotonic() + 5
        while row(db, fast_id).callback_status != "200" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert row(db, fast_id).callback_status == "200" and row(db, slow_id).callback_status == "pending"
    finally:
        dispatcher.stop()


def test_the_dispatcher_survives_a_database_that_is_not_there_yet(tmp_path, receivers, caplog):
    hook = receivers()
    db = Database("sqlite:///" + str(tmp_path / "late.sqlite"))  # no tables yet: every pass fails
    dispatcher = CallbackDispatcher(db, LOOPBACK, every_s=0.05).start()
    try:
        time.sleep(0.3)
        assert "callback pass failed" in caplog.text
        db.migrate()
        ended_job(db, hook.url)
        assert hook.got.wait(5)
    finally:
        dispatcher.stop()
        db.engine.dispose()
