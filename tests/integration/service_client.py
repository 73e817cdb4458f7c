"""What the service tests share: a team's HTTP client and a callback receiver."""

from __future__ import annotations

import http.server
import json
import threading
import time

import httpx

from tests.devstack import DevStack

TERMINAL = ("succeeded", "failed", "cancelled")


def wait_until(condition, timeout: float, every: float = 0.2):
    """``condition()``'s first truthy value within ``timeout`` seconds, else AssertionError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"condition not met within {timeout} s")


class Team:
    def __init__(self, stack: DevStack, name: str) -> None:
        self.name = name
        self.key = stack.create_key(name)
        self.http = httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {self.key}"}, timeout=120)

    def upload(self, kind: str, path) -> httpx.Response:
        with open(path, "rb") as f:
            return self.http.post(f"/v1/{kind}", files={"file": (path.name, f)})

    def setup(self, files) -> Team:
        self.model = self.upload("models", files["pt2"]).json()
        self.data = self.upload("datasets", files["calib"]).json()
        return self

    def submit(self, **body) -> httpx.Response:
        return self.http.post("/v1/jobs", json=body)

    def wait(self, job_id: str, timeout: float = 300, until=TERMINAL) -> dict:
        deadline = time.monotonic() + timeout
        job = None
        while time.monotonic() < deadline:
            try:
                job = self.http.get(f"/v1/jobs/{job_id}").json()
            except httpx.HTTPError:  # the API may be restarting in a fault test
                time.sleep(0.3)
                continue
            if job.get("state") in until:
                return job
            time.sleep(0.3)
        raise AssertionError(f"job {job_id} not {until} after {timeout} s: {job}")


class Callbacks:
    """An HTTP server on loopback that records every job POSTed to it."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        received = self.received

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
