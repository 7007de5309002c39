"""Labels of many requests written together (service.labels.store_labels, and the group
commit behind POST /labels): each request is answered, or refused, as if it came alone."""

import anyio
import httpx
import pytest
from sqlalchemy import Engine, func
from sqlmodel import Session, col, select

from service.api.deps import get_blobs
from service.app import create_app
from service.auth import Caller, create_key
from service.blobs import FileBlobStore
from service.db import migrate
from service.errors import InvalidLabel, ItemNotFound
from service.labels import LabelRequest, store_labels
from service.models import Item, Label, Role
from service.schemas import LabelCreate, LabelsCreated
from service.settings import settings
from tests.service.factories import make_items, make_pool, make_round, serving

ALICE = Caller(1, "alice", Role.annotator, None)
BOB = Caller(2, "bob", Role.annotator, None)


def label(item: Item, value: str) -> LabelCreate:
    return LabelCreate(item_id=item.id, value=value)  # type: ignore[arg-type]


def test_one_refused_request_leaves_the_others_of_its_batch_alone(
    session: Session, blobs: FileBlobStore
) -> None:
    pool = make_pool(session)
    items = make_items(session, blobs, pool, 3)
    first_round = make_round(session, pool, queried=items[:2])
    make_round(session, pool, queried=items[2:])  # only the refused request labels its item
    before = session.exec(select(func.count()).select_from(Label)).one()

    stored = store_labels(
        session.connection(),
        [
            LabelRequest(ALICE, [label(items[0], "1"), label(items[1], "2")]),
            LabelRequest(BOB, [label(items[2], "3"), label(items[0], "cat")]),
            LabelRequest(BOB, [label(items[1], "4")]),
        ],
    )
    answers = stored.answers
    assert stored.rounds == {first_round.id}  # the rounds whose pages the new labels change

    first, refused, third = answers
    assert isinstance(first, LabelsCreated) and isinstance(third, LabelsCreated)
    assert [(a.item_id, a.value, a.annotator) for a in first.data + third.data] == [
        (items[0].id, "1", "alice"),
        (items[1].id, "2", "alice"),
        (items[1].id, "4", "bob"),
    ]
    assert isinstance(refused, InvalidLabel) and "'cat' is not a class" in refused.detail
    stored = session.exec(
        select(Label.item_id, Label.value_class, Label.annotator).order_by(col(Label.id))
    ).all()[before:]
    # Bob's label of item 2 went down with his refused request; his other request stands.
    assert stored == [(a.item_id, a.value, a.annotator) for a in first.data + third.data]
    assert {a.id for a in first.data + third.data} == set(
        session.exec(select(Label.id).order_by(col(Label.id))).all()[before:]
    )


def test_requests_of_one_batch_see_each_others_labels_in_arrival_order(
    session: Session, blobs: FileBlobStore
) -> None:
    pool = make_pool(session)
    [item] = make_items(session, blobs, pool, 1)
    make_round(session, pool, queried=[item])

    first, repeat, change = store_labels(
        session.connection(),
        [
            LabelRequest(ALICE, [label(item, "1")]),
            LabelRequest(ALICE, [label(item, "1")]),
            LabelRequest(ALICE, [label(item, "2")]),
        ],
    ).answers

    assert isinstance(first, LabelsCreated) and isinstance(repeat, LabelsCreated)
    assert isinstance(change, LabelsCreated)
    assert (first.created, repeat.created, change.created) == (1, 0, 1)
    assert repeat.data == first.data  # the repeat is the same label, id and time included
    assert change.data[0].id > first.data[0].id
    values = session.exec(select(Label.value_class).where(Label.item_id == item.id)).all()
    assert values == ["1", "2"]


def test_a_restricted_key_finds_no_item_of_another_pool_while_others_do(
    session: Session, blobs: FileBlobStore
) -> None:
    mine, theirs = make_pool(session), make_pool(session)
    [my_item] = make_items(session, blobs, mine, 1)
    [their_item] = make_items(session, blobs, theirs, 1, start=1)
    make_round(session, mine, queried=[my_item])
    make_round(session, theirs, queried=[their_item])
    restricted = Caller(3, "rita", Role.annotator, frozenset({mine.id}))  # type: ignore[arg-type]

    refused, accepted = store_labels(
        session.connection(),
        [
            LabelRequest(restricted, [label(my_item, "1"), label(their_item, "1")]),
            LabelRequest(ALICE, [label(their_item, "1")]),
        ],
    ).answers

    assert isinstance(refused, ItemNotFound) and refused.detail == f"no items [{their_item.id}]"
    assert isinstance(accepted, LabelsCreated) and accepted.created == 1


@pytest.fixture
def served_database(empty_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> Engine:
    """A database of the test's own, as the database of the app the test serves."""
    url = empty_engine.url.render_as_string(hide_password=False)
    monkeypatch.setattr(settings, "database_url", url)
    migrate(empty_engine)
    return empty_engine


@pytest.mark.anyio
async def test_concurrent_posts_through_the_group_commit_are_each_answered_and_stored(
    served_database: Engine, blobs: FileBlobStore
) -> None:
    with Session(served_database) as session:
        pool = make_pool(session)
        items = make_items(session, blobs, pool, 24)
        round_id = make_round(session, pool, queried=items).id
        _, key = create_key(session, name="alice", role=Role.annotator)
        session.commit()
        item_ids = [item.id for item in items]
    app = create_app()  # sessions and the label writer as in production
    app.dependency_overrides[get_blobs] = lambda: blobs
    # Every fourth request names a class the pool does not have.
    bodies = [
        {"item_id": item_id, "value": "cat" if n % 4 == 3 else str(n % 10), "round_id": round_id}
        for n, item_id in enumerate(item_ids)
    ]
    answers: dict[int, httpx.Response] = {}
    async with serving(app, key) as client:

        async def post(n: int) -> None:
            answers[n] = await client.post("/labels", json=bodies[n])

        with anyio.fail_after(60):
            async with anyio.create_task_group() as requests:
                for n in range(len(bodies)):
                    requests.start_soon(post, n)

    accepted = {n for n in answers if n % 4 != 3}
    for n, response in answers.items():
        if n in accepted:
            assert response.status_code == 200, response.text
            [stored] = response.json()["data"]
            assert (stored["item_id"], stored["value"]) == (
                bodies[n]["item_id"],
                bodies[n]["value"],
            )
        else:
            assert response.status_code == 400 and response.json()["error"] == "InvalidLabel"
    with Session(served_database) as session:
        rows = session.exec(select(Label.id, Label.item_id, Label.value_class)).all()
    assert sorted(rows) == sorted(
        (answers[n].json()["data"][0]["id"], bodies[n]["item_id"], bodies[n]["value"])
        for n in accepted
    )
