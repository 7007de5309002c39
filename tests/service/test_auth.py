"""The authorization matrix: every route with no key, a revoked key, an annotator key
restricted to another pool, an annotator key and an admin key. Keys: stored hashed, pools."""

import io
import zipfile
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from httpx import Response
from sqlmodel import Session, select

from service.auth import create_key, hash_key, live_keys, revoke_key
from service.blobs import FileBlobStore
from service.models import ApiKey, ApiKeyPool, Label, Role, RoundStatus, utcnow
from tests.service.factories import image_bytes, make_items, make_pool, make_round, row_counts


@dataclass
class World:
    """Ids the routes are called with: the pool, its item and rounds, and another pool."""

    pool: int
    item: int
    ready_round: int
    queued_round: int
    other_key: int
    other_pool: int
    other_item: int
    other_round: int


@pytest.fixture
def world(session: Session, blobs: FileBlobStore) -> World:
    pool = make_pool(session, name="world")
    items = make_items(session, blobs, pool, 8)
    ready = make_round(session, pool, queried=items[:5], metrics={"accuracy": 0.5})
    other = make_pool(session, name="other")
    [other_item] = make_items(session, blobs, other, 1, start=100)
    other_ready = make_round(session, other, queried=[other_item])
    queued = make_round(session, other, status=RoundStatus.queued)
    key, _ = create_key(session, name="bob", role=Role.annotator)
    return World(
        pool=pool.id,  # type: ignore[arg-type]
        item=items[0].id,  # type: ignore[arg-type]
        ready_round=ready.id,  # type: ignore[arg-type]
        queued_round=queued.id,  # type: ignore[arg-type]
        other_key=key.id,  # type: ignore[arg-type]
        other_pool=other.id,  # type: ignore[arg-type]
        other_item=other_item.id,  # type: ignore[arg-type]
        other_round=other_ready.id,  # type: ignore[arg-type]
    )


def _archive() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        # 8x8 grey, like the World's items: a pool's items share one shape.
        z.writestr("3/a.png", image_bytes(1, (8, 8), grey=True))
        z.writestr("7/b.png", image_bytes(2, (8, 8), grey=True))
    return buffer.getvalue()


# Who may call a route.
ADMIN, ANNOTATOR, ANYONE = "admin", "annotator", "anyone"


@dataclass
class Route:
    method: str
    path: str  # {field} is filled from the World, in the path and in JSON bodies
    kwargs: dict[str, Any]
    allowed: str
    ok: int = 200
    # What an annotator restricted to another pool is told: the object does not exist.
    hidden_as: str | None = None

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


ROUTES = [
    Route(
        "POST",
        "/pools",
        {"json": {"name": "new", "task": "regression", "input_kind": "vector"}},
        ADMIN,
        ok=201,
    ),
    Route("GET", "/pools", {}, ADMIN),
    Route("GET", "/pools/{pool}", {}, ADMIN),
    Route(
        "POST",
        "/pools/{pool}/items",
        {"files": [("files", ("x.png", image_bytes(99, (8, 8), grey=True)))]},
        ADMIN,
        ok=201,
    ),
    Route(
        "POST", "/pools/{pool}/import", {"files": {"archive": ("a.zip", _archive())}}, ADMIN, 201
    ),
    Route("GET", "/items/{item}", {}, ANNOTATOR, hidden_as="ItemNotFound"),
    Route("GET", "/items/{item}/image", {}, ANNOTATOR, hidden_as="ItemNotFound"),
    Route("POST", "/rounds", {"json": {"pool_id": "{pool}", "budget": 5}}, ADMIN, ok=202),
    Route("GET", "/rounds/{ready_round}", {}, ADMIN),
    Route("GET", "/pools/{pool}/rounds", {}, ADMIN),
    Route("POST", "/rounds/{queued_round}/cancel", {}, ADMIN),
    Route("GET", "/queries/{ready_round}", {}, ANNOTATOR, hidden_as="RoundNotFound"),
    Route(
        "POST",
        "/labels",
        {"json": {"item_id": "{item}", "value": "3"}},
        ANNOTATOR,
        hidden_as="ItemNotFound",
    ),
    Route("GET", "/pools/{pool}/labels", {}, ADMIN),
    Route("GET", "/pools/{pool}/learning-curve", {}, ADMIN),
    Route("POST", "/keys", {"json": {"name": "carol", "role": "annotator"}}, ADMIN, ok=201),
    Route("GET", "/keys", {}, ADMIN),
    Route("POST", "/keys/{other_key}/revoke", {}, ADMIN),
    Route("GET", "/healthz", {}, ANYONE),
    Route("GET", "/readyz", {}, ANYONE),
]

