"""Claims, heartbeats and recovery through the database, on SQLite and PostgreSQL."""

import threading
from datetime import timedelta

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, text, update
from sqlalchemy.exc import DataError
from sqlmodel import Session, col, select

from service.app import create_app
from service.auth import create_key
from service.db import get_engine
from service.jobs import BrokerUnreachable
from service.models import Role, Round, RoundStatus, utcnow
from service.settings import settings
from tests.processes import wait_for
from tests.worker.factories import add_round, get_round, import_pool
from worker import celery_app
from worker.leases import Heartbeat, Stopped, claim, due_rounds, release, resend_due


@pytest.fixture
def round_id(database: Engine) -> int:
    pool, _ = import_pool("digits", 60)
    return add_round(pool, budget=5)


def expire_lease(round_id: int) -> None:
    """What the clock does to a worker that stopped beating: its lease runs out."""
    with Session(get_engine()) as session:
        session.execute(
            update(Round)
            .where(col(Round.id) == round_id)
            .values(lease_until=utcnow() - timedelta(seconds=1))
        )
        session.commit()


def test_a_claim_is_exclusive(round_id: int) -> None:
    assert claim(round_id, "worker-a")
    assert not claim(round_id, "worker-b")
    round_ = get_round(round_id)
    assert round_.status == RoundStatus.running and round_.claimed_by == "worker-a"
    assert round_.attempts == 1 and round_.lease_until is not None
    assert round_.lease_until > utcnow() + timedelta(seconds=settings.round_lease_seconds - 5)


