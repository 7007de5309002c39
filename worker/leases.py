"""Who runs which round: claims, heartbeats and recovery, all through the database.

The database is the state of record, not the broker: a worker owns a round only while its
lease (renewed by heartbeats) is current, so a round whose worker died is claimed again once
the lease runs out, and a worker that lost its lease or saw the round cancelled stops.
No torch here: the embedded runner's parent process polls with this module alone.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import timedelta

from sqlalchemy import and_, or_, update
from sqlmodel import Session, col, select

from service.db import get_engine
from service.models import Round, RoundStatus, utcnow
from service.settings import settings


class Stopped(Exception):
    """The round was cancelled, or another worker holds it now: stop without writing."""


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _lease_expired():
    return and_(col(Round.status) == RoundStatus.running, col(Round.lease_until) < utcnow())


def claim(round_id: int, worker: str) -> bool:
    """Take the round if it is queued, or running under an expired lease, with attempts left."""
    now = utcnow()
    with Session(get_engine()) as session:
        claimed = session.execute(
            update(Round)
            .where(
                col(Round.id) == round_id,
                col(Round.attempts) < settings.round_max_attempts,
                or_(col(Round.status) == RoundStatus.queued, _lease_expired()),
            )
            .values(
                status=RoundStatus.running,
                claimed_by=worker,
                attempts=col(Round.attempts) + 1,
                lease_until=now + timedelta(seconds=settings.round_lease_seconds),
                heartbeat_at=now,
                started_at=now,
                phase="starting",
                progress=0.0,
                error=None,
            )
        )
        session.commit()
        return claimed.rowcount == 1


class Heartbeat:
    """Reports phase and progress, renews the lease, and stops the work when it is lost."""

    def __init__(self, round_id: int, worker: str, every: float | None = None):
        self.round_id, self.worker = round_id, worker
        self.every = settings.round_lease_seconds / 6 if every is None else every
        self.started = time.monotonic()
        self.last = -float("inf")

    def beat(self, phase: str, progress: float, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.every:
            return
        self.last = now
        elapsed = now - self.started
        eta = elapsed * (1 - progress) / progress if progress > 0.02 else None
        with Session(get_engine()) as session:
            alive = session.execute(
                update(Round)
                .where(
                    col(Round.id) == self.round_id,
                    col(Round.status) == RoundStatus.running,
                    col(Round.claimed_by) == self.worker,
                )
                .values(
                    phase=phase,
                    progress=round(progress, 4),
                    eta_seconds=None if eta is None else round(eta, 1),
                    heartbeat_at=utcnow(),
                    lease_until=utcnow() + timedelta(seconds=settings.round_lease_seconds),
                )
            )
            session.commit()
        if alive.rowcount != 1:
            raise Stopped(f"round {self.round_id} was cancelled or taken over")


def release(round_id: int, worker: str, error: str) -> RoundStatus | None:
    """After a failed attempt: queue the round again, or fail it when attempts are used up."""
    with Session(get_engine()) as session:
        round_ = session.exec(
            select(Round).where(Round.id == round_id, Round.claimed_by == worker).with_for_update()
        ).first()
        if round_ is None or round_.status != RoundStatus.running:
            return None
        final = round_.attempts >= settings.round_max_attempts
        round_.status = RoundStatus.failed if final else RoundStatus.queued
        round_.error = error
        round_.claimed_by = round_.lease_until = None
        if final:
            round_.finished_at = utcnow()
        session.add(round_)
        session.commit()
        return round_.status


def due_rounds(limit: int = 100) -> list[int]:
    """Rounds a worker should run now: queued, or abandoned by a worker that stopped beating.

    Abandoned rounds without attempts left are failed here, with the reason.
    """
    with Session(get_engine()) as session:
        session.execute(
            update(Round)
            .where(_lease_expired(), col(Round.attempts) >= settings.round_max_attempts)
            .values(
                status=RoundStatus.failed,
                finished_at=utcnow(),
                error=f"gave up after {settings.round_max_attempts} attempts: "
                "the worker running it stopped responding",
            )
        )
        session.commit()
        ids = session.exec(
            select(Round.id)
            .where(or_(col(Round.status) == RoundStatus.queued, _lease_expired()))
            .order_by(col(Round.id))
            .limit(limit)
        ).all()
        return [i for i in ids if i is not None]


def resend_due(older_than_seconds: float) -> list[int]:
    """Due rounds not touched for `older_than_seconds`, touched now so one sweeper sends each.

    For a queued round `heartbeat_at` records the last time a worker sent or touched it.
    """
    cutoff = utcnow() - timedelta(seconds=older_than_seconds)
    taken = []
    with Session(get_engine()) as session:
        for round_id in due_rounds():
            touched = session.execute(
                update(Round)
                .where(
                    col(Round.id) == round_id,
                    or_(col(Round.heartbeat_at).is_(None), col(Round.heartbeat_at) < cutoff),
                )
                .values(heartbeat_at=utcnow())
            )
            if touched.rowcount == 1:
                taken.append(round_id)
        session.commit()
    return taken
