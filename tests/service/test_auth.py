"""Every route with no key, an annotator key and an admin key; keys stored hashed."""

import io
import zipfile
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from service.auth import create_key, hash_key
from service.blobs import FileBlobStore
from service.models import ApiKey, Role, RoundStatus
from tests.service.factories import image_bytes, make_items, make_pool, make_round


@dataclass
class World:
    pool: int
    item: int
    ready_round: int
    queued_round: int
    other_key: int


@pytest.fixture
def world(session: Session, blobs: FileBlobStore) -> World:
    pool = make_pool(session, name="world")
    items = make_items(session, blobs, pool, 8)
    ready = make_round(session, pool, queried=items[:5], metrics={"accuracy": 0.5})
    other = make_pool(session, name="other")
    make_items(session, blobs, other, 1, start=100)
    queued = make_round(session, other, status=RoundStatus.queued)
    key, _ = create_key(session, name="bob", role=Role.annotator)
    return World(pool.id, items[0].id, ready.id, queued.id, key.id)  # type: ignore[arg-type]


def _archive() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        # 8x8 grey, like the World's items: a pool's items share one shape.
        z.writestr("3/a.png", image_bytes(1, (8, 8), grey=True))
        z.writestr("7/b.png", image_bytes(2, (8, 8), grey=True))
    return buffer.getvalue()


# (method, path, request kwargs, who may call it). Paths are filled from the World.
ADMIN, ANNOTATOR, ANYONE = "admin", "annotator", "anyone"
ROUTES: list[tuple[str, str, dict[str, Any], str]] = [
    (
        "POST",
        "/pools",
        {"json": {"name": "new", "task": "regression", "input_kind": "vector"}},
        ADMIN,
    ),
    ("GET", "/pools", {}, ADMIN),
    ("GET", "/pools/{pool}", {}, ADMIN),
    (
        "POST",
        "/pools/{pool}/items",
        {"files": [("files", ("x.png", image_bytes(99, (8, 8), grey=True)))]},
        ADMIN,
    ),
    ("POST", "/pools/{pool}/import", {"files": {"archive": ("a.zip", _archive())}}, ADMIN),
    ("GET", "/items/{item}", {}, ANNOTATOR),
    ("GET", "/items/{item}/image", {}, ANNOTATOR),
    ("POST", "/rounds", {"json": {"pool_id": "{pool}", "budget": 5}}, ADMIN),
    ("GET", "/rounds/{ready_round}", {}, ADMIN),
    ("GET", "/pools/{pool}/rounds", {}, ADMIN),
    ("POST", "/rounds/{queued_round}/cancel", {}, ADMIN),
    ("GET", "/queries/{ready_round}", {}, ANNOTATOR),
    ("POST", "/labels", {"json": {"item_id": "{item}", "value": "3"}}, ANNOTATOR),
    ("GET", "/pools/{pool}/labels", {}, ADMIN),
    ("GET", "/pools/{pool}/learning-curve", {}, ADMIN),
    ("POST", "/keys", {"json": {"name": "carol", "role": "annotator"}}, ADMIN),
    ("GET", "/keys", {}, ADMIN),
    ("POST", "/keys/{other_key}/revoke", {}, ADMIN),
    ("GET", "/healthz", {}, ANYONE),
    ("GET", "/readyz", {}, ANYONE),
]


def _fill(value: Any, world: World) -> Any:
    if isinstance(value, str) and value.startswith("{") and value.endswith("}"):
        return getattr(world, value[1:-1])
    if isinstance(value, dict):
        return {k: _fill(v, world) for k, v in value.items()}
    return value


def _call(client: TestClient, route: tuple, world: World, headers: dict[str, str]) -> Any:
    method, path, kwargs, _ = route
    url = path.format(**vars(world))
    kwargs = {k: _fill(v, world) if k == "json" else v for k, v in kwargs.items()}
    return client.request(method, url, headers=headers, **kwargs)


