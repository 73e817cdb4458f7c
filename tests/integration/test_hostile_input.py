"""Hostile and broken input through the API (in-process app on a fresh PostgreSQL database, no worker): each is answered with a
4xx JSON error that says what to do, nothing is stored half-written, and the service is still healthy after.

Two apps: ``refusals`` never accepts anything, so its blob store must stay empty; ``stocked`` holds the
digits model and data (and a two-input model with token inputs) for the job checks.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn

from bitplan.settings import Settings, load_settings
from service.app import create_app
from storage import Database
from tests.devstack import fresh_database

MAX_UPLOAD_MB = 4  # a 2 GB zip bomb of zeros packs into 2.1 MB, which must get past the upload limit


@dataclass
class App:
    client: TestClient
    settings: Settings
    keys: dict[str, str]  # team -> key

    def as_team(self, team: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[team]}"}

    def upload(self, what: str, name: str, data: bytes, team: str = "vision", **form):
        return self.client.post(f"/v1/{what}", files={"file": (name, data)}, data=form or None, headers=self.as_team(team))

    def job(self, team: str = "vision", raw: str | None = None, **body):
        headers = self.as_team(team)
        if raw is not None:
            return self.client.post("/v1/jobs", content=raw, headers={**headers, "Content-Type": "application/json"})
        return self.client.post("/v1/jobs", json=body, headers=headers)

    def jobs_total(self, team: str = "vision") -> int:
        return self.client.get("/v1/jobs", headers=self.as_team(team)).json()["total"]


@contextmanager
def _app(root: Path) -> Iterator[App]:
    """The app on a fresh PostgreSQL database of its own (as in production: e.g. PostgreSQL refuses NUL in text)."""
    with fresh_database() as url:
        settings = load_settings(data_dir=str(root), max_upload_mb=MAX_UPLOAD_MB, database_url=url)
        db = Database(settings.database_url)
        db.migrate()
        keys = {team: db.create_key(team) for team in ("vision", "audio")}
        with TestClient(create_app(settings, worker=False)) as client:
            yield App(client, settings, keys)
        db.engine.dispose()


@pytest.fixture(scope="module")
def refusals(tmp_path_factory):
    with _app(tmp_path_factory.mktemp("refusals")) as app:
        yield app


def stored_files(settings: Settings) -> list[Path]:
    root = settings.data_dir / "blobs"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def refused(app: App, r, status: int, *needles: str, upload: bool = False) -> dict:
    """The answer is our JSON error with a message; a refused upload left no file; the service is healthy."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert {"code", "message", "hint"} <= set(error), error
    assert error["message"].strip(), error
    for needle in needles:
        assert needle.lower() in error["message"].lower(), (needle, error)
    if upload:
        assert stored_files(app.settings) == []
        assert list((app.settings.data_dir / "tmp").iterdir()) == []
        assert app.client.get("/v1/models", headers=app.as_team("vision")).json()["items"] == []
        assert app.client.get("/v1/datasets", headers=app.as_team("vision")).json()["items"] == []
    assert app.client.get("/healthz").status_code == 200
    return error


# --- 1. pickles ------------------------------------------------------------------------------------------