# The callers; OUTSIDER is an annotator key restricted to the other pool.
NO_KEY, REVOKED, OUTSIDER = "no-key", "revoked", "outsider"
CALLERS = [NO_KEY, REVOKED, OUTSIDER, ANNOTATOR, ADMIN]


def expected(route: Route, caller: str) -> tuple[int, str | None]:
    """The status and error code `caller` gets from `route`."""
    if route.allowed == ANYONE:
        return route.ok, None
    if caller in (NO_KEY, REVOKED):
        return 401, "NotAuthenticated"
    if route.allowed == ADMIN and caller != ADMIN:
        return 403, "Forbidden"
    if caller == OUTSIDER:
        return 404, route.hidden_as
    return route.ok, None


@pytest.fixture
def callers(
    session: Session, world: World, admin: dict[str, str], annotator: dict[str, str]
) -> dict[str, dict[str, str]]:
    """Each caller's headers."""
    # An admin key: once revoked, even the widest key opens nothing.
    revoked, revoked_key = create_key(session, name="gone", role=Role.admin)
    revoke_key(session, revoked.id)  # type: ignore[arg-type]
    _, outsider_key = create_key(
        session, name="olga", role=Role.annotator, pools=[world.other_pool]
    )
    return {
        NO_KEY: {},
        REVOKED: {"Authorization": f"Bearer {revoked_key}"},
        OUTSIDER: {"Authorization": f"Bearer {outsider_key}"},
        ANNOTATOR: annotator,
        ADMIN: admin,
    }


def _fill(value: Any, world: World) -> Any:
    if isinstance(value, str) and value.startswith("{") and value.endswith("}"):
        return getattr(world, value[1:-1])
    if isinstance(value, dict):
        return {k: _fill(v, world) for k, v in value.items()}
    return value


def _call(client: TestClient, route: Route, world: World, headers: dict[str, str]) -> Response:
    kwargs = {k: _fill(v, world) if k == "json" else v for k, v in route.kwargs.items()}
    return client.request(route.method, route.path.format(**vars(world)), headers=headers, **kwargs)


# The World's fields that stand for each path parameter.
PATH_PARAMETERS = {
    "{pool}": "{pool_id}",
    "{item}": "{item_id}",
    "{ready_round}": "{round_id}",
    "{queued_round}": "{round_id}",
    "{other_key}": "{key_id}",
}


def test_the_matrix_lists_every_route(app: FastAPI) -> None:
    documented = {
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        for method in operations
    }
    listed = set()
    for route in ROUTES:
        path = route.path
        for field, parameter in PATH_PARAMETERS.items():
            path = path.replace(field, parameter)
        listed.add((route.method, path))
    assert listed == documented
    assert len(ROUTES) == len(documented)


def test_every_route_an_annotator_may_call_says_how_it_hides_other_pools() -> None:
    assert all((r.allowed == ANNOTATOR) == (r.hidden_as is not None) for r in ROUTES)


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("route", ROUTES, ids=str)
def test_the_authorization_matrix(
    client: TestClient,
    session: Session,
    world: World,
    callers: dict[str, dict[str, str]],
    route: Route,
    caller: str,
) -> None:
    status, error = expected(route, caller)
    before = row_counts(session)
    response = _call(client, route, world, callers[caller])
    assert response.status_code == status, response.text
    if error is None:
        return
    assert response.json()["error"] == error
    assert row_counts(session) == before  # a refusal stores nothing
    if status == 401:
        assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "header",
    ["Bearer ally_not-a-key", "Basic dXNlcjpwYXNz", "Bearer", "ally_without_scheme"],
)
def test_unknown_or_malformed_keys_get_401(client: TestClient, header: str) -> None:
    response = client.get("/pools", headers={"Authorization": header})
    assert response.status_code == 401