def test_of_workers_claiming_at_once_exactly_one_wins(round_id: int) -> None:
    start = threading.Barrier(6)
    won: list[str] = []

    def contend(name: str) -> None:
        start.wait()
        if claim(round_id, name):
            won.append(name)

    threads = [threading.Thread(target=contend, args=(f"worker-{n}",)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(won) == 1
    assert get_round(round_id).claimed_by == won[0] and get_round(round_id).attempts == 1


def test_an_expired_lease_is_claimed_again_and_the_old_worker_is_stopped(round_id: int) -> None:
    assert claim(round_id, "worker-a")
    Heartbeat(round_id, "worker-a").beat("train", 0.3, force=True)
    expire_lease(round_id)
    assert claim(round_id, "worker-b")
    with pytest.raises(Stopped):
        Heartbeat(round_id, "worker-a").beat("train", 0.5, force=True)
    # The old worker's failure report must not touch the round either.
    assert release(round_id, "worker-a", "RuntimeError: late") is None
    Heartbeat(round_id, "worker-b").beat("train", 0.2, force=True)
    round_ = get_round(round_id)
    assert (round_.claimed_by, round_.attempts, round_.status) == ("worker-b", 2, "running")
    assert (round_.phase, round_.progress, round_.error) == ("train", 0.2, None)


def test_a_heartbeat_reports_phase_progress_and_time_left(round_id: int) -> None:
    assert claim(round_id, "worker-a")
    heartbeat = Heartbeat(round_id, "worker-a")
    heartbeat.started -= 30  # as if the round had been running for 30 s
    heartbeat.beat("train", 0.25, force=True)
    round_ = get_round(round_id)
    assert (round_.phase, round_.progress) == ("train", 0.25)
    assert round_.eta_seconds == pytest.approx(90, abs=2)


def test_cancel_through_the_api_stops_the_heartbeat(round_id: int) -> None:
    assert claim(round_id, "worker-a")
    with Session(get_engine()) as session:
        _, key = create_key(session, name="root", role=Role.admin)
        session.commit()
    client = TestClient(create_app(startup=False))
    response = client.post(f"/rounds/{round_id}/cancel", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    with pytest.raises(Stopped):
        Heartbeat(round_id, "worker-a").beat("train", 0.5, force=True)
    assert not claim(round_id, "worker-b")
    assert get_round(round_id).status == RoundStatus.cancelled


def test_a_failed_attempt_queues_the_round_again_until_the_cap(round_id: int) -> None:
    for attempt in range(1, settings.round_max_attempts + 1):
        assert claim(round_id, f"worker-{attempt}")
        status = release(round_id, f"worker-{attempt}", f"ValueError: attempt {attempt}")
        final = attempt == settings.round_max_attempts
        assert status == (RoundStatus.failed if final else RoundStatus.queued)
    round_ = get_round(round_id)
    assert round_.error == f"ValueError: attempt {settings.round_max_attempts}"
    assert round_.finished_at is not None and round_.claimed_by is None
    assert not claim(round_id, "worker-late")


def test_a_round_abandoned_too_often_is_given_up(round_id: int) -> None:
    for attempt in range(1, settings.round_max_attempts + 1):
        assert due_rounds() == [round_id]  # queued, then abandoned
        assert claim(round_id, f"worker-{attempt}")
        assert round_id not in due_rounds()  # its worker is beating
        expire_lease(round_id)
    assert round_id not in due_rounds()
    round_ = get_round(round_id)
    assert round_.status == RoundStatus.failed and round_.finished_at is not None
    assert f"gave up after {settings.round_max_attempts} attempts" in (round_.error or "")


def test_a_due_round_is_resent_by_one_sweeper_at_a_time(round_id: int) -> None:
    assert resend_due(older_than_seconds=60) == []  # the API sent it a moment ago
    assert resend_due(older_than_seconds=0) == [round_id]  # it was not picked up since
    assert resend_due(older_than_seconds=60) == []  # another sweeper just sent it
    assert resend_due(older_than_seconds=0) == [round_id]
    assert claim(round_id, "worker-a")
    assert resend_due(older_than_seconds=0) == []  # running under a live lease
    expire_lease(round_id)
    assert resend_due(older_than_seconds=0) == [round_id]


def test_a_sweep_sends_the_other_due_rounds_when_one_send_fails(
    database: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    rounds = [add_round(import_pool("digits", 10)[0], budget=2) for _ in range(3)]
    sent: list[int] = []

    def enqueue(round_id: int) -> None:
        if round_id == rounds[0]:
            raise BrokerUnreachable("Connection refused")
        sent.append(round_id)

    monkeypatch.setattr(celery_app, "enqueue_round", enqueue)
    monkeypatch.setattr(settings, "round_lease_seconds", 0)  # every due round is resent
    assert celery_app.sweep() == sent == rounds[1:]


def test_a_keep_alive_holds_the_lease_through_a_long_step(
    round_id: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(settings, "round_lease_seconds", 1)
    assert claim(round_id, "worker-a")
    with Heartbeat(round_id, "worker-a") as heartbeat:
        heartbeat.beat("select", 0.8, force=True)
        # A step longer than the lease (k-means on a large pool) that never calls beat().
        threading.Event().wait(2.5)
        assert not claim(round_id, "worker-b")
        assert get_round(round_id).phase == "select"
    assert get_round(round_id).claimed_by == "worker-a"


def test_a_keep_alive_notices_a_cancel(round_id: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(settings, "round_lease_seconds", 1)
    assert claim(round_id, "worker-a")
    with Heartbeat(round_id, "worker-a") as heartbeat:
        with Session(get_engine()) as session:
            session.execute(
                update(Round).where(col(Round.id) == round_id).values(status="cancelled")
            )
            session.commit()
        threading.Event().wait(1.0)
        with pytest.raises(Stopped):
            heartbeat.beat("train", 0.5)  # not due for a write: the keep-alive saw it


def test_a_new_phase_is_written_at_once(round_id: int) -> None:
    assert claim(round_id, "worker-a")
    heartbeat = Heartbeat(round_id, "worker-a", every=3600)
    heartbeat.beat("load", 0.0)
    heartbeat.beat("load", 0.05)  # same phase within `every`: not written
    heartbeat.beat("train", 0.1)
    round_ = get_round(round_id)
    assert round_.phase == "train" and round_.progress == pytest.approx(0.1)


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_a_heartbeat_outlives_its_connection_being_dropped(round_id: int, database: Engine) -> None:
    """A connection terminated mid-write (a restart, a failover) does not stop the round."""
    assert claim(round_id, "worker-a")
    heartbeat = Heartbeat(round_id, "worker-a")
    errors: list[BaseException] = []

    def beat() -> None:
        try:
            heartbeat.beat("train", 0.3, force=True)
        except BaseException as error:
            errors.append(error)

    with database.connect() as locker:
        # Hold the round's row, so that the heartbeat's UPDATE is in flight when it is dropped.
        locker.execute(select(Round.id).where(col(Round.id) == round_id).with_for_update())
        holder = locker.execute(text("SELECT pg_backend_pid()")).scalar_one()
        beating = threading.Thread(target=beat)
        beating.start()
        waiting = wait_for(
            lambda: locker.execute(
                # pg_locks, not pg_stat_activity: that one is a snapshot within a transaction.
                text("SELECT pid FROM pg_locks WHERE :holder = ANY(pg_blocking_pids(pid))"),
                {"holder": holder},
            ).scalar(),
            10,
            "the heartbeat to wait for the row",
            every=0.05,
        )
        assert locker.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": waiting}).scalar()
        locker.rollback()
        beating.join(timeout=30)
    assert not beating.is_alive() and errors == []
    heartbeat.beat("train", 0.4, force=True)  # on a new connection
    round_ = get_round(round_id)
    assert (round_.status, round_.phase, round_.claimed_by) == ("running", "train", "worker-a")
    assert round_.progress == pytest.approx(0.4)


@pytest.mark.parametrize("database", ["postgresql"], indirect=True)
def test_a_heartbeat_raises_a_database_error_that_is_not_a_lost_connection(
    round_id: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in the write (here a phase longer than its column) stops the work, whether the
    work's own beat or the keep-alive thread meets it."""
    monkeypatch.setattr(settings, "round_lease_seconds", 1)
    assert claim(round_id, "worker-a")
    with Heartbeat(round_id, "worker-a") as heartbeat:
        with pytest.raises(DataError):
            heartbeat.beat("p" * 41, 0.3)  # a new phase: written at once
        # The keep-alive (every 1/6 s) writes the same phase, fails, and hands its error over.
        threading.Event().wait(1.0)
        with pytest.raises(DataError):
            heartbeat.beat("train", 0.4)  # a valid write, refused because of the keep-alive's
    assert get_round(round_id).phase == "starting"
