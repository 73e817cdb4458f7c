"""Uploads through the API (in-process app on SQLite, no worker): content addressing,
TorchScript needs data, size limit, nothing stored for a refused file."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from bitplan.settings import load_settings
from service.app import create_app
from storage import Database


@pytest.fixture
def api(tmp_path):
    settings = load_settings(data_dir=str(tmp_path / "data"), max_upload_mb=2)
    db = Database(settings.database_url)
    db.migrate()
    key = db.create_key("vision")
    with TestClient(create_app(settings, worker=False)) as client:
        client.headers["Authorization"] = f"Bearer {key}"
        yield client, settings


def blobs(settings) -> list:
    root = settings.data_dir / "blobs"
    return sorted(p.name for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_model_upload_is_content_addressed(api, digits_files):
    client, settings = api
    first = client.post("/v1/models", files={"file": ("digits.pt2", digits_files["pt2"].read_bytes())})
    assert first.status_code == 201, first.text
    again = client.post("/v1/models", files={"file": ("renamed.pt2", digits_files["pt2"].read_bytes())})
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"] and again.json()["name"] == "digits.pt2"
    assert blobs(settings) == [first.json()["sha256"]]
    assert client.get(f"/v1/models/{first.json()['id']}").json()["layers"] == first.json()["layers"]


def test_torchscript_needs_data_and_works_with_it(api, digits_files):
    client, settings = api
    r = client.post("/v1/models", files={"file": ("digits.ts", digits_files["ts"].read_bytes())})
    assert r.status_code == 422 and "dataset_id" in r.json()["error"]["hint"]
    assert blobs(settings) == [] and list((settings.data_dir / "tmp").iterdir()) == []
    data = client.post("/v1/datasets", files={"file": ("calib.npz", digits_files["calib"].read_bytes())}).json()
    r = client.post("/v1/models", files={"file": ("digits.ts", digits_files["ts"].read_bytes())},
                    data={"dataset_id": data["id"]})
    assert r.status_code == 201, r.text
    assert r.json()["format"] == "torchscript" and len(r.json()["layers"]) == 5


def test_refused_uploads_store_nothing(api):
    client, settings = api
    r = client.post("/v1/datasets", files={"file": ("big.npz", b"\0" * (4 << 20))})
    assert r.status_code == 413 and "BITPLAN_MAX_UPLOAD_MB" in r.json()["error"]["hint"]
    r = client.post("/v1/datasets", files={"file": ("junk.npz", b"PK\x03\x04 not really a zip")})
    assert r.status_code == 422 and r.json()["error"]["message"]
    r = client.post("/v1/models", files={"file": ("model.pt", b"\x80\x04\x95" + b"\0" * 100)})
    assert r.status_code == 422
    assert blobs(settings) == [] and list((settings.data_dir / "tmp").iterdir()) == []
    assert client.get("/v1/models").json()["items"] == [] and client.get("/v1/datasets").json()["items"] == []
    assert client.get("/healthz").status_code == 200