def test_a_key_revoked_through_the_api_gets_401_at_once(
    client: TestClient, session: Session, admin: dict[str, str]
) -> None:
    row, key = create_key(session, name="temp", role=Role.admin)
    headers = {"Authorization": f"Bearer {key}"}
    assert client.get("/pools", headers=headers).status_code == 200
    assert client.post(f"/keys/{row.id}/revoke", headers=admin).status_code == 200
    response = client.get("/pools", headers=headers)
    assert response.status_code == 401
    assert "revoked" in response.json()["detail"]


def test_a_key_revoked_by_another_process_is_refused_within_the_cache_time(
    client: TestClient, session: Session, monkeypatch: pytest.MonkeyPatch
) -> None:
    """This process remembers a live key for `key_cache_seconds`; a revocation it did not
    make itself (another API process, `ally keys revoke`) takes effect within that time."""
    now = [1000.0]
    monkeypatch.setattr(live_keys, "clock", lambda: now[0])
    row, key = create_key(session, name="elsewhere", role=Role.admin)
    headers = {"Authorization": f"Bearer {key}"}
    assert client.get("/pools", headers=headers).status_code == 200
    row.revoked_at = utcnow()  # as another process would: this one is not told
    session.add(row)
    session.flush()
    now[0] += live_keys.ttl / 2
    assert client.get("/pools", headers=headers).status_code == 200  # remembered
    now[0] += live_keys.ttl / 2
    response = client.get("/pools", headers=headers)
    assert response.status_code == 401
    assert "revoked" in response.json()["detail"]


def test_keys_are_stored_hashed_and_shown_once(
    client: TestClient, session: Session, admin: dict[str, str]
) -> None:
    created = client.post("/keys", json={"name": "dan", "role": "annotator"}, headers=admin)
    assert created.status_code == 201
    key = created.json()["key"]
    assert created.json()["pools"] is None
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


# --- pool-restricted keys -----------------------------------------------------------------


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_a_restricted_key_shows_its_pools(
    client: TestClient, world: World, admin: dict[str, str]
) -> None:
    pools = [world.other_pool, world.pool, world.other_pool]
    created = client.post(
        "/keys", json={"name": "fay", "role": "annotator", "pools": pools}, headers=admin
    )
    assert created.status_code == 201, created.text
    assert created.json()["pools"] == sorted({world.pool, world.other_pool})
    listed = {entry["name"]: entry["pools"] for entry in client.get("/keys", headers=admin).json()}
    assert listed["fay"] == sorted({world.pool, world.other_pool})
    assert listed["bob"] is None and listed["root"] is None
    revoked = client.post(f"/keys/{created.json()['id']}/revoke", headers=admin).json()
    assert revoked["pools"] == listed["fay"] and revoked["revoked_at"] is not None


@pytest.mark.parametrize(
    ("body", "status", "error", "named"),
    [
        ({"role": "admin", "pools": ["{pool}"]}, 422, "InvalidKeyScope", "admin"),
        (
            {"role": "annotator", "pools": ["{pool}", 999_998, 999_999]},
            404,
            "PoolNotFound",
            "999998, 999999",
        ),
        ({"role": "annotator", "pools": []}, 422, "ValidationError", "pools"),
        ({"role": "annotator", "pools": ["x"]}, 422, "ValidationError", "pools"),
        ({"role": "annotator", "pools": [2**40]}, 422, "ValidationError", "pools"),
    ],
    ids=["admin-with-pools", "unknown-pools", "no-pools", "not-an-id", "too-large-an-id"],
)
def test_bad_pool_restrictions_are_refused_and_create_nothing(
    client: TestClient,
    session: Session,
    world: World,
    admin: dict[str, str],
    body: dict[str, Any],
    status: int,
    error: str,
    named: str,
) -> None:
    body = {"name": "gil", **body, "pools": [_fill(p, world) for p in body["pools"]]}
    before = row_counts(session)
    response = client.post("/keys", json=body, headers=admin)
    assert response.status_code == status, response.text
    assert response.json()["error"] == error
    assert named in str(response.json()["detail"])
    assert row_counts(session) == before


