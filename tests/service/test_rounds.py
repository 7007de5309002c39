"""Starting, reading, listing and cancelling rounds; what a refused round leaves behind."""

import json
from types import SimpleNamespace

import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from kombu.exceptions import EncodeError
from sqlalchemy import event, insert
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from service import jobs
from service.blobs import FileBlobStore
from service.models import InputKind, Round, RoundStatus, Task
from service.settings import settings
from service.strategies import PARAMS
from tests.service.factories import make_items, make_label, make_pool, make_round, row_counts


@pytest.fixture
def pool_with_labels(session: Session, blobs: FileBlobStore):  # type: ignore[no-untyped-def]
    """A pool of 40 items, 25 of them labeled (more than min_labeled)."""
    pool = make_pool(session, default_budget=5)
    items = make_items(session, blobs, pool, 40)
    for item in items[:25]:
        make_label(session, item, "1")
    return pool


def test_create_round_queues_it_and_points_to_it(
    client: TestClient, session: Session, admin: dict, pool_with_labels
) -> None:
    response = client.post(
        "/rounds",
        json={
            "pool_id": pool_with_labels.id,
            "strategy": "ally",
            "budget": 10,
            "seed": 3,
            "params": {"epsilon": 0.2, "k": 4},
        },
        headers=admin,
    )
    assert response.status_code == 202, response.text
    body = response.json()
    assert response.headers["location"] == f"/rounds/{body['id']}"
    assert body["status"] == "queued" and body["number"] == 1 and body["percent"] == 0
    assert (body["strategy"], body["budget"], body["seed"]) == ("ally", 10, 3)
    # Every setting is stored, the defaults included: the round runs them whatever the release.
    assert body["params"] == {"epsilon": 0.2, "k": 4, "dual_cap_quantile": 0.95, "confidence": True}
    assert body["seeding"] is None and body["labeled_at_start"] == 25
    stored = session.get(Round, body["id"])
    assert (
        stored is not None and stored.status == RoundStatus.queued and stored.created_by == "root"
    )
    assert client.get(response.headers["location"], headers=admin).json()["id"] == body["id"]


@pytest.mark.parametrize("epsilon", [0.5, "auto"])
def test_round_defaults_come_from_the_pool(
    client: TestClient, session: Session, blobs: FileBlobStore, admin: dict, epsilon: object
) -> None:
    pool = make_pool(session, default_strategy="ally", default_budget=3, default_epsilon=epsilon)
    make_items(session, blobs, pool, 5)
    body = client.post("/rounds", json={"pool_id": pool.id}, headers=admin).json()
    assert (body["strategy"], body["budget"], body["params"]["epsilon"]) == ("ally", 3, epsilon)


def test_the_pools_epsilon_goes_to_ally_rounds_only(
    client: TestClient, session: Session, blobs: FileBlobStore, admin: dict
) -> None:
    pool = make_pool(session, default_strategy="coreset", default_budget=3, default_epsilon=0.5)
    make_items(session, blobs, pool, 5)
    body = client.post("/rounds", json={"pool_id": pool.id}, headers=admin).json()
    assert (body["strategy"], body["params"]) == ("coreset", {"candidates": 4096})


@pytest.mark.parametrize(
    ("strategy", "params"),
    [
        ("ally", {"epsilon": "auto", "k": 3, "dual_cap_quantile": 1.0}),
        # The paper's own setting, switching the service's defaults off.
        ("ally", {"epsilon": None, "confidence": False, "dual_cap_quantile": None}),
        ("badge", {"max_pending": 8}),
        ("coreset", {"candidates": 100}),
        ("random", {}),
    ],
)
def test_each_strategy_takes_its_own_params(
    client: TestClient, admin: dict, pool_with_labels, strategy: str, params: dict
) -> None:
    response = client.post(
        "/rounds",
        json={"pool_id": pool_with_labels.id, "strategy": strategy, "params": params},
        headers=admin,
    )
    assert response.status_code == 202, response.text
    stored = response.json()["params"]
    assert {key: stored[key] for key in params} == params
    assert set(stored) == set(PARAMS[strategy].model_fields)  # the defaults too


