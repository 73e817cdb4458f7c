"""The OpenAPI schema documents what the routes answer, errors included."""

from __future__ import annotations

from fastapi.testclient import TestClient

from bitplan.settings import load_settings
from service.app import create_app


def test_routes_document_their_answers(tmp_path):
    app = create_app(load_settings(data_dir=str(tmp_path), broker_url="memory://"), worker=False, reconcile=False)
    with TestClient(app) as client:
        schema = client.get("/openapi.json").json()
    paths = schema["paths"]

    def ok(path, method, status="200"):
        return paths[path][method]["responses"][status]["content"]["application/json"]["schema"]

    assert ok("/v1/jobs/{job_id}", "get") == {"$ref": "#/components/schemas/JobOut"}
    assert ok("/v1/jobs", "post", "202") == {"$ref": "#/components/schemas/JobOut"}
    assert ok("/v1/models", "post", "201") == {"$ref": "#/components/schemas/ModelOut"}
    assert ok("/v1/jobs/{job_id}/plan", "get") == {"$ref": "#/components/schemas/PlanFile"}
    error = paths["/v1/jobs"]["post"]["responses"]["422"]["content"]["application/json"]["schema"]
    assert error == {"$ref": "#/components/schemas/ErrorBody"}
    detail = schema["components"]["schemas"]["ErrorDetail"]["properties"]
    assert {"code", "message", "hint", "field"} <= set(detail)
    job = schema["components"]["schemas"]["JobOut"]["properties"]
    assert {"state", "stage", "progress", "error", "links"} <= set(job)
