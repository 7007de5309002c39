"""GET /queries/{round}: rank order, pages, and leases that split work between annotators."""

from datetime import datetime, timedelta

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from service.blobs import FileBlobStore
from service.models import InputKind, Item, Query, RoundStatus, Task, utcnow
from service.schemas import QueriesPage
from service.settings import settings
from tests.service.factories import make_items, make_label, make_pool, make_round


@pytest.fixture
def queried(session: Session, blobs: FileBlobStore) -> tuple[int, list[Item]]:
    """A ready round that queried 6 items; returns (round id, items in rank order)."""
    pool = make_pool(session)
    items = make_items(session, blobs, pool, 8)
    chosen = [items[5], items[2], items[7], items[0], items[3], items[1]]
    round_ = make_round(session, pool, queried=chosen)
    return round_.id, chosen  # type: ignore[return-value]


def test_queries_come_in_rank_order_with_image_urls(
    client: TestClient, annotator: dict, queried: tuple[int, list[Item]]
) -> None:
    round_id, items = queried
    page = client.get(f"/queries/{round_id}", headers=annotator).json()
    assert page["count"] == 6 and page["task"] == "classification" and len(page["classes"]) == 10
    assert [q["item_id"] for q in page["data"]] == [i.id for i in items]
    assert [q["rank"] for q in page["data"]] == list(range(6))
    first = page["data"][0]
    assert first["image_url"].endswith(f"/items/{items[0].id}/image")
    assert first["score"] == 1.0 and first["cluster"] == 0 and first["labeled"] is False


def test_queries_are_paginated(
    client: TestClient, annotator: dict, queried: tuple[int, list[Item]]
) -> None:
    round_id, items = queried
    page = client.get(f"/queries/{round_id}?offset=2&limit=3", headers=annotator).json()
    assert [q["item_id"] for q in page["data"]] == [i.id for i in items[2:5]]
    assert (page["count"], page["offset"], page["limit"]) == (6, 2, 3)


def test_a_page_past_the_end_is_empty_and_still_counts_every_query(
    client: TestClient, annotator: dict, queried: tuple[int, list[Item]]
) -> None:
    round_id, _ = queried
    page = client.get(f"/queries/{round_id}?offset=6", headers=annotator).json()
    assert (page["data"], page["count"], page["offset"]) == ([], 6, 6)


@pytest.mark.parametrize("params", ["", "?offset=4&limit=5", "?annotator=alice&limit=3"])
def test_a_page_is_exactly_the_json_of_its_declared_model(
    client: TestClient, annotator: dict, queried: tuple[int, list[Item]], params: str
) -> None:
    """The route serializes its page itself, for speed: the bytes must be the model's."""
    round_id, _ = queried
    response = client.get(f"/queries/{round_id}{params}", headers=annotator)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    page = QueriesPage.model_validate_json(response.content)
    assert page.data and response.content == page.model_dump_json().encode()


def test_labeled_queries_are_flagged(
    client: TestClient, session: Session, annotator: dict, queried: tuple[int, list[Item]]
) -> None:
    round_id, items = queried
    make_label(session, items[1], "4", round_id=round_id)
    page = client.get(f"/queries/{round_id}", headers=annotator).json()
    assert [q["labeled"] for q in page["data"]] == [False, True, False, False, False, False]


def test_concurrent_annotators_get_disjoint_leases(
    client: TestClient, annotator: dict, queried: tuple[int, list[Item]]
) -> None:
    round_id, items = queried
    alice = client.get(f"/queries/{round_id}?annotator=alice&limit=2", headers=annotator).json()
    bob = client.get(f"/queries/{round_id}?annotator=bob&limit=3", headers=annotator).json()
    assert [q["item_id"] for q in alice["data"]] == [items[0].id, items[1].id]
    assert [q["item_id"] for q in bob["data"]] == [items[2].id, items[3].id, items[4].id]
    assert all(q["leased_to"] == "bob" and q["lease_until"] for q in bob["data"])
    # Asking again renews alice's own leases rather than handing her new items.
    again = client.get(f"/queries/{round_id}?annotator=alice&limit=2", headers=annotator).json()
    assert [q["item_id"] for q in again["data"]] == [items[0].id, items[1].id]
    # Only one item is left for carol.
    carol = client.get(f"/queries/{round_id}?annotator=carol&limit=5", headers=annotator).json()
    assert [q["item_id"] for q in carol["data"]] == [items[5].id]


def test_expired_leases_go_to_the_next_annotator(
    client: TestClient, session: Session, annotator: dict, queried: tuple[int, list[Item]]
) -> None:
    round_id, items = queried
    client.get(f"/queries/{round_id}?annotator=alice&limit=6", headers=annotator)
    lapsed = session.exec(select(Query).where(Query.item_id == items[0].id)).one()
    lapsed.lease_until = utcnow() - timedelta(seconds=1)
    session.add(lapsed)
    bob = client.get(f"/queries/{round_id}?annotator=bob", headers=annotator).json()
    assert [q["item_id"] for q in bob["data"]] == [items[0].id]


def test_leases_last_lease_seconds(
    client: TestClient, annotator: dict, queried: tuple[int, list[Item]]
) -> None:
    round_id, _ = queried
    before = utcnow()
    page = client.get(f"/queries/{round_id}?annotator=alice&limit=1", headers=annotator).json()
    until = datetime.fromisoformat(page["data"][0]["lease_until"].replace("Z", "+00:00"))
    assert (
        timedelta(0)
        < until - before - timedelta(seconds=settings.lease_seconds)
        < timedelta(seconds=5)
    )


def test_labeled_items_are_not_leased(
    client: TestClient, session: Session, annotator: dict, queried: tuple[int, list[Item]]
) -> None:
    round_id, items = queried
    make_label(session, items[0], "1", round_id=round_id)
    page = client.get(f"/queries/{round_id}?annotator=alice&limit=1", headers=annotator).json()
    assert [q["item_id"] for q in page["data"]] == [items[1].id]


def test_vector_queries_have_no_image_url(
    client: TestClient, session: Session, blobs: FileBlobStore, annotator: dict
) -> None:
    pool = make_pool(session, task=Task.regression, input_kind=InputKind.vector)
    items = make_items(session, blobs, pool, 2)
    round_ = make_round(session, pool, queried=items)
    page = client.get(f"/queries/{round_.id}", headers=annotator).json()
    assert page["classes"] is None and all(q["image_url"] is None for q in page["data"])


@pytest.mark.parametrize("status", [RoundStatus.queued, RoundStatus.running, RoundStatus.failed])
def test_queries_of_an_unfinished_round_are_409(
    client: TestClient, session: Session, annotator: dict, status: RoundStatus
) -> None:
    round_ = make_round(session, make_pool(session), status=status)
    response = client.get(f"/queries/{round_.id}", headers=annotator)
    assert response.status_code == 409 and response.json()["error"] == "RoundNotReady"
    assert status in response.json()["detail"]


@pytest.mark.parametrize(
    ("query", "status"),
    [
        ("?limit=0", 422),
        ("?limit=501", 422),
        ("?offset=-1", 422),
        ("?offset=2147483648", 422),
        ("?annotator=", 422),
    ],
)
def test_bad_query_requests(
    client: TestClient, annotator: dict, queried: tuple[int, list[Item]], query: str, status: int
) -> None:
    round_id, _ = queried
    response = client.get(f"/queries/{round_id}{query}", headers=annotator)
    assert response.status_code == status
