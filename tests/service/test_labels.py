"""POST /labels (validation, rounds, seed labels, idempotence) and the label export."""

import csv
import io
import json
from urllib.parse import unquote

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from service.blobs import FileBlobStore
from service.models import InputKind, Item, Label, Pool, Round, Split, Task
from service.schemas import LabelsCreated
from tests.service.factories import make_items, make_label, make_pool, make_round, row_counts


@pytest.fixture
def digits(session: Session, blobs: FileBlobStore) -> tuple[Round, list[Item]]:
    """A ready round on a digit pool that queried 3 of its 5 items."""
    pool = make_pool(session)
    items = make_items(session, blobs, pool, 5)
    return make_round(session, pool, queried=items[:3]), items


@pytest.fixture
def regression(session: Session, blobs: FileBlobStore) -> tuple[Round, list[Item]]:
    pool = make_pool(session, task=Task.regression, input_kind=InputKind.vector)
    items = make_items(session, blobs, pool, 3)
    return make_round(session, pool, queried=items), items


def test_one_label(client: TestClient, annotator: dict, digits) -> None:
    round_, items = digits
    response = client.post(
        "/labels",
        json={"item_id": items[0].id, "value": "7", "round_id": round_.id},
        headers=annotator,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["created"] == 1
    [label] = body["data"]
    assert (label["value"], label["annotator"], label["round_id"]) == ("7", "alice", round_.id)


@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_the_answer_is_exactly_the_json_of_its_declared_model(
    client: TestClient, annotator: dict, digits, regression, kind: str
) -> None:
    """The route serializes its answer itself, for speed: the bytes must be the model's,
    for new labels and for repeats alike."""
    _, items = digits if kind == "classification" else regression
    values = ["3", 4] if kind == "classification" else [1.5, -2.25]
    batch = [{"item_id": item.id, "value": v} for item, v in zip(items, values, strict=False)]
    for created in (2, 0):
        response = client.post("/labels", json=batch, headers=annotator)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "application/json"
        answer = LabelsCreated.model_validate_json(response.content)
        assert answer.created == created and len(answer.data) == 2
        assert response.content == answer.model_dump_json().encode()


def test_many_labels_default_to_the_round_that_queried_them(
    client: TestClient, session: Session, annotator: dict, digits
) -> None:
    round_, items = digits
    response = client.post(
        "/labels",
        json=[{"item_id": items[0].id, "value": "1"}, {"item_id": items[1].id, "value": 2}],
        headers=annotator,
    )
    assert response.status_code == 200, response.text
    assert [(x["value"], x["round_id"]) for x in response.json()["data"]] == [
        ("1", round_.id),
        ("2", round_.id),  # a number naming a class is read as that class
    ]
    assert len(session.exec(select(Label)).all()) == 2


def test_the_latest_round_that_queried_an_item_is_the_default(
    client: TestClient, session: Session, annotator: dict, digits
) -> None:
    _, items = digits
    pool = session.get(Pool, items[0].pool_id)
    assert pool is not None
    later = make_round(session, pool, queried=[items[0]])
    body = client.post(
        "/labels", json={"item_id": items[0].id, "value": "3"}, headers=annotator
    ).json()
    assert body["data"][0]["round_id"] == later.id


def test_repeating_a_label_is_idempotent_and_changing_it_keeps_history(
    client: TestClient, session: Session, annotator: dict, digits
) -> None:
    _, items = digits
    label = {"item_id": items[0].id, "value": "4"}
    first = client.post("/labels", json=label, headers=annotator).json()
    again = client.post("/labels", json=label, headers=annotator).json()
    assert again["created"] == 0 and again["data"][0]["id"] == first["data"][0]["id"]
    changed = client.post("/labels", json={**label, "value": "5"}, headers=annotator).json()
    assert changed["created"] == 1
    back = client.post("/labels", json=label, headers=annotator).json()
    assert back["created"] == 1  # back to 4: a new label, since the current one is 5
    values = [x.value_class for x in session.exec(select(Label).order_by(Label.id)).all()]
    assert values == ["4", "5", "4"]


def test_another_annotators_identical_label_is_recorded(
    client: TestClient, annotator: dict, digits
) -> None:
    _, items = digits
    label = {"item_id": items[0].id, "value": "4"}
    client.post("/labels", json=label, headers=annotator)
    other = client.post("/labels", json={**label, "annotator": "bob"}, headers=annotator).json()
    assert other["created"] == 1 and other["data"][0]["annotator"] == "bob"


def test_regression_labels(client: TestClient, annotator: dict, regression) -> None:
    _, items = regression
    body = client.post(
        "/labels",
        json=[{"item_id": items[0].id, "value": 21.5}, {"item_id": items[1].id, "value": -3}],
        headers=annotator,
    ).json()
    assert [x["value"] for x in body["data"]] == [21.5, -3.0]


def test_admins_give_seed_labels_outside_rounds(
    client: TestClient, session: Session, admin: dict, digits
) -> None:
    _, items = digits
    body = client.post("/labels", json={"item_id": items[4].id, "value": "9"}, headers=admin).json()
    assert body["data"][0]["round_id"] is None and body["data"][0]["annotator"] == "root"


def test_admins_label_the_holdout(
    client: TestClient, session: Session, blobs: FileBlobStore, admin: dict
) -> None:
    pool = make_pool(session)
    [item] = make_items(session, blobs, pool, 1, split=Split.holdout)
    response = client.post("/labels", json={"item_id": item.id, "value": "0"}, headers=admin)
    assert response.status_code == 200
    assert client.get(f"/pools/{pool.id}", headers=admin).json()["labeled"] == 0


def _refused(
    client: TestClient, session: Session, headers: dict, body: object, status: int, error: str
) -> str:
    before = row_counts(session)
    if isinstance(body, str):
        response = client.post(
            "/labels", content=body, headers={**headers, "content-type": "application/json"}
        )
    else:
        response = client.post("/labels", json=body, headers=headers)
    assert response.status_code == status, response.text
    assert response.json()["error"] == error
    assert row_counts(session) == before
    return str(response.json()["detail"])


def test_annotators_cannot_give_seed_labels(
    client: TestClient, session: Session, annotator: dict, digits
) -> None:
    _, items = digits
    detail = _refused(
        client, session, annotator, {"item_id": items[4].id, "value": "1"}, 403, "Forbidden"
    )
    assert "admins" in detail


@pytest.mark.parametrize("value", [3.5, -1])
def test_numbers_that_name_no_class_are_refused(
    client: TestClient, session: Session, annotator: dict, digits, value: float
) -> None:
    _, items = digits
    _refused(
        client, session, annotator, {"item_id": items[0].id, "value": value}, 400, "InvalidLabel"
    )


@pytest.mark.parametrize(
    ("raw", "status", "words"),
    [
        ("true", 422, "valid number"),
        ('"tall"', 400, "number"),
    ],
)
def test_bad_regression_targets_are_refused(
    client: TestClient,
    session: Session,
    annotator: dict,
    regression,
    raw: str,
    status: int,
    words: str,
) -> None:
    _, items = regression
    good, bad = items[0].id, items[1].id
    body = f'[{{"item_id": {good}, "value": 1.0}}, {{"item_id": {bad}, "value": {raw}}}]'
    error = "ValidationError" if status == 422 else "InvalidLabel"
    assert words in _refused(client, session, annotator, body, status, error)


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ("NaN", "finite"),
        ("Infinity", "finite"),
        ("1e400", "finite"),
        ("true", "valid number"),
        ("false", "valid number"),
    ],
)
def test_non_finite_numbers_and_booleans_are_no_class(
    client: TestClient, session: Session, annotator: dict, digits, raw: str, words: str
) -> None:
    _, items = digits
    body = f'{{"item_id": {items[0].id}, "value": {raw}}}'
    assert words in _refused(client, session, annotator, body, 422, "ValidationError")