def test_a_restricted_annotator_works_on_its_own_pool(
    client: TestClient, session: Session, world: World
) -> None:
    _, key = create_key(session, name="hal", role=Role.annotator, pools=[world.pool])
    page = client.get(f"/queries/{world.ready_round}?annotator=hal", headers=_bearer(key))
    assert page.status_code == 200, page.text
    item_ids = [query["item_id"] for query in page.json()["data"]]
    assert len(item_ids) == 5 and all(q["leased_to"] == "hal" for q in page.json()["data"])
    assert client.get(f"/items/{item_ids[0]}", headers=_bearer(key)).status_code == 200
    image = client.get(f"/items/{item_ids[0]}/image", headers=_bearer(key))
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    batch = [{"item_id": item_id, "value": "4"} for item_id in item_ids]
    labeled = client.post("/labels", json=batch, headers=_bearer(key))
    assert labeled.status_code == 200, labeled.text
    assert labeled.json()["created"] == 5
    assert {label["round_id"] for label in labeled.json()["data"]} == {world.ready_round}


def test_a_restricted_key_revoked_after_its_pools_were_read_gets_401_at_once(
    client: TestClient, session: Session, world: World, admin: dict[str, str]
) -> None:
    row, key = create_key(session, name="ivy", role=Role.annotator, pools=[world.pool])
    assert client.get(f"/items/{world.item}", headers=_bearer(key)).status_code == 200
    assert client.post(f"/keys/{row.id}/revoke", headers=admin).status_code == 200
    response = client.get(f"/items/{world.item}", headers=_bearer(key))
    assert response.status_code == 401
    assert response.json()["error"] == "NotAuthenticated"


def test_a_restricted_key_whose_pool_rows_are_gone_sees_no_pool(
    client: TestClient, session: Session, world: World
) -> None:
    """Fail closed: losing the rows (a restore, a hand edit) must not widen the key."""
    row, key = create_key(session, name="jay", role=Role.annotator, pools=[world.other_pool])
    for link in session.exec(select(ApiKeyPool).where(ApiKeyPool.key_id == row.id)):
        session.delete(link)
    session.flush()
    for path in (f"/items/{world.item}", f"/queries/{world.ready_round}"):
        assert client.get(path, headers=_bearer(key)).status_code == 404, path


def test_a_key_restricted_to_several_pools_sees_each_of_them(
    client: TestClient, session: Session, world: World
) -> None:
    _, key = create_key(
        session, name="ida", role=Role.annotator, pools=[world.pool, world.other_pool]
    )
    for round_id in (world.ready_round, world.other_round):
        assert client.get(f"/queries/{round_id}", headers=_bearer(key)).status_code == 200
    for item_id in (world.item, world.other_item):
        assert client.get(f"/items/{item_id}", headers=_bearer(key)).status_code == 200


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/items/{}", "item"),
        ("/items/{}/image", "item"),
        ("/queries/{}", "ready_round"),
    ],
)
def test_another_pools_object_looks_exactly_like_a_missing_one(
    client: TestClient, session: Session, world: World, path: str, field: str
) -> None:
    _, key = create_key(session, name="jo", role=Role.annotator, pools=[world.other_pool])
    hidden_id, missing_id = getattr(world, field), 999_999
    hidden = client.get(path.format(hidden_id), headers=_bearer(key))
    missing = client.get(path.format(missing_id), headers=_bearer(key))
    assert hidden.status_code == missing.status_code == 404
    assert hidden.json()["error"] == missing.json()["error"]
    assert hidden.json()["detail"] == missing.json()["detail"].replace(
        str(missing_id), str(hidden_id)
    )


def test_a_batch_with_one_item_of_another_pool_stores_nothing(
    client: TestClient, session: Session, world: World
) -> None:
    _, key = create_key(session, name="kim", role=Role.annotator, pools=[world.other_pool])
    own = {"item_id": world.other_item, "value": "1"}
    before = row_counts(session)
    mixed = client.post(
        "/labels", json=[own, {"item_id": world.item, "value": "2"}], headers=_bearer(key)
    )
    assert mixed.status_code == 404
    assert mixed.json() == {"error": "ItemNotFound", "detail": f"no items [{world.item}]"}
    assert row_counts(session) == before
    # The same batch without the other pool's item goes through.
    alone = client.post("/labels", json=[own], headers=_bearer(key))
    assert alone.status_code == 200, alone.text
    assert session.exec(select(Label.item_id)).all() == [world.other_item]