class OpensAFile:
    """Unpickling this creates ``path``."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


class TouchesAFile(OpensAFile):
    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


@pytest.mark.parametrize("payload", [OpensAFile, TouchesAFile])
@pytest.mark.parametrize(("what", "name"), [("models", "model.pt"), ("models", "model.pt2"), ("datasets", "data.npz")])
def test_a_pickle_is_refused_and_never_run(refusals, tmp_path, payload, what, name):
    marker = tmp_path / f"pwned-{payload.__name__}-{Path(name).suffix[1:]}"
    r = refusals.upload(what, name, pickle.dumps(payload(marker)))
    error = refused(refusals, r, 422, f"{name} is a Python pickle", "never unpickles", upload=True)
    assert "upload-" not in error["message"]  # the user's file name, not the temporary one
    assert not marker.exists()


def test_a_torch_save_file_is_refused_as_model_and_as_data(refusals, tmp_path):
    buf = io.BytesIO()
    torch.save(nn.Linear(3, 2).state_dict(), buf)
    r = refusals.upload("models", "weights.pt", buf.getvalue())
    refused(refusals, r, 422, "weights.pt is a torch.save() pickle archive", upload=True)
    r = refusals.upload("datasets", "weights.npz", buf.getvalue())
    refused(refusals, r, 422, "weights.npz holds", "not a numpy array", upload=True)
    marker = tmp_path / "pwned-torch-save"
    evil = io.BytesIO()
    torch.save({"model": OpensAFile(marker)}, evil)
    r = refusals.upload("models", "model.pth", evil.getvalue())
    refused(refusals, r, 422, "torch.save()", upload=True)
    assert not marker.exists()


# --- 2. truncated files ----------------------------------------------------------------------------------


def test_a_truncated_archive_says_so(refusals, digits_files):
    raw = digits_files["pt2"].read_bytes()
    r = refusals.upload("models", "digits.pt2", raw[: len(raw) // 2])
    refused(refusals, r, 422, "digits.pt2 is truncated or corrupt", upload=True)
    raw = digits_files["calib"].read_bytes()
    r = refusals.upload("datasets", "calib.npz", raw[: len(raw) // 2])
    refused(refusals, r, 422, "calib.npz is truncated or corrupt", upload=True)


# --- 3. zip bombs and the size limit ---------------------------------------------------------------------

BOMB_BYTES = 1 << 31  # 2 GB of zeros
CHUNK = 1 << 24


@dataclass
class Member:
    name: str
    data: bytes  # as stored
    size: int  # unpacked
    crc: int
    method: int = zipfile.ZIP_DEFLATED


def _zeros_member(name: str, prefix: bytes, zeros: int) -> Member:
    """``prefix`` + ``zeros`` zero bytes, deflated in 16 MB blocks: after a full flush deflate starts afresh, so
    every block of zeros compresses to the same bytes and 2 GB is written as one block repeated."""
    assert zeros % CHUNK == 0
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = deflate.compress(prefix + bytes(CHUNK)) + deflate.flush(zlib.Z_FULL_FLUSH)
    block = deflate.compress(bytes(CHUNK)) + deflate.flush(zlib.Z_FULL_FLUSH)
    data = first + block * (zeros // CHUNK - 1) + deflate.flush()
    crc, zero_chunk = zlib.crc32(prefix), bytes(CHUNK)
    for _ in range(zeros // CHUNK):
        crc = zlib.crc32(zero_chunk, crc)
    return Member(name, data, len(prefix) + zeros, crc)


def _stored(name: str, data: bytes) -> Member:
    return Member(name, data, len(data), zlib.crc32(data), zipfile.ZIP_STORED)


def _zip(members: list[Member]) -> bytes:
    """A zip file written field by field (``zipfile`` cannot take an already deflated stream)."""
    out, central = io.BytesIO(), io.BytesIO()
    for m in members:
        offset, name = out.tell(), m.name.encode()
        out.write(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, m.method, 0, 0x21, m.crc, len(m.data), m.size, len(name), 0))
        out.write(name + m.data)
        central.write(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, m.method, 0, 0x21, m.crc, len(m.data),
                                  m.size, len(name), 0, 0, 0, 0, 0, offset) + name)
    start = out.tell()
    out.write(central.getvalue())
    out.write(struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, len(members), len(members), len(central.getvalue()), start, 0))
    return out.getvalue()


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> dict[str, Path]:
    """An .npz whose 'inputs' is a real 2 GB float32 array of zeros, and a .pt2-shaped zip with a 2 GB weight."""
    out = tmp_path_factory.mktemp("bombs")
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f4", "fortran_order": False,
                                                  "shape": (BOMB_BYTES // 256, 1, 8, 8)})
    inputs = _zeros_member("inputs.npy", header.getvalue(), BOMB_BYTES)
    (out / "bomb.npz").write_bytes(_zip([inputs]))
    weight = Member("bomb/data/weights/weight_0", inputs.data, inputs.size, inputs.crc)
    (out / "bomb.pt2").write_bytes(_zip([_stored("bomb/archive_format", b"pt2"), _stored("bomb/models/model.json", b"{}"),
                                         weight]))
    return {"npz": out / "bomb.npz", "pt2": out / "bomb.pt2"}


def test_the_bombs_are_real(bombs):
    """What the guard refuses is a valid zip that really unpacks to 2 GB, yet fits the upload limit."""
    for path in bombs.values():
        assert path.stat().st_size < MAX_UPLOAD_MB * 1e6
        with zipfile.ZipFile(path) as zf:
            assert sum(m.file_size for m in zf.infolist()) > BOMB_BYTES
            with zf.open(zf.infolist()[-1]) as member:
                assert member.read(1 << 20).count(0) > (1 << 20) - 200  # the npy header, then zeros


@pytest.mark.parametrize(("what", "kind"), [("datasets", "npz"), ("models", "pt2")])
def test_a_zip_bomb_is_refused_from_its_directory(refusals, bombs, what, kind):
    r = refusals.upload(what, f"bomb.{kind}", bombs[kind].read_bytes())
    refused(refusals, r, 422, f"bomb.{kind}: member", "would expand", "more than 200 times", "zip bomb", upload=True)


def test_the_unpacked_size_limit_is_configurable(refusals, bombs, monkeypatch):
    monkeypatch.setenv("BITPLAN_MAX_UNPACKED_MB", "1000")  # the reader runs in a child with the API's environment
    r = refusals.upload("datasets", "bomb.npz", bombs["npz"].read_bytes())
    error = refused(refusals, r, 422, "bomb.npz would unpack to 2,147 MB", "more than the limit of 1,000 MB", upload=True)
    assert "BITPLAN_MAX_UNPACKED_MB" in error["hint"]


def test_the_guard_decompresses_nothing(bombs, monkeypatch):
    from bitplan.core.data import load_data
    from bitplan.core.loading import load_model
    from bitplan.errors import DataError, ModelFormatError

    def no_reading(*_args, **_kwargs):
        raise AssertionError("a member was opened")

    monkeypatch.setattr(zipfile.ZipFile, "open", no_reading)
    with pytest.raises(DataError, match="zip bomb"):
        load_data(bombs["npz"])
    with pytest.raises(ModelFormatError, match="zip bomb"):
        load_model(str(bombs["pt2"]))


def test_an_upload_over_the_size_limit_is_413(refusals):
    for size in (MAX_UPLOAD_MB * 1_000_000 + 500_000, (MAX_UPLOAD_MB + 2) * 1_000_000):  # streamed; declared length
        r = refusals.upload("datasets", "big.npz", bytes(size))
        error = refused(refusals, r, 413, f"larger than the limit of {MAX_UPLOAD_MB} MB", upload=True)
        assert "BITPLAN_MAX_UPLOAD_MB" in error["hint"]


# --- 5, 6. models bitplan cannot plan --------------------------------------------------------------------


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def _pt2(model: nn.Module, *args) -> bytes:
    buf = io.BytesIO()
    torch.export.save(torch.export.export(model.eval(), args), buf)
    return buf.getvalue()


def test_non_finite_weights_are_named(refusals):
    model = SmallCNN()
    with torch.no_grad():
        model.conv.weight[0, 0, 0, 0] = float("nan")
        model.fc.weight[3, 7] = float("inf")
    r = refusals.upload("models", "nan.pt2", _pt2(model, torch.randn(2, 1, 8, 8)))
    refused(refusals, r, 422, "nan.pt2 has NaN or infinite weights in layer(s) conv, fc", upload=True)


@pytest.mark.parametrize("model", [nn.Sequential(nn.ReLU()), nn.Sequential(nn.Tanh(), nn.Softmax(dim=-1))])
def test_a_model_without_quantizable_layers(refusals, model):
    r = refusals.upload("models", "act.pt2", _pt2(model, torch.randn(2, 5)))
    refused(refusals, r, 422, "act.pt2 has no quantizable layer", "conv1d, conv2d and linear", "found none", upload=True)


# --- 4, 7, 8. jobs ---------------------------------------------------------------------------------------


class TokenModel(nn.Module):
    """Two named integer inputs, like MiniLM's input_ids and attention_mask."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 8)
        self.fc = nn.Linear(8, 4)

    def forward(self, input_ids, attention_mask):
        hidden = self.emb(input_ids) * attention_mask.unsqueeze(-1).to(torch.float32)
        return self.fc(hidden.mean(1))


