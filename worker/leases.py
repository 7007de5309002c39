"""Who runs which round: claims, heartbeats and recovery, all through the database.

The database is the state of record, not the broker: a worker owns a round only while its
lease (renewed by heartbeats) is current, so a round whose worker died is claimed again once
the lease runs out, and a worker that lost its lease or saw the round cancelled stops.
No torch here: the embedded runner's parent process polls with this module alone.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from datetime import timedelta

from sqlalchemy import and_, case, false, func, or_, true, update
from sqlalchemy.exc import DBAPIError
from sqlmodel import Session, col, select

from service.db import get_engine, is_disconnect
from service.models import Round, RoundStatus, utcnow
from service.settings import settings

log = logging.getLogger(__name__)


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
    """Reports phase and progress, renews the lease, and stops the work when it is lost.

    Used as a context manager it also renews the lease from a thread, so steps that never
    call `beat` (loading, k-means on a large pool, the dual head) cannot outlast the lease and
    have the round taken over while the worker is still busy with it.
    """

    def __init__(self, round_id: int, worker: str, every: float | None = None):
        self.round_id, self.worker = round_id, worker
        self.every = settings.round_lease_seconds / 6 if every is None else every
        self.started = time.monotonic()
        self.last = -float("inf")
        self.phase, self.progress = "starting", 0.0
        # Raised by the next beat: Stopped, or a database error that is not a lost connection
        # met by the keep-alive thread.
        self._raise_at_next_beat: Exception | None = None
        self._writing = threading.Lock()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self, phase: str, progress: float, force: bool = False) -> None:
        """Record progress; written at once on a new phase, else at most every `every` s.

        A lost database connection does not stop the work: the lease outlasts a short outage
        and the next beat renews it, while `publish` checks that this worker still holds it.
        Any other database error is a bug and is raised.
        """
        new_phase = phase != self.phase
        self.phase, self.progress = phase, progress
        if self._raise_at_next_beat is not None:
            raise self._raise_at_next_beat
        if force or new_phase or time.monotonic() - self.last >= self.every:
            try:
                self._write()
            except DBAPIError as error:
                if not is_disconnect(error):
                    raise
                log.warning("round %s: heartbeat failed", self.round_id, exc_info=True)

    def _write(self) -> None:
        with self._writing:
            now = time.monotonic()
            self.last = now
            elapsed, progress = now - self.started, self.progress
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
                        phase=self.phase,
                        progress=round(progress, 4),
                        eta_seconds=None if eta is None else round(eta, 1),
                        heartbeat_at=utcnow(),
                        lease_until=utcnow() + timedelta(seconds=settings.round_lease_seconds),
                    )
                )
                session.commit()
            if alive.rowcount != 1:
                self._raise_at_next_beat = Stopped(
                    f"round {self.round_id} was cancelled or taken over"
                )
                raise self._raise_at_next_beat

    def _keep_alive(self) -> None:
        while not self._done.wait(self.every):
            if time.monotonic() - self.last < self.every:
                continue  # the work itself beat recently
            try:
                self._write()
            except Stopped:
                return  # the work raises it at its next beat
            except Exception as error:
                if isinstance(error, DBAPIError) and is_disconnect(error):
                    # The database may be briefly unreachable: the next renewal tries again.
                    log.warning("round %s: renewing the lease failed", self.round_id, exc_info=True)
                    continue
                # A bug: it must stop the work, not only this thread.
                self._raise_at_next_beat = error
                return

    def __enter__(self) -> Heartbeat:
        self._thread = threading.Thread(
            target=self._keep_alive, name=f"ally-lease-{self.round_id}", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()


def release(round_id: int, worker: str, error: str, final: bool = False) -> RoundStatus | None:
    """After a failed attempt: queue the round again, or fail it when attempts are used up
    (or at once when `final`). Only the lease holder can, so a takeover is never undone."""
    give_up = or_(col(Round.attempts) >= settings.round_max_attempts, true() if final else false())
    with Session(get_engine()) as session:
        released = session.execute(
            update(Round)
            .where(
                col(Round.id) == round_id,
                col(Round.claimed_by) == worker,
                col(Round.status) == RoundStatus.running,
            )
            .values(
                status=case((give_up, RoundStatus.failed.value), else_=RoundStatus.queued.value),
                finished_at=case((give_up, utcnow()), else_=None),
                error=error,
                claimed_by=None,
                lease_until=None,
            )
        )
        session.commit()
        if released.rowcount != 1:
            return None
        return RoundStatus(session.exec(select(Round.status).where(Round.id == round_id)).one())


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

    For a queued round `heartbeat_at` records the last time a worker sent or touched it, and
    until then `created_at` when the API sent it, so a new round is not sent twice.
    """
    cutoff = utcnow() - timedelta(seconds=older_than_seconds)
    taken = []
    with Session(get_engine()) as session:
        for round_id in due_rounds():
            touched = session.execute(
                update(Round)
                .where(
                    col(Round.id) == round_id,
                    func.coalesce(col(Round.heartbeat_at), col(Round.created_at)) < cutoff,
                )
                .values(heartbeat_at=utcnow())
            )
            if touched.rowcount == 1:
                taken.append(round_id)
        session.commit()
    return taken