@pytest.mark.parametrize(
    ("strategy", "params", "accepted"),
    [
        ("random", {"epsilon": 0.3}, "accepts: none"),
        ("entropy", {"k": 2}, "accepts: none"),
        ("coreset", {"max_pending": 2}, "accepts: candidates"),
        ("badge", {"max_pending": 0}, "accepts: max_pending, max_rejections"),
        ("ally", {"dual_cap_quantile": 1.5}, "accepts: k, dual_cap_quantile, epsilon"),
        ("ally", {"epsilon": "often"}, "accepts: k, dual_cap_quantile, epsilon"),
    ],
)
def test_params_a_strategy_does_not_take_are_422_listing_what_it_does(
    client: TestClient,
    session: Session,
    admin: dict,
    pool_with_labels,
    strategy: str,
    params: dict,
    accepted: str,
) -> None:
    before = row_counts(session)
    response = client.post(
        "/rounds",
        json={"pool_id": pool_with_labels.id, "strategy": strategy, "params": params},
        headers=admin,
    )
    assert response.status_code == 422 and response.json()["error"] == "InvalidParams"
    assert accepted in response.json()["detail"] and strategy in response.json()["detail"]
    assert row_counts(session) == before


def test_too_few_labels_start_a_cold_round(
    client: TestClient, session: Session, blobs: FileBlobStore, admin: dict
) -> None:
    pool = make_pool(session)
    make_items(session, blobs, pool, 10)
    body = client.post("/rounds", json={"pool_id": pool.id, "budget": 4}, headers=admin).json()
    assert body["seeding"] == "kmeans-coverage" and body["labeled_at_start"] == 0


def test_too_few_labels_without_cold_start_is_409_naming_the_counts(
    client: TestClient, session: Session, blobs: FileBlobStore, admin: dict
) -> None:
    pool = make_pool(session)
    items = make_items(session, blobs, pool, 10)
    for item in items[:3]:
        make_label(session, item, "2")
    before = row_counts(session)
    response = client.post(
        "/rounds", json={"pool_id": pool.id, "budget": 2, "cold_start": False}, headers=admin
    )
    assert response.status_code == 409 and response.json()["error"] == "NotEnoughLabels"
    detail = response.json()["detail"]
    assert f"at least {settings.min_labeled}" in detail and "has 3" in detail
    assert row_counts(session) == before


def test_a_budget_larger_than_the_unlabeled_pool_is_409(
    client: TestClient, session: Session, admin: dict, pool_with_labels
) -> None:
    before = row_counts(session)
    response = client.post(
        "/rounds", json={"pool_id": pool_with_labels.id, "budget": 16}, headers=admin
    )
    assert response.status_code == 409 and response.json()["error"] == "BudgetTooLarge"
    assert "15 unlabeled" in response.json()["detail"]
    assert row_counts(session) == before


@pytest.mark.parametrize("strategy", ["entropy", "margin", "badge"])
def test_classification_only_strategies_refuse_regression_pools(
    client: TestClient, session: Session, blobs: FileBlobStore, admin: dict, strategy: str
) -> None:
    pool = make_pool(session, task=Task.regression, input_kind=InputKind.vector)
    make_items(session, blobs, pool, 5)
    before = row_counts(session)
    response = client.post(
        "/rounds", json={"pool_id": pool.id, "strategy": strategy, "budget": 1}, headers=admin
    )
    assert response.status_code == 400 and response.json()["error"] == "StrategyNotApplicable"
    assert "classification" in response.json()["detail"]
    assert row_counts(session) == before


@pytest.mark.parametrize("strategy", ["ally", "random", "coreset"])
def test_other_strategies_serve_regression_pools(
    client: TestClient, session: Session, blobs: FileBlobStore, admin: dict, strategy: str
) -> None:
    pool = make_pool(session, task=Task.regression, input_kind=InputKind.vector)
    make_items(session, blobs, pool, 5)
    response = client.post(
        "/rounds", json={"pool_id": pool.id, "strategy": strategy, "budget": 1}, headers=admin
    )
    assert response.status_code == 202


