"""problem+json (RFC 9457) for validation errors, raised domain errors and unknown routes."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date

import pytest
from fastapi import FastAPI, Query
from fastapi.testclient import TestClient
from pydantic import BaseModel, Field

from v2v_contracts.errors import CoiMismatch, Conflict, Invalid, NotAllowedNow, NotFound
from v2v_servicekit.problems import PROBLEM_BASE, PROBLEM_JSON, install


class Address(BaseModel):
    city: str = Field(min_length=1)
    zip: str


class ThingIn(BaseModel):
    name: str
    count: int
    due: date
    address: Address
    tags: list[Address] = []


def build_app() -> FastAPI:
    app = FastAPI()
    install(app)

    @app.post("/things")
    async def create(thing: ThingIn) -> dict[str, str]:
        return {"name": thing.name}

    @app.get("/things")
    async def search(limit: int = Query(ge=1, le=100)) -> dict[str, int]:
        return {"limit": limit}

    @app.get("/things/{thing_id}")
    async def get(thing_id: int) -> dict[str, int]:
        if thing_id == 404:
            raise NotFound("Thing", thing_id)
        if thing_id == 409:
            raise Conflict("thing_id", "thing is busy", detail="thing is busy", title="Conflict")
        if thing_id == 422:
            raise Invalid("thing_id", "must not be 422")
        if thing_id == 423:
            raise NotAllowedNow("status", "order is completed")
        if thing_id == 424:
            raise CoiMismatch()
        return {"thing_id": thing_id}

    return app


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(build_app()) as c:
        yield c


VALID = {"name": "a", "count": 1, "due": "2026-01-01", "address": {"city": "Basel", "zip": "4000"}}


def problem(resp, status: int) -> dict:
    assert resp.status_code == status
    assert resp.headers["content-type"].startswith(PROBLEM_JSON)
    body = resp.json()
    assert body["status"] == status
    assert body["type"].startswith(PROBLEM_BASE)
    assert body["title"]
    assert "detail" in body
    return body


def fields(body: dict) -> dict[str, str]:
    return {e["field"]: e["reason"] for e in body["errors"]}


def test_valid_request_passes(client: TestClient) -> None:
    assert client.post("/things", json=VALID).json() == {"name": "a"}


def test_missing_body_field_is_required(client: TestClient) -> None:
    body = problem(client.post("/things", json={k: v for k, v in VALID.items() if k != "count"}), 422)
    assert fields(body) == {"count": "is required"}
    assert body["type"] == PROBLEM_BASE + "validation"
    assert body["instance"] == "/things"
    assert body["detail"] == "count: is required"


def test_nested_body_fields_are_dotted_paths(client: TestClient) -> None:
    payload = {**VALID, "address": {"city": ""}, "tags": [{"city": "x", "zip": "1"}, {"zip": "2"}]}
    errs = fields(problem(client.post("/things", json=payload), 422))
    assert set(errs) == {"address.city", "address.zip", "tags.1.city"}
    assert errs["address.zip"] == "is required"
    assert errs["tags.1.city"] == "is required"
    assert errs["address.city"] != "is required"  # too short, not missing
    assert not any(f.startswith("body") for f in errs)


def test_wrong_types_name_the_field_with_a_reason(client: TestClient) -> None:
    errs = fields(problem(client.post("/things", json={**VALID, "count": "many", "due": "soon"}), 422))
    assert set(errs) == {"count", "due"}
    assert all(reason and reason != "is required" for reason in errs.values())


def test_missing_body_altogether(client: TestClient) -> None:
    errs = fields(problem(client.post("/things"), 422))
    assert errs == {"body": "is required"}


def test_query_and_path_parameters_are_named_without_prefix(client: TestClient) -> None:
    assert fields(problem(client.get("/things"), 422)) == {"limit": "is required"}
    assert set(fields(problem(client.get("/things", params={"limit": 0}), 422))) == {"limit"}
    assert set(fields(problem(client.get("/things/abc"), 422))) == {"thing_id"}


def test_not_found_problem(client: TestClient) -> None:
    body = problem(client.get("/things/404"), 404)
    assert body["title"] == "Thing not found"
    assert body["detail"] == "no thing with id 404"
    assert body["type"] == PROBLEM_BASE + "not-found"
    assert body["instance"] == "/things/404"
    assert "errors" not in body


def test_domain_errors_map_to_their_status_in_one_place(client: TestClient) -> None:
    state = problem(client.get("/things/423"), 409)
    assert state["type"] == PROBLEM_BASE + "order-state"
    assert state["errors"] == [{"field": "status", "reason": "order is completed"}]
    coi = problem(client.get("/things/424"), 409)
    assert (coi["type"], coi["title"]) == (PROBLEM_BASE + "coi-mismatch", "Chain of identity mismatch")
    assert coi["errors"] == [{"field": "coi", "reason": "does not match the order"}]


def test_raised_problem_keeps_its_status_and_kind(client: TestClient) -> None:
    body = problem(client.get("/things/409"), 409)
    assert (body["title"], body["detail"], body["type"]) == (
        "Conflict",
        "thing is busy",
        PROBLEM_BASE + "conflict",
    )


def test_invalid_names_the_field(client: TestClient) -> None:
    body = problem(client.get("/things/422"), 422)
    assert body["errors"] == [{"field": "thing_id", "reason": "must not be 422"}]
    assert body["detail"] == "thing_id: must not be 422"


def test_unknown_route_and_method_are_problems_too(client: TestClient) -> None:
    assert problem(client.get("/nowhere"), 404)["title"] == "Not found"
    assert problem(client.delete("/things"), 405)["title"] == "Method not allowed"