def test_a_round_that_did_not_query_the_item_is_refused(
    client: TestClient, session: Session, annotator: dict, digits
) -> None:
    round_, items = digits
    body = {"item_id": items[4].id, "value": "1", "round_id": round_.id}
    assert "not queried" in _refused(client, session, annotator, body, 400, "InvalidLabel")


@pytest.mark.parametrize(
    "body",
    [[], {"value": "1"}, {"item_id": 1, "value": None}, "{broken"],
    ids=["empty batch", "no item", "no value", "broken JSON"],
)
def test_malformed_label_bodies_are_422(
    client: TestClient, session: Session, annotator: dict, body: object
) -> None:
    _refused(client, session, annotator, body, 422, "ValidationError")


def test_export_latest_labels_as_jsonl_and_csv(
    client: TestClient, session: Session, admin: dict, digits
) -> None:
    round_, items = digits
    make_label(session, items[0], "1", annotator="alice", round_id=round_.id)
    make_label(session, items[0], "2", annotator="bob", round_id=round_.id)
    make_label(session, items[1], "3")
    pool_id = items[0].pool_id
    jsonl = client.get(f"/pools/{pool_id}/labels", headers=admin)
    assert jsonl.headers["content-type"].startswith("application/x-ndjson")
    rows = [json.loads(line) for line in jsonl.text.splitlines()]
    assert [(r["item_id"], r["value"], r["annotator"]) for r in rows] == [
        (items[0].id, "2", "bob"),
        (items[1].id, "3", "seed"),
    ]
    assert rows[0]["sha256"] == items[0].sha256 and rows[0]["split"] == "pool"
    csv_response = client.get(f"/pools/{pool_id}/labels?format=csv", headers=admin)
    assert csv_response.headers["content-type"].startswith("text/csv")
    assert "attachment" in csv_response.headers["content-disposition"]
    table = list(csv.DictReader(io.StringIO(csv_response.text)))
    assert [(int(r["item_id"]), r["value"]) for r in table] == [
        (items[0].id, "2"),
        (items[1].id, "3"),
    ]
    history = client.get(f"/pools/{pool_id}/labels?history=true", headers=admin).text.splitlines()
    assert len(history) == 3