@pytest.mark.parametrize(
    "body",
    [
        {"strategy": "magic"},
        {"budget": 0},
        {"params": {"epsilon": -1}},
        {"params": {"k": 0}},
        {"cold_start": "perhaps"},
        {"params": {"temperature": float("inf")}},
        {"budget": 2**31},
        {"seed": 2**31},
        {"seed": -1},
    ],
    ids=[
        "unknown strategy",
        "zero budget",
        "negative epsilon",
        "zero k",
        "bad flag",
        "inf param",
        "budget past 32 bits",
        "seed past 32 bits",
        "negative seed",
    ],
)
def test_malformed_round_requests_are_422(
    client: TestClient, session: Session, admin: dict, pool_with_labels, body: dict
) -> None:
    before = row_counts(session)
    response = client.post(
        "/rounds",
        content=json.dumps({"pool_id": pool_with_labels.id, **body}),
        headers={**admin, "content-type": "application/json"},
    )
    assert response.status_code == 422
    if "strategy" in body:
        assert "coreset" in json.dumps(response.json()["detail"])
    assert row_counts(session) == before


def test_one_active_round_per_pool(
    client: TestClient, session: Session, admin: dict, pool_with_labels
) -> None:
    first = client.post("/rounds", json={"pool_id": pool_with_labels.id}, headers=admin)
    assert first.status_code == 202
    before = row_counts(session)
    second = client.post("/rounds", json={"pool_id": pool_with_labels.id}, headers=admin)
    assert second.status_code == 409 and second.json()["error"] == "RoundInProgress"
    assert row_counts(session) == before
    client.post(f"/rounds/{first.json()['id']}/cancel", headers=admin)
    third = client.post("/rounds", json={"pool_id": pool_with_labels.id}, headers=admin)
    assert third.status_code == 202 and third.json()["number"] == 2


def test_the_database_holds_one_active_round_per_pool(
    session: Session, blobs: FileBlobStore
) -> None:
    pool = make_pool(session)
    make_round(session, pool, status=RoundStatus.ready)
    make_round(session, pool, status=RoundStatus.queued)
    with session.begin_nested(), pytest.raises(IntegrityError):
        make_round(session, pool, status=RoundStatus.running)
    make_round(session, pool, status=RoundStatus.failed)  # finished rounds are not limited


def test_a_round_racing_another_is_409_and_stores_nothing(
    client: TestClient, session: Session, admin: dict, pool_with_labels
) -> None:
    """Another request inserts its round between our check and our insert."""

    @event.listens_for(session, "before_flush", once=True)
    def _other_request(session: Session, *_: object) -> None:
        session.connection().execute(
            insert(Round).values(pool_id=pool_with_labels.id, number=99, strategy="ally", budget=1)
        )

    before = row_counts(session)
    response = client.post("/rounds", json={"pool_id": pool_with_labels.id}, headers=admin)
    assert response.status_code == 409 and response.json()["error"] == "RoundInProgress"
    assert row_counts(session) == before


def test_read_and_list_rounds(
    client: TestClient, session: Session, admin: dict, pool_with_labels
) -> None:
    done = make_round(session, pool_with_labels, metrics={"accuracy": 0.9, "labeled": 25})
    done.progress, done.phase, done.timings = 1.0, "done", {"train": 3.5}
    session.add(done)
    make_round(session, pool_with_labels, status=RoundStatus.failed)
    body = client.get(f"/rounds/{done.id}", headers=admin).json()
    assert body["percent"] == 100 and body["metrics"]["accuracy"] == 0.9
    assert body["timings"] == {"train": 3.5} and body["phase"] == "done"
    listed = client.get(f"/pools/{pool_with_labels.id}/rounds", headers=admin).json()
    assert listed["count"] == 2 and [r["number"] for r in listed["data"]] == [1, 2]
    assert client.get("/rounds/999999", headers=admin).json()["error"] == "RoundNotFound"
    assert client.get("/pools/999999/rounds", headers=admin).status_code == 404


