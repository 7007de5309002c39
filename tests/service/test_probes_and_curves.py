"""Probes, the learning curve, the body-size limit, and the OpenAPI description."""

import io
from collections.abc import Iterator

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import Engine, create_engine
from sqlmodel import Session

from service.api.deps import Database, get_database, get_db
from service.models import RoundStatus, Task
from service.settings import settings
from tests.service.factories import make_pool, make_round, row_counts


def test_healthz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}


def test_readyz_without_a_broker(client: TestClient) -> None:
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json()["checks"]["database"] == "ok"
    assert response.json()["checks"]["broker"].startswith("not configured")


def test_readyz_pings_the_broker(
    client: TestClient, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settings, "broker_url", redis_url)
    response = client.get("/readyz")
    assert response.status_code == 200 and response.json()["checks"]["broker"] == "ok"


def test_readyz_names_a_broker_that_is_down(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settings, "broker_url", "redis://127.0.0.1:1/0")
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["status"] == "unavailable"
    assert response.json()["checks"]["broker"].startswith("unreachable")
    assert response.json()["checks"]["database"] == "ok"


@pytest.fixture
def database_down(app) -> None:  # type: ignore[no-untyped-def]
    """Requests get sessions on a server that refuses connections."""
    dead = create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none")

    def unreachable():  # type: ignore[no-untyped-def]
        with Session(dead) as session:
            yield session

    app.dependency_overrides[get_db] = unreachable
    app.dependency_overrides[get_database] = lambda: Database(lambda: dead)


def test_readyz_names_a_database_that_is_down(client: TestClient, database_down: None) -> None:
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["database"].startswith("unreachable")


def test_a_request_while_the_database_is_down_is_a_503_to_retry(
    client: TestClient, admin: dict, database_down: None
) -> None:
    response = client.get("/pools", headers=admin)
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert response.json()["error"] == "DatabaseUnavailable"
    assert "retry" in response.json()["detail"]


@pytest.mark.parametrize("empty_engine", ["postgresql"], indirect=True)
def test_a_database_error_that_is_not_a_lost_connection_is_a_500(
    app: FastAPI, admin: dict, empty_engine: Engine
) -> None:
    """A bug (here a query on a table that does not exist) must not pass for an outage."""

    def without_tables() -> Iterator[Session]:
        with Session(empty_engine) as session:
            yield session

    app.dependency_overrides[get_db] = without_tables
    response = TestClient(app, raise_server_exceptions=False).get("/pools", headers=admin)
    assert response.status_code == 500 and "retry-after" not in response.headers


def test_learning_curve_from_ready_rounds(
    client: TestClient, session: Session, admin: dict
) -> None:
    pool = make_pool(session)
    make_round(session, pool, metrics={"accuracy": 0.5, "labeled": 20}, strategy="ally")
    make_round(session, pool, status=RoundStatus.failed)
    make_round(session, pool, metrics={"accuracy": 0.75}, labeled_at_start=40, strategy="ally")
    make_round(session, pool, status=RoundStatus.running)
    curve = client.get(f"/pools/{pool.id}/learning-curve", headers=admin).json()
    assert curve["metric"] == "accuracy"
    assert [(p["number"], p["labeled"], p["value"]) for p in curve["points"]] == [
        (1, 20, 0.5),
        (3, 40, 0.75),
    ]


def test_learning_curve_of_a_regression_pool_uses_mse(
    client: TestClient, session: Session, admin: dict
) -> None:
    pool = make_pool(session, task=Task.regression)
    make_round(session, pool, metrics={"mse": 2.5, "labeled": 10})
    curve = client.get(f"/pools/{pool.id}/learning-curve", headers=admin).json()
    assert curve["metric"] == "mse" and curve["points"][0]["value"] == 2.5


def test_learning_curve_as_png(client: TestClient, session: Session, admin: dict) -> None:
    pool = make_pool(session)
    make_round(session, pool, metrics={"accuracy": 0.5, "labeled": 20})
    make_round(session, pool, metrics={"accuracy": 0.7, "labeled": 40}, strategy="random")
    response = client.get(f"/pools/{pool.id}/learning-curve?format=png", headers=admin)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size[0] > 100


def test_learning_curve_refusals(client: TestClient, session: Session, admin: dict) -> None:
    pool = make_pool(session)
    assert client.get("/pools/999999/learning-curve", headers=admin).status_code == 404
    bad = client.get(f"/pools/{pool.id}/learning-curve?format=svg", headers=admin)
    assert bad.status_code == 422


def test_a_streamed_body_over_the_limit_is_413(
    app,
    session: Session,
    admin: dict,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    from service.api.limits import BodyLimit

    wrapped = BodyLimit(app, max_bytes=1000)
    client = TestClient(wrapped)  # type: ignore[arg-type]
    pool = make_pool(session)

    def chunks():  # type: ignore[no-untyped-def]
        for _ in range(10):
            yield b"y" * 500

    before = row_counts(session)
    response = client.post(
        f"/pools/{pool.id}/items",
        content=chunks(),
        headers={**admin, "content-type": "multipart/form-data; boundary=zzz"},
    )
    assert response.status_code == 413, response.text
    assert response.json()["error"] == "PayloadTooLarge"
    assert row_counts(session) == before


def test_every_route_documents_its_errors_and_json_bodies_have_examples(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            if path in ("/healthz", "/readyz"):
                continue
            responses = operation["responses"]
            assert {"401", "403", "422", "503"} <= responses.keys(), (method, path)
            assert operation.get("description") or operation.get("summary"), (method, path)
    schemas = spec["components"]["schemas"]
    for name in ("PoolCreate", "RoundCreate", "LabelCreate", "VectorItemsCreate", "ImportRequest"):
        assert schemas[name].get("examples"), name
    assert (
        "multipart/form-data"
        in spec["paths"]["/pools/{pool_id}/items"]["post"]["requestBody"]["content"]
    )
    assert client.get("/docs").status_code == 200

    def refs(node: object) -> list[str]:
        if isinstance(node, dict):
            return [v for k, v in node.items() if k == "$ref"] + [
                r for v in node.values() for r in refs(v)
            ]
        return [r for v in node for r in refs(v)] if isinstance(node, list) else []

    missing = {r for r in refs(spec) if r.split("/")[-1] not in schemas}
    assert not missing