def test_export_of_an_unknown_pool_or_format(client: TestClient, admin: dict, digits) -> None:
    _, items = digits
    assert client.get("/pools/999999/labels", headers=admin).status_code == 404
    response = client.get(f"/pools/{items[0].pool_id}/labels?format=xml", headers=admin)
    assert response.status_code == 422


@pytest.mark.parametrize("name", ["données ü", "数据", "a\nb", 'say "hi"'])
def test_the_export_file_name_survives_any_pool_name(
    client: TestClient, session: Session, admin: dict, name: str
) -> None:
    # Directly in the database: the API refuses control characters in new names.
    pool = make_pool(session, name=name)
    response = client.get(f"/pools/{pool.id}/labels?format=csv", headers=admin)
    assert response.status_code == 200
    disposition = response.headers["content-disposition"]
    assert disposition.isascii() and "\n" not in disposition
    encoded = disposition.split("filename*=UTF-8''")[1]
    assert unquote(encoded) == f"{name}-labels.csv"
    fallback = disposition.split('filename="')[1].split('"')[0]
    assert fallback.endswith("-labels.csv")


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/pools", {"name": "a\nb", "task": "regression", "input_kind": "vector"}),
        (
            "/pools",
            {
                "name": "p",
                "task": "classification",
                "classes": ["a", "b\tc"],
                "input_kind": "image",
            },
        ),
        ("/keys", {"name": "bo\rb", "role": "annotator"}),
    ],
    ids=["pool name", "class name", "key name"],
)
def test_names_with_control_characters_are_422(
    client: TestClient, session: Session, admin: dict, path: str, body: dict
) -> None:
    before = row_counts(session)
    response = client.post(path, json=body, headers=admin)
    assert response.status_code == 422 and "control characters" in response.text
    assert row_counts(session) == before