@pytest.mark.parametrize("status", [RoundStatus.queued, RoundStatus.running])
def test_cancel_an_active_round(
    client: TestClient, session: Session, admin: dict, pool_with_labels, status: RoundStatus
) -> None:
    round_ = make_round(session, pool_with_labels, status=status)
    response = client.post(f"/rounds/{round_.id}/cancel", headers=admin)
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled" and response.json()["finished_at"]


@pytest.mark.parametrize("status", [RoundStatus.ready, RoundStatus.failed, RoundStatus.cancelled])
def test_a_finished_round_cannot_be_cancelled(
    client: TestClient, session: Session, admin: dict, pool_with_labels, status: RoundStatus
) -> None:
    round_ = make_round(session, pool_with_labels, status=status)
    response = client.post(f"/rounds/{round_.id}/cancel", headers=admin)
    assert response.status_code == 409 and response.json()["error"] == "RoundNotCancellable"
    session.refresh(round_)
    assert round_.status == status
    assert client.post("/rounds/999999/cancel", headers=admin).status_code == 404


def test_with_a_broker_the_round_is_sent_by_task_name_after_commit(
    client: TestClient,
    session: Session,
    admin: dict,
    pool_with_labels,
    redis_url: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker = redis.Redis.from_url(redis_url)
    broker.delete(jobs.QUEUE)
    monkeypatch.setattr(settings, "broker_url", redis_url)
    response = client.post("/rounds", json={"pool_id": pool_with_labels.id}, headers=admin)
    assert response.status_code == 202
    raw = broker.lpop(jobs.QUEUE)
    assert raw is not None
    message = json.loads(raw)
    assert message["headers"]["task"] == "ally.run_round"
    assert message["headers"]["argsrepr"] == f"[{response.json()['id']}]"
    broker.close()


def test_an_unreachable_broker_leaves_the_round_queued_for_the_workers_to_send(
    client: TestClient,
    session: Session,
    admin: dict,
    pool_with_labels,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(settings, "broker_url", "redis://127.0.0.1:1/0")
    response = client.post("/rounds", json={"pool_id": pool_with_labels.id}, headers=admin)
    assert response.status_code == 202, response.text
    assert response.headers["location"] == f"/rounds/{response.json()['id']}"
    [round_] = client.get(f"/pools/{pool_with_labels.id}/rounds", headers=admin).json()["data"]
    assert round_["status"] == "queued" and round_["error"] is None
    # Clients read there why a 202 does not mean the broker has the round yet.
    description = client.get("/openapi.json").json()["paths"]["/rounds"]["post"]["description"]
    assert "broker" in description and "`queued`" in description


def test_an_unreachable_broker_is_reported_by_enqueue(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings, "broker_url", "redis://127.0.0.1:1/0")
    with pytest.raises(jobs.BrokerUnreachable, match="Connection refused"):
        jobs.enqueue_round(1)


def test_a_send_failing_for_another_reason_than_the_broker_is_a_500(
    app: FastAPI, admin: dict, pool_with_labels, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only an unreachable broker leaves the round queued with a 202; a bug is not hidden."""

    def send_task(*args: object, **kwargs: object) -> None:
        raise EncodeError("the task's arguments cannot be serialized")

    monkeypatch.setattr(settings, "broker_url", "redis://127.0.0.1:1/0")
    monkeypatch.setattr(jobs, "_celery", lambda url: SimpleNamespace(send_task=send_task))
    client = TestClient(app, raise_server_exceptions=False)
    response = client.post("/rounds", json={"pool_id": pool_with_labels.id}, headers=admin)
    assert response.status_code == 500


def test_without_a_broker_enqueue_sends_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(jobs, "_celery", lambda url: pytest.fail("no broker, no Celery"))
    jobs.enqueue_round(1)