def _token_pt2() -> bytes:
    batch = torch.export.Dim("batch")
    ids, mask = torch.randint(0, 50, (3, 6)), torch.ones(3, 6, dtype=torch.int64)
    program = torch.export.export(TokenModel().eval(), (), {"input_ids": ids, "attention_mask": mask},
                                  dynamic_shapes={"input_ids": {0: batch}, "attention_mask": {0: batch}})
    buf = io.BytesIO()
    torch.export.save(program, buf)
    return buf.getvalue()


def _npz(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


TOKENS = {"inputs.input_ids": np.random.default_rng(0).integers(0, 50, (8, 6)).astype(np.int32),
          "inputs.attention_mask": np.ones((8, 6), np.int64), "targets": np.zeros(8, np.int64)}


@pytest.fixture(scope="module")
def stocked(tmp_path_factory, digits_files):
    """The digits model and its data, data that does not fit it, and a token-input model with its data."""
    with _app(tmp_path_factory.mktemp("stocked")) as app:
        ids: dict[str, str] = {}

        def put(key: str, what: str, name: str, data: bytes, team: str = "vision") -> None:
            r = app.upload(what, name, data, team)
            assert r.status_code == 201, r.text
            ids[key] = r.json()["id"]

        put("model", "models", "digits.pt2", digits_files["pt2"].read_bytes())
        put("calib", "datasets", "calib.npz", digits_files["calib"].read_bytes())
        put("rgb", "datasets", "rgb.npz", _npz(inputs=np.zeros((32, 3, 8, 8), np.float32)))
        put("ints", "datasets", "ints.npz", _npz(inputs=np.zeros((32, 1, 8, 8), np.int64)))
        put("tokens_model", "models", "tokens.pt2", _token_pt2())
        put("tokens", "datasets", "tokens.npz", _npz(**TOKENS))
        put("audio_model", "models", "digits.pt2", digits_files["pt2"].read_bytes(), team="audio")
        yield app, ids


def test_data_that_does_not_fit_the_model(stocked):
    app, ids = stocked
    before = app.jobs_total()
    budgets = {"avg_weight_bits": 4}
    r = app.job(model_id=ids["model"], dataset_id=ids["rgb"], budgets=budgets)
    refused(app, r, 422, "dataset 'rgb.npz'", "'inputs' has shape (32, 3, 8, 8)", "expected shape is (N, 1, 8, 8) float32")
    r = app.job(model_id=ids["model"], dataset_id=ids["calib"], eval_dataset_id=ids["rgb"], budgets=budgets)
    refused(app, r, 422, "eval dataset 'rgb.npz'", "(32, 3, 8, 8)")
    r = app.job(model_id=ids["model"], dataset_id=ids["ints"], budgets=budgets)
    refused(app, r, 422, "'inputs' has dtype int64, but the expected dtype is float32")
    r = app.job(model_id=ids["model"], dataset_id=ids["tokens"], budgets=budgets)
    refused(app, r, 422, "has inputs ['attention_mask', 'input_ids'], but the inputs expected are ['x']")
    r = app.job(model_id=ids["tokens_model"], dataset_id=ids["calib"], budgets=budgets)
    refused(app, r, 422, "one positional 'inputs', but 2 named inputs are expected: input_ids, attention_mask")
    assert app.jobs_total() == before


def test_data_that_fits_is_accepted(stocked):
    app, ids = stocked
    for model, data in (("model", "calib"), ("tokens_model", "tokens"), ("model", "synthetic")):
        r = app.job(model_id=ids[model], dataset_id=ids.get(data, data), budgets={"avg_weight_bits": 4})
        assert r.status_code == 202, r.text


BAD_BUDGETS = [
    ('{"avg_weight_bits": -1}', "budgets.avg_weight_bits", "greater than 0"),
    ('{"size_bytes": 0}', "budgets.size_bytes", "greater than 0"),
    ('{"avg_weight_bits": NaN}', "budgets.avg_weight_bits", "finite"),
    ('{"size_bytes": Infinity}', "budgets.size_bytes", "finite"),
    ('{"bops": -Infinity}', "budgets.bops", ""),
    ('{"size_bytes": 1e400}', "budgets.size_bytes", "finite"),
    ('{"avg_weight_bits": "four"}', "budgets.avg_weight_bits", "number"),
    ('{"avg_weight_bits": 4, "speed": 2}', "budgets", "unknown budget key(s) speed; valid keys: avg_weight_bits, size_bytes"),
    ("{}", "budgets", "no budget given; set at least one of avg_weight_bits"),
    ('{"avg_weight_bits": 100}', "budgets.avg_weight_bits", "less than or equal to 32"),
    ("[4]", "budgets", ""),
    ("null", "budgets", ""),
]


@pytest.mark.parametrize(("budgets", "loc", "words"), BAD_BUDGETS)
def test_bad_budgets_name_the_field(stocked, budgets, loc, words):
    app, ids = stocked
    before = app.jobs_total()
    r = app.job(raw=f'{{"model_id": "{ids["model"]}", "dataset_id": "{ids["calib"]}", "budgets": {budgets}}}')
    error = refused(app, r, 422, loc, words)
    assert error["code"] == "invalid_request" and any(f["loc"] == loc for f in error["fields"]), error
    assert app.jobs_total() == before


def test_an_infeasible_budget_says_what_is_achievable(stocked):
    app, ids = stocked
    r = app.job(model_id=ids["model"], budgets={"avg_weight_bits": 1.5}, w_bits=[2, 4, 8])
    error = refused(app, r, 422, "avg_weight_bits<=1.5 cannot be met: the smallest achievable is 2")
    assert error["code"] == "infeasible" and error["minimums"] == {"avg_weight_bits": 2.0} and error["field"] == "budgets"


@pytest.mark.parametrize(("body", "words", "hint", "code", "field"), [
    ({"sensitivity": {"method": "magic"}}, "unknown sensitivity method 'magic'", "hessian_trace, hessian_eigen",
     "unknown_method", "sensitivity"),
    ({"solver": {"method": "oracle"}}, "unknown solver 'oracle'", "ilp", "unknown_method", "solver"),
    ({"sensitivity": {"method": "hessian_trace", "params": {"probes": 3}}},
     "sensitivity method 'hessian_trace' has no parameter(s) probes", "max_probes (>=2, <=10000, default 48)", "bad_params",
     "sensitivity"),
    ({"sensitivity": {"method": "hessian_trace", "params": {"tol": 99}}},
     "sensitivity method 'hessian_trace' parameter tol: Input should be less than", "tol (>0, <10, default 0.1)",
     "bad_params", "sensitivity"),
    ({"solver": {"method": "ilp", "params": {"speed": 1}}}, "solver 'ilp' has no parameter(s) speed",
     "valid parameters of solver 'ilp': backend (cbc|highs, default cbc)", "bad_params", "solver"),
    ({"pins": {"nowhere": 8}}, "pins name unknown layer(s) ['nowhere']", "GET /v1/models", "invalid_request", "pins"),
    ({"budgets": {"latency_ms": 3}}, "a latency_ms budget needs a latency_table", "latency_table", "invalid_request",
     "latency_table"),
])
def test_bad_methods_list_the_valid_ones(stocked, body, words, hint, code, field):
    app, ids = stocked
    r = app.job(**{"model_id": ids["model"], "budgets": {"avg_weight_bits": 4}, **body})
    error = refused(app, r, 422, words)
    assert hint in (error["hint"] or ""), error
    assert error["code"] == code and error["field"] == field, error


def test_non_finite_parameters_are_refused(stocked):
    app, ids = stocked
    body = f'{{"model_id": "{ids["model"]}", "budgets": {{"avg_weight_bits": 4}}, "solver": {{"method": "ilp", '
    r = app.job(raw=body + '"params": {"time_limit": NaN}}}')
    refused(app, r, 422, "solver.params.time_limit must be a finite number")
    r = app.job(raw=body + '"params": {}}, "latency_table": {"conv1": {"4": Infinity}}}')
    refused(app, r, 422, "latency_table.conv1.4")


def test_another_teams_things_are_not_found(stocked):
    app, ids = stocked
    r = app.job(team="audio", model_id=ids["model"], budgets={"avg_weight_bits": 4})
    refused(app, r, 404, f"no model '{ids['model']}' for this team")
    r = app.job(team="audio", model_id=ids["audio_model"], dataset_id=ids["calib"], budgets={"avg_weight_bits": 4})
    refused(app, r, 404, f"no dataset '{ids['calib']}' for this team")
    r = app.job(team="audio", model_id=ids["audio_model"], eval_dataset_id=ids["calib"], budgets={"avg_weight_bits": 4})
    refused(app, r, 404, f"no dataset '{ids['calib']}' for this team")
    for path in (f"/v1/models/{ids['model']}", f"/v1/datasets/{ids['calib']}"):
        refused(app, app.client.get(path, headers=app.as_team("audio")), 404, "for this team")
    job = app.job(model_id=ids["model"], dataset_id=ids["calib"], budgets={"avg_weight_bits": 4}).json()
    audio = app.as_team("audio")
    for method, path in (("GET", ""), ("GET", "/plan"), ("GET", "/plan?format=csv"), ("GET", "/frontier"), ("DELETE", "")):
        r = app.client.request(method, f"/v1/jobs/{job['id']}{path}", headers=audio)
        refused(app, r, 404, f"no job '{job['id']}' for this team")
    assert app.client.get(f"/v1/jobs/{job['id']}", headers=app.as_team("vision")).json()["state"] == "queued"
    assert job["id"] not in json.dumps(app.client.get("/v1/jobs", headers=audio).json())


DIGITS_CASES = {
    "calib": {"inputs": np.zeros((5, 1, 8, 8), np.float32)},
    "float64": {"inputs": np.zeros((5, 1, 8, 8), np.float64)},
    "float16": {"inputs": np.zeros((5, 1, 8, 8), np.float16)},
    "named x": {"inputs.x": np.zeros((5, 1, 8, 8), np.float32)},
    "named y": {"inputs.y": np.zeros((5, 1, 8, 8), np.float32)},
    "rgb": {"inputs": np.zeros((5, 3, 8, 8), np.float32)},
    "flat": {"inputs": np.zeros((5, 64), np.float32)},
    "one sample": {"inputs": np.zeros((1, 1, 8, 8), np.float32)},
    "ints": {"inputs": np.zeros((5, 1, 8, 8), np.int64)},
    "bools": {"inputs": np.zeros((5, 1, 8, 8), bool)},
    "extra rank": {"inputs": np.zeros((5, 1, 1, 8, 8), np.float32)},
}
TOKEN_CASES = {
    "ids int32": TOKENS,
    "all int64": {k: v.astype(np.int64) for k, v in TOKENS.items()},
    "uint8 mask": {**TOKENS, "inputs.attention_mask": np.ones((8, 6), np.uint8)},
    "bool mask": {**TOKENS, "inputs.attention_mask": np.ones((8, 6), bool)},
    "float ids": {**TOKENS, "inputs.input_ids": np.zeros((8, 6), np.float32)},
    "longer": {"inputs.input_ids": np.zeros((8, 7), np.int64), "inputs.attention_mask": np.ones((8, 7), np.int64)},
    "positional": {"inputs": np.zeros((8, 6), np.int64)},
    "one missing": {"inputs.input_ids": np.zeros((8, 6), np.int64)},
    "one extra": {**TOKENS, "inputs.token_type_ids": np.zeros((8, 6), np.int64)},
}


@pytest.mark.parametrize(("kind", "case"), [("digits", c) for c in DIGITS_CASES] + [("tokens", c) for c in TOKEN_CASES])
def test_the_api_check_agrees_with_the_worker(kind, case, digits_files, tmp_path):
    """check_data_fits (API, from descriptions) refuses exactly what conform (worker, on tensors) refuses."""
    from bitplan.core.data import conform, load_data
    from bitplan.core.describe import describe_data
    from bitplan.core.loading import load_model
    from bitplan.errors import DataError
    from service.errors import ApiError
    from service.jobspec import check_data_fits

    if kind == "digits":
        model_path, arrays = digits_files["pt2"], DIGITS_CASES[case]
    else:
        model_path, arrays = tmp_path / "tokens.pt2", TOKEN_CASES[case]
        model_path.write_bytes(_token_pt2())
    model = load_model(str(model_path))
    data_path = tmp_path / "data.npz"
    data_path.write_bytes(_npz(**arrays))
    try:
        conform(load_data(data_path), model.inputs)
        worker = None
    except DataError as exc:
        worker = exc.message
    description = {"inputs": [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in model.inputs]}
    try:
        check_data_fits(description, {"id": "d_1", "name": "data.npz", **describe_data(str(data_path))})
        api = None
    except ApiError as exc:
        api = exc.message
    assert (worker is None) == (api is None), (worker, api)


@pytest.mark.parametrize(("field", "value", "words"), [
    ("model_id", '"m_\\u0000"', "model_id contains a NUL character"),
    ("callback_url", '"http://x/\\ud800"', "callback_url contains a NUL character or an unpaired surrogate"),
    ("pins", '{"conv1\\u0000": 8}', "the key pins.conv1\\x00 contains"),
    ("solver", '{"method": "ilp", "params": {"x": ' + "[" * 40 + "]" * 40 + "}}", "nested more than 32 levels deep"),
])
def test_what_no_database_can_store_is_refused_first(stocked, field, value, words):
    """NUL (PostgreSQL refuses it), lone surrogates (not UTF-8, not even in an error message) and deep nesting
    (pydantic will not serialise it) were 500s once the body had been accepted."""
    app, ids = stocked
    before = app.jobs_total()
    body = {"model_id": f'"{ids["model"]}"', "budgets": '{"avg_weight_bits": 4}', field: value}
    r = app.job(raw="{" + ", ".join(f'"{k}": {v}' for k, v in body.items()) + "}")
    refused(app, r, 422, words)
    assert app.jobs_total() == before


def test_a_huge_offset_is_a_422(stocked):
    app, _ = stocked
    r = app.client.get("/v1/jobs?offset=9223372036854775808", headers=app.as_team("vision"))
    refused(app, r, 422, "offset")


@pytest.mark.parametrize("path", ["/v1/jobs/j%00", "/v1/jobs/j%00/plan", "/v1/jobs/j%00/frontier", "/v1/models/m%00",
                                  "/v1/datasets/d%00"])
def test_nul_in_an_id_is_a_404(stocked, path):
    app, _ = stocked
    r = app.client.get(path, headers=app.as_team("vision"))
    refused(app, r, 404, "for this team")


def test_nul_in_a_filter_is_a_422(stocked):
    app, _ = stocked
    r = app.client.get("/v1/jobs?model_id=m%00", headers=app.as_team("vision"))
    refused(app, r, 422, "model_id")
