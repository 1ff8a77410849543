"""The OpenAPI schema as clients get it: JSON or YAML on request, one component per shape, every
operation with its real bodies and its error responses in the one error shape."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from django.test import Client

ERROR_REF = "#/components/schemas/Error"
METHODS = ("get", "post", "put", "patch", "delete")


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    r = Client().get("/api/schema/?format=json")
    assert r.status_code == 200
    data: dict[str, Any] = json.loads(r.content)
    return data


def _operations(schema: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, op)
        for path, item in schema["paths"].items()
        for method, op in item.items()
        if method in METHODS
    ]


def _refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"]} if "$ref" in node else set()
        for value in node.values():
            found |= _refs(value)
        return found
    if isinstance(node, list):
        return {r for item in node for r in _refs(item)}
    return set()


def test_format_json_is_json_and_yaml_is_yaml() -> None:
    c = Client()
    as_json = c.get("/api/schema/?format=json")
    assert as_json.status_code == 200
    assert as_json["Content-Type"].split(";")[0] == "application/vnd.oai.openapi+json"
    assert json.loads(as_json.content)["info"]["title"] == "Rewardloop API"
    as_yaml = c.get("/api/schema/?format=yaml")
    assert as_yaml.status_code == 200
    assert as_yaml["Content-Type"].split(";")[0] == "application/vnd.oai.openapi"
    assert not as_yaml.content.lstrip().startswith(b"{")
    assert yaml.safe_load(as_yaml.content) == json.loads(as_json.content)
    default = c.get("/api/schema/")
    assert default["Content-Type"].split(";")[0] == "application/vnd.oai.openapi"
    unknown = c.get("/api/schema/?format=xml")
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "not_found"


def test_an_unknown_api_path_answers_the_json_error_shape(db: None) -> None:
    r = Client().get("/api/projects/not a slug/")
    assert r.status_code == 404
    assert r["Content-Type"] == "application/json"
    assert r.json()["error"]["code"] == "not_found"


def test_one_shared_error_component(schema: dict[str, Any]) -> None:
    components = schema["components"]["schemas"]
    assert components["Error"] == {
        "type": "object",
        "properties": {"error": {"$ref": "#/components/schemas/ErrorBody"}},
        "required": ["error"],
    }
    body = components["ErrorBody"]
    assert set(body["properties"]) == {"code", "message", "details"}
    assert set(body["required"]) == {"code", "message", "details"}
    assert body["properties"]["details"]["type"] == "object"


def test_every_operation_documents_success_and_its_errors(schema: dict[str, Any]) -> None:
    ops = _operations(schema)
    # 27 + five RL-job + five generator-version and sampling-job operations (issue 12) + the leaderboard
    # and the loop's four (issue 13)
    assert len(ops) == 42
    for path, method, op in ops:
        where = f"{method.upper()} {path}"
        codes = set(op["responses"])
        assert any(c.startswith("2") for c in codes), where
        for code, response in op["responses"].items():
            if code.startswith("2"):
                assert response.get("content"), f"{where} {code} has no body schema"
            else:
                assert list(response["content"]) == ["application/json"], f"{where} {code}"
                assert response["content"]["application/json"]["schema"] == {"$ref": ERROR_REF}, where
        if op["operationId"] == "auth_token":
            assert {"400", "429", "503"} <= codes
            assert op.get("security", []) in ([], [{}])
        elif "{slug}" in path:
            assert {"400", "401", "403", "404", "503"} <= codes, where
        else:
            assert {"400", "401", "403", "503"} <= codes, where
        if "requestBody" in op:
            assert {"413", "415"} <= codes, where


def test_request_bodies_have_their_own_components(schema: dict[str, Any]) -> None:
    components = schema["components"]["schemas"]
    owners: dict[str, str] = {}
    for path, method, op in _operations(schema):
        body = op.get("requestBody")
        if body is None:
            continue
        for content in body["content"].values():
            ref = content["schema"]["$ref"]
            name = ref.rsplit("/", 1)[-1]
            assert name in components
            assert not name.startswith("Input"), name
            owner = owners.setdefault(ref, f"{method} {path}")
            assert owner == f"{method} {path}", f"{ref} is the body of {owner} and of {method} {path}"
    assert set(components["TokenCredentialsRequest"]["required"]) == {"username", "password"}
    assert "slug" in components["ProjectCreateRequest"]["properties"]


def test_response_components_match_the_views(schema: dict[str, Any]) -> None:
    components = schema["components"]["schemas"]
    # project_detail
    assert set(components["Project"]["properties"]) == {
        "slug", "name", "modality", "instructions", "options", "aspects", "mode", "k", "overlap",
        "gold_rate", "lease_seconds", "undo_seconds",
    }  # fmt: skip
    # rl_payload (migration 0005)
    assert set(components["Leases"]["properties"]) == {"items", "options", "aspects", "mode"}
    assert set(components["Lease"]["properties"]) == {
        "assignment",
        "comparison",
        "expires_at",
        "prompt",
        "samples",
    }
    submit = schema["paths"]["/api/projects/{slug}/judgments/"]["post"]
    assert submit["responses"]["201"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/JudgmentSubmitted"
    }
    assert components["JudgmentSubmitted"]["required"] == ["judgment"]
    assert set(components["RewardModelWithCurves"]["properties"]) - set(
        components["RewardModel"]["properties"]
    ) == {"curves"}


def test_uploads_are_multipart_and_downloads_binary(schema: dict[str, Any]) -> None:
    paths = schema["paths"]
    for path in ("/api/projects/{slug}/imports/samples/", "/api/projects/{slug}/imports/preferences/"):
        content = paths[path]["post"]["requestBody"]["content"]
        assert list(content) == ["multipart/form-data"], path
    upload = paths["/api/projects/{slug}/samples/"]["post"]["requestBody"]["content"]
    assert set(upload) == {"multipart/form-data", "application/json"}
    for path in ("/api/projects/{slug}/export/", "/api/projects/{slug}/snapshots/{snapshot_id}/download/"):
        ok = paths[path]["get"]["responses"]["200"]["content"]
        assert set(ok) == {"application/x-ndjson", "text/csv", "application/vnd.apache.parquet"}
        assert all(c["schema"] == {"type": "string", "format": "binary"} for c in ok.values())


def test_documented_limits_match_the_columns(schema: dict[str, Any]) -> None:
    components = schema["components"]["schemas"]
    project = components["ProjectCreateRequest"]["properties"]
    assert (project["lease_seconds"]["minimum"], project["lease_seconds"]["maximum"]) == (10, 604_800)
    assert project["name"]["maxLength"] == 200
    for field in ("generator", "generator_version"):
        assert components["TextSampleRequest"]["properties"][field]["maxLength"] == 200
        assert components["MediaSampleUploadRequest"]["properties"][field]["maxLength"] == 200
    assert components["SnapshotCreateRequest"]["properties"]["name"]["maxLength"] == 200
    slug = schema["paths"]["/api/projects/{slug}/"]["get"]["parameters"][0]
    assert slug["schema"]["pattern"] == "^[-a-zA-Z0-9_]+$"


@pytest.mark.django_db
def test_documented_limits_are_enforced(manager: Any, make_project: Any, text_pairs: Any) -> None:
    from annotate.models import Comparison, DatasetSnapshot, Project
    from tests.conftest import sample_ids
    from tests.factories import client_for

    project = make_project("lim")
    c = client_for(manager)
    r = c.post("/api/projects/", {"slug": "x", "name": "X", "lease_seconds": 2**31}, format="json")
    assert r.status_code == 400
    assert "lease_seconds" in r.json()["error"]["details"]["fields"]
    assert not Project.objects.filter(slug="x").exists()
    r = c.post("/api/projects/lim/snapshots/", ["schema", "raw"], format="json")
    assert r.status_code == 400
    r = c.post("/api/projects/lim/snapshots/", {"schema": "raw", "name": "n" * 201}, format="json")
    assert r.status_code == 400
    assert list(r.json()["error"]["details"]["fields"]) == ["name"]
    assert DatasetSnapshot.objects.filter(project=project).count() == 0
    text_pairs(project, n=1)
    before = Comparison.objects.filter(project=project).count()
    ids = sample_ids(project)
    r = c.post(
        "/api/projects/lim/comparisons/",
        {"comparisons": [{"samples": ids[:2], "priority": "nan"}]},
        format="json",
    )
    assert r.status_code == 400
    assert Comparison.objects.filter(project=project).count() == before