def test_the_matrix_lists_every_route(app: FastAPI) -> None:
    documented = {
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        for method in operations
    }
    listed = {(m, p.replace("{pool}", "{pool_id}")) for m, p, _, _ in ROUTES}
    normalised = {
        (m, p.replace("{item}", "{item_id}").replace("{other_key}", "{key_id}")) for m, p in listed
    }
    normalised = {
        (m, p.replace("{ready_round}", "{round_id}").replace("{queued_round}", "{round_id}"))
        for m, p in normalised
    }
    assert normalised == documented


@pytest.mark.parametrize("route", ROUTES, ids=[f"{m} {p}" for m, p, _, _ in ROUTES])
def test_without_a_key(client: TestClient, world: World, route: tuple) -> None:
    response = _call(client, route, world, {})
    if route[3] == ANYONE:
        assert response.status_code == 200
    else:
        assert response.status_code == 401
        assert response.json()["error"] == "NotAuthenticated"
        assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("route", ROUTES, ids=[f"{m} {p}" for m, p, _, _ in ROUTES])
def test_with_an_annotator_key(
    client: TestClient, world: World, annotator: dict[str, str], route: tuple
) -> None:
    response = _call(client, route, world, annotator)
    if route[3] == ADMIN:
        assert response.status_code == 403
        assert response.json()["error"] == "Forbidden"
    else:
        assert 200 <= response.status_code < 300, response.text


@pytest.mark.parametrize("route", ROUTES, ids=[f"{m} {p}" for m, p, _, _ in ROUTES])
def test_with_an_admin_key(
    client: TestClient, world: World, admin: dict[str, str], route: tuple
) -> None:
    response = _call(client, route, world, admin)
    assert 200 <= response.status_code < 300, response.text


@pytest.mark.parametrize(
    "header",
    ["Bearer ally_not-a-key", "Basic dXNlcjpwYXNz", "Bearer", "ally_without_scheme"],
)
def test_unknown_or_malformed_keys_get_401(client: TestClient, header: str) -> None:
    response = client.get("/pools", headers={"Authorization": header})
    assert response.status_code == 401


def test_a_revoked_key_gets_401(
    client: TestClient, session: Session, admin: dict[str, str]
) -> None:
    row, key = create_key(session, name="temp", role=Role.admin)
    headers = {"Authorization": f"Bearer {key}"}
    assert client.get("/pools", headers=headers).status_code == 200
    assert client.post(f"/keys/{row.id}/revoke", headers=admin).status_code == 200
    response = client.get("/pools", headers=headers)
    assert response.status_code == 401
    assert "revoked" in response.json()["detail"]


def test_keys_are_stored_hashed_and_shown_once(
    client: TestClient, session: Session, admin: dict[str, str]
) -> None:
    created = client.post("/keys", json={"name": "dan", "role": "annotator"}, headers=admin)
    assert created.status_code == 201
    key = created.json()["key"]
    row = session.exec(select(ApiKey).where(ApiKey.name == "dan")).one()
    assert row.key_hash == hash_key(key) and key not in row.key_hash
    listed = client.get("/keys", headers=admin).json()
    assert all("key" not in entry for entry in listed)
    assert any(entry["name"] == "dan" and key.startswith(entry["prefix"]) for entry in listed)
    # The new key works, with its role.
    assert client.get("/pools", headers={"Authorization": f"Bearer {key}"}).status_code == 403


def test_revoking_an_unknown_key_is_404(client: TestClient, admin: dict[str, str]) -> None:
    response = client.post("/keys/999999/revoke", headers=admin)
    assert response.status_code == 404
    assert response.json()["error"] == "KeyNotFound"


def test_a_bad_role_is_422_and_creates_nothing(
    client: TestClient, session: Session, admin: dict[str, str]
) -> None:
    before = len(session.exec(select(ApiKey)).all())
    response = client.post("/keys", json={"name": "eve", "role": "root"}, headers=admin)
    assert response.status_code == 422
    assert len(session.exec(select(ApiKey)).all()) == before
