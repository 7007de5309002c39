"""Creating, listing and reading pools; refused pool definitions store nothing."""

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from service.blobs import FileBlobStore
from service.models import RoundStatus, Split
from tests.service.factories import make_items, make_label, make_pool, make_round, row_counts

MNIST = {
    "name": "mnist",
    "task": "classification",
    "classes": [str(d) for d in range(10)],
    "input_kind": "image",
    "model_spec": {"network": "mlp", "training": {"max_epochs": 5}},
    "default_budget": 50,
}


def test_create_pool_returns_it_with_zero_counts(client: TestClient, admin: dict) -> None:
    response = client.post("/pools", json=MNIST, headers=admin)
    assert response.status_code == 201
    body = response.json()
    assert body["name"] == "mnist" and body["classes"] == MNIST["classes"]
    assert body["model_spec"] == {"network": "mlp", "training": {"max_epochs": 5}}
    assert body["default_budget"] == 50
    assert body["default_strategy"] == "ally"
    assert (body["items"], body["labeled"], body["holdout"], body["rounds"]) == (0, 0, 0, 0)
    assert body["created_at"].endswith("Z") or body["created_at"].endswith("+00:00")


def test_the_model_spec_defaults_to_the_auto_network(client: TestClient, admin: dict) -> None:
    body = {**MNIST, "model_spec": {}}
    response = client.post("/pools", json=body, headers=admin)
    assert response.json()["model_spec"] == {"network": "auto", "training": {}}


def test_a_regression_pool_has_a_target_and_no_classes(client: TestClient, admin: dict) -> None:
    response = client.post(
        "/pools",
        json={
            "name": "updrs",
            "task": "regression",
            "target": "total UPDRS",
            "input_kind": "vector",
        },
        headers=admin,
    )
    assert response.status_code == 201
    assert response.json()["classes"] is None and response.json()["target"] == "total UPDRS"


def test_read_pool_counts_items_labels_holdout_and_rounds(
    client: TestClient, session: Session, blobs: FileBlobStore, admin: dict
) -> None:
    pool = make_pool(session)
    items = make_items(session, blobs, pool, 5)
    holdout = make_items(session, blobs, pool, 2, split=Split.holdout, start=50)
    make_label(session, items[0], "1")
    make_label(session, items[0], "2")  # a second label of the same item: still one item
    make_label(session, items[1], "3")
    make_label(session, holdout[0], "4")  # holdout labels do not count as labeled
    make_round(session, pool, status=RoundStatus.ready)
    response = client.get(f"/pools/{pool.id}", headers=admin)
    assert response.status_code == 200
    body = response.json()
    assert (body["items"], body["labeled"], body["holdout"], body["rounds"]) == (5, 2, 2, 1)


def test_list_pools_pages_with_counts(
    client: TestClient, session: Session, blobs: FileBlobStore, admin: dict
) -> None:
    pools = [make_pool(session, name=f"p{i}") for i in range(3)]
    make_items(session, blobs, pools[1], 2)
    page = client.get("/pools?offset=1&limit=1", headers=admin).json()
    assert page["count"] == 3
    assert [p["name"] for p in page["data"]] == ["p1"]
    assert page["data"][0]["items"] == 2


BAD_POOLS: list[tuple[str, dict[str, Any]]] = [
    ("classification without classes", {**MNIST, "classes": None}),
    ("one class", {**MNIST, "classes": ["only"]}),
    ("repeated classes", {**MNIST, "classes": ["a", "a"]}),
    ("regression with classes", {**MNIST, "task": "regression"}),
    ("unknown task", {**MNIST, "task": "ranking"}),
    ("unknown input kind", {**MNIST, "input_kind": "audio"}),
    ("unknown strategy", {**MNIST, "default_strategy": "magic"}),
    (
        "classification-only strategy on regression",
        {"name": "r", "task": "regression", "input_kind": "vector", "default_strategy": "entropy"},
    ),
    ("empty name", {**MNIST, "name": "  "}),
    ("zero budget", {**MNIST, "default_budget": 0}),
    ("budget past 32 bits", {**MNIST, "default_budget": 2**31}),
    (
        "NUL in the target",
        {"name": "r", "task": "regression", "input_kind": "vector", "target": "a\x00b"},
    ),
    ("NaN in the model spec", {**MNIST, "model_spec": {"training": {"primal_lr": float("nan")}}}),
    ("unknown network", {**MNIST, "model_spec": {"network": "lenet"}}),
    ("unknown model spec key", {**MNIST, "model_spec": {"lr": 0.1}}),
    ("unknown training option", {**MNIST, "model_spec": {"training": {"epochs": 3}}}),
    ("zero epochs", {**MNIST, "model_spec": {"training": {"max_epochs": 0}}}),
    ("holdout of everything", {**MNIST, "model_spec": {"training": {"holdout_fraction": 1}}}),
    ("negative learning rate", {**MNIST, "model_spec": {"training": {"primal_lr": -1e-3}}}),
]


@pytest.mark.parametrize("body", [b for _, b in BAD_POOLS], ids=[n for n, _ in BAD_POOLS])
def test_bad_pool_definitions_are_422_and_store_nothing(
    client: TestClient, session: Session, admin: dict, body: dict
) -> None:
    before = row_counts(session)
    # json.dumps writes NaN, as some clients do; httpx's json= would refuse to.
    headers = {**admin, "content-type": "application/json"}
    response = client.post("/pools", content=json.dumps(body), headers=headers)
    assert response.status_code == 422
    assert response.json()["error"] == "ValidationError"
    assert row_counts(session) == before


def test_unknown_strategy_error_lists_the_valid_names(client: TestClient, admin: dict) -> None:
    response = client.post("/pools", json={**MNIST, "default_strategy": "magic"}, headers=admin)
    message = str(response.json()["detail"])
    for name in ("ally", "random", "entropy", "margin", "badge", "coreset"):
        assert name in message


@pytest.mark.parametrize("epsilon", [0.25, "auto", 2.2250738585072014e-308, 9.693632633465546e307])
def test_the_default_epsilon_is_a_number_or_auto(
    client: TestClient, admin: dict, epsilon: object
) -> None:
    created = client.post("/pools", json={**MNIST, "default_epsilon": epsilon}, headers=admin)
    assert created.status_code == 201, created.text
    read = client.get(f"/pools/{created.json()['id']}", headers=admin)
    assert read.json()["default_epsilon"] == epsilon


@pytest.mark.parametrize("epsilon", [0, -1, "sometimes", True])
def test_a_bad_default_epsilon_is_422(client: TestClient, admin: dict, epsilon: object) -> None:
    response = client.post("/pools", json={**MNIST, "default_epsilon": epsilon}, headers=admin)
    assert response.status_code == 422
