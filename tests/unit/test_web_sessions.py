"""Web sign-in sessions and CSRF protection of the web form (in-process app on SQLite, no worker).

The browser holds only a random session id, never the API key; signing out deletes the session, so a
replayed cookie is refused; every state-changing form post needs the session's CSRF token and, when the
browser names where it comes from (Origin, else Referer), this site as its origin. A refused post stores
nothing, creates no job and cancels nothing.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from bitplan.settings import Settings, load_settings
from service.app import create_app
from storage import Database
from storage.models import DatasetFile, Job, WebSession

COOKIE = "bitplan_session"
HERE = "http://testserver"  # TestClient's own origin
REFUSED = "expired or was sent from another site"


@dataclass
class Stack:
    app: FastAPI
    db: Database
    settings: Settings
    key: str
    model_id: str
    calib: bytes

    @property
    def bearer(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def count(self, cls) -> int:
        with self.db.session() as s:
            return s.scalar(select(func.count()).select_from(cls))

    def job_state(self, job_id: str) -> str:
        with self.db.session() as s:
            return s.get(Job, job_id).state

    def files(self) -> list[Path]:
        """Stored blobs and staged uploads."""
        return sorted(p for sub in ("blobs", "tmp") for p in (self.settings.data_dir / sub).rglob("*") if p.is_file())


def _settings(root: Path, **overrides) -> Settings:
    return load_settings(data_dir=str(root), database_url=f"sqlite:///{root / 'bitplan.db'}", broker_url="memory://",
                         result_backend="cache+memory://", **overrides)


@pytest.fixture(scope="module")
def stack(tmp_path_factory, digits_files):
    root = tmp_path_factory.mktemp("web-sessions")
    settings = _settings(root)
    db = Database(settings.database_url)
    db.migrate()
    key = db.create_key("team")
    app = create_app(settings, worker=False, reconcile=False)
    with TestClient(app) as client:
        r = client.post("/v1/models", files={"file": ("digits.pt2", digits_files["pt2"].read_bytes())},
                        headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 201, r.text
        yield Stack(app, db, settings, key, r.json()["id"], digits_files["calib"].read_bytes())
    db.engine.dispose()


@pytest.fixture
def client(stack):
    """A browser of its own (a fresh cookie jar) on the shared app."""
    return TestClient(stack.app, follow_redirects=False)


def sign_in(client: TestClient, key: str):
    r = client.post("/login", data={"key": key, "next": "/"})
    assert r.status_code == 303, r.text
    return r


def token_of(client: TestClient, path: str = "/") -> str:
    r = client.get(path)
    assert r.status_code == 200, r.text
    tokens = set(re.findall(r'name="csrf_token" value="([^"]*)"', r.text))
    assert len(tokens) == 1 and "" not in tokens, tokens
    return tokens.pop()


def job_form(stack: Stack, **extra) -> dict:
    return {"model_id": stack.model_id, "dataset_id": "synthetic", "budget_kind": "avg_weight_bits", "budget_value": "4",
            "w_bits": ["2", "3", "4", "5", "6", "8"], "a_bits": "16", "sensitivity": "hessian_trace", "solver": "ilp",
            **extra}


def refused(r) -> None:
    assert r.status_code == 403, (r.status_code, r.text[:500])
    assert REFUSED in r.text and "<a href=" in r.text, r.text


def sent_back_to_sign_in(r) -> None:
    assert r.status_code == 303 and r.headers["location"].startswith("/login"), (r.status_code, r.headers)


# --- the cookie ---------------------------------------------------------------------------------------------


def test_sign_in_sets_a_random_session_cookie_never_the_key(stack, client):
    r = sign_in(client, stack.key)
    set_cookies = r.headers.get_list("set-cookie")
    assert set_cookies and not any(stack.key in c for c in set_cookies), set_cookies
    assert not any("bitplan_key" in c for c in set_cookies), set_cookies
    [cookie] = [c for c in set_cookies if c.startswith(f"{COOKIE}=")]
    lowered = cookie.lower()
    assert "httponly" in lowered and "samesite=strict" in lowered and "path=/" in lowered
    assert f"max-age={int(stack.settings.session_hours * 3600)}" in lowered
    assert "secure" not in lowered  # plain http here; https adds Secure
    session_id = client.cookies[COOKIE]
    assert len(session_id) >= 40 and stack.key not in session_id
    with stack.db.session() as s:  # only the id's hash is stored
        rows = s.scalars(select(WebSession)).all()
    digests = {row.id_sha256 for row in rows}
    assert hashlib.sha256(session_id.encode()).hexdigest() in digests and session_id not in digests

    page = client.get("/")
    assert page.status_code == 200 and "team <strong>team</strong>" in page.text
    assert stack.key not in page.text


def test_a_key_or_made_up_id_in_a_cookie_does_not_sign_in(stack, client):
    client.cookies.set("bitplan_key", stack.key)  # what older versions stored: browsers are told to drop it
    r = client.get("/")
    sent_back_to_sign_in(r)
    login = client.get(r.headers["location"])
    assert login.status_code == 200
    assert any(c.startswith("bitplan_key=") and "max-age=0" in c.lower() for c in login.headers.get_list("set-cookie"))
    client.cookies.clear()
    for value in ("made-up", stack.key):
        client.cookies.set(COOKIE, value)
        sent_back_to_sign_in(client.get("/"))
        sent_back_to_sign_in(client.get("/jobs"))


# --- signing out --------------------------------------------------------------------------------------------


def test_sign_out_ends_the_session_even_for_a_replayed_cookie(stack, client):
    sign_in(client, stack.key)
    session_id = client.cookies[COOKIE]
    token = token_of(client)
    sessions = stack.count(WebSession)

    refused(client.post("/logout"))  # no token: not signed out
    refused(client.post("/logout", data={"csrf_token": token}, headers={"Origin": "http://evil.example"}))
    assert client.get("/").status_code == 200

    r = client.post("/logout", data={"csrf_token": token}, headers={"Origin": HERE})
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert any(c.startswith(f"{COOKIE}=") and "max-age=0" in c.lower() for c in r.headers.get_list("set-cookie"))
    assert stack.count(WebSession) == sessions - 1

    replay = TestClient(stack.app, follow_redirects=False)  # an attacker who copied the cookie before sign-out
    replay.cookies.set(COOKIE, session_id)
    sent_back_to_sign_in(replay.get("/"))
    sent_back_to_sign_in(replay.get("/jobs"))
    jobs = stack.count(Job)
    sent_back_to_sign_in(replay.post("/", data=job_form(stack, csrf_token=token), headers={"Origin": HERE}))
    assert stack.count(Job) == jobs

    # the API key itself is not touched by signing out
    r = client.get("/v1/jobs", headers=stack.bearer)
    assert r.status_code == 200 and "items" in r.json()


def test_an_expired_session_is_refused(stack, client):
    sign_in(client, stack.key)
    digest = hashlib.sha256(client.cookies[COOKIE].encode()).hexdigest()
    with stack.db.session() as s:
        s.execute(update(WebSession).where(WebSession.id_sha256 == digest)
                  .values(expires_at=dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)))
    sent_back_to_sign_in(client.get("/"))
    # expired rows are cleared when the next session is opened
    sign_in(TestClient(stack.app, follow_redirects=False), stack.key)
    with stack.db.session() as s:
        assert s.get(WebSession, digest) is None


def test_a_session_lasts_session_hours(tmp_path):
    settings = _settings(tmp_path, session_hours=0.0005)  # 1.8 s
    db = Database(settings.database_url)
    db.migrate()
    key = db.create_key("team")
    with TestClient(create_app(settings, worker=False, reconcile=False), follow_redirects=False) as client:
        r = sign_in(client, key)
        assert "max-age=1;" in r.headers["set-cookie"].lower()
        assert client.get("/").status_code == 200
        assert client.get("/").status_code == 200  # (served from the lookup cache: it must still honour the expiry)
        time.sleep(2.0)
        sent_back_to_sign_in(client.get("/"))
        assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == 200
    db.engine.dispose()


# --- CSRF ---------------------------------------------------------------------------------------------------

FORGERIES = {
    "no token": ({}, {}),
    "wrong token": ({"csrf_token": "x" * 43}, {}),
    "empty token": ({"csrf_token": ""}, {}),
    "foreign Origin": (None, {"Origin": "http://evil.example"}),
    "Origin on another port": (None, {"Origin": "http://testserver:8080"}),
    "Origin over https": (None, {"Origin": "https://testserver"}),
    "Origin null": (None, {"Origin": "null"}),
    "foreign Referer": (None, {"Referer": "http://evil.example/page"}),
}


@pytest.mark.parametrize("forgery", FORGERIES)
def test_a_forged_job_post_stores_and_creates_nothing(stack, client, forgery):
    fields, headers = FORGERIES[forgery]
    sign_in(client, stack.key)
    token = token_of(client)
    fields = {"csrf_token": token} if fields is None else fields  # None: the right token, from the wrong site
    jobs, datasets, files = stack.count(Job), stack.count(DatasetFile), stack.files()
    r = client.post("/", data=job_form(stack, dataset_id="", **fields), headers=headers,
                    files={"data_file": ("calib.npz", stack.calib)})
    refused(r)
    assert (stack.count(Job), stack.count(DatasetFile), stack.files()) == (jobs, datasets, files)


def test_a_token_from_another_session_is_refused(stack, client):
    other = TestClient(stack.app, follow_redirects=False)
    sign_in(other, stack.key)
    sign_in(client, stack.key)
    assert token_of(other) != token_of(client)
    jobs = stack.count(Job)
    refused(client.post("/", data=job_form(stack, csrf_token=token_of(other)), headers={"Origin": HERE}))
    assert stack.count(Job) == jobs


def test_same_site_posts_with_the_token_submit_and_cancel(stack, client):
    sign_in(client, stack.key)
    token = token_of(client)
    jobs = stack.count(Job)
    r = client.post("/", data=job_form(stack, csrf_token=token), headers={"Origin": HERE})
    assert r.status_code == 303 and r.headers["location"].startswith("/jobs/j_"), (r.status_code, r.text[:2000])
    assert stack.count(Job) == jobs + 1
    job_id = r.headers["location"].rsplit("/", 1)[-1]
    assert stack.job_state(job_id) == "queued"

    page = client.get(f"/jobs/{job_id}")  # the cancel button carries the token too (also in the polled fragment)
    assert f'action="/jobs/{job_id}/cancel"><input type="hidden" name="csrf_token" value="{token}">' in page.text
    assert f'value="{token}"' in client.get(f"/jobs/{job_id}/progress").text

    for forgery, (fields, headers) in FORGERIES.items():
        fields = {"csrf_token": token} if fields is None else fields
        r = client.post(f"/jobs/{job_id}/cancel", data=fields, headers=headers)
        refused(r)
        assert f'href="/jobs/{job_id}"' in r.text
        assert stack.job_state(job_id) == "queued", forgery

    # the right token from this site (here named by the Referer alone) cancels
    r = client.post(f"/jobs/{job_id}/cancel", data={"csrf_token": token}, headers={"Referer": f"{HERE}/jobs/{job_id}"})
    assert r.status_code == 303 and r.headers["location"] == f"/jobs/{job_id}"
    assert stack.job_state(job_id) == "cancelled"


def test_the_form_ties_shared_inputs_when_asked_and_submit_again_keeps_it(stack, client):
    sign_in(client, stack.key)
    form = client.get("/").text
    assert 'name="tie_shared_inputs"' in form and 'id="tie_shared_inputs" name="tie_shared_inputs" value="1">' in form
    assert "<strong>auto</strong> (default)" in form and "<strong>hessian_trace</strong> (default)" not in form
    ids = []
    for extra in ({}, {"tie_shared_inputs": "1"}):
        r = client.post("/", data=job_form(stack, csrf_token=token_of(client), **extra), headers={"Origin": HERE})
        assert r.status_code == 303, r.text[:2000]
        ids.append(r.headers["location"].rsplit("/", 1)[-1])
    with stack.db.session() as s:
        assert [s.get(Job, i).request["tie_shared_inputs"] for i in ids] == [False, True]
    again = client.get(f"/?again={ids[1]}").text
    assert 'id="tie_shared_inputs" name="tie_shared_inputs" value="1" checked>' in again


def test_a_rerendered_form_keeps_the_token(stack, client):
    sign_in(client, stack.key)
    token = token_of(client)
    r = client.post("/", data=job_form(stack, csrf_token=token, budget_value="lots"))
    assert r.status_code == 422 and "is not a number" in r.text
    assert f'name="csrf_token" value="{token}"' in r.text


@pytest.mark.parametrize(("extra", "field", "words"), [
    ({"pins": "nowhere=8"}, "pins", "pins name unknown layer(s) [&#39;nowhere&#39;]"),
    ({"budget_value": "1.5"}, "budget_value", "cannot be met"),
    ({"budget_kind": "latency_ms", "budget_value": "3"}, "latency_table", "needs a lookup table"),
    ({"model_id": "m_nosuch"}, "model", "no model &#39;m_nosuch&#39;"),
])
def test_errors_sit_beside_the_field_they_name(stack, client, extra, field, words):
    sign_in(client, stack.key)
    r = client.post("/", data=job_form(stack, csrf_token=token_of(client), **extra), headers={"Origin": HERE})
    assert r.status_code == 422
    slot = r.text.split(f'id="{field}-error"', 1)
    assert len(slot) == 2 and words in slot[1].split("</p>", 1)[0], r.text[:3000]


def test_a_sign_in_posted_from_another_site_is_refused(stack, client):
    sessions = stack.count(WebSession)
    for headers in ({"Origin": "http://evil.example"}, {"Referer": "http://evil.example/login"}, {"Origin": "null"}):
        r = client.post("/login", data={"key": stack.key, "next": "/"}, headers=headers)
        refused(r)
        assert "set-cookie" not in r.headers
    assert stack.count(WebSession) == sessions
    r = client.post("/login", data={"key": stack.key, "next": "/jobs"}, headers={"Origin": HERE})
    assert r.status_code == 303 and r.headers["location"] == "/jobs" and COOKIE in client.cookies
