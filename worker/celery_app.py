"""Celery workers for scale-out: Redis as the broker, the database as the state of record.

Tasks carry a round id and nothing else; `pipeline.execute` does the work. Settings suit long
GPU jobs: a task is acknowledged only when done and redelivered if its worker dies (attempts
are capped in the database, not by the broker), each worker takes one task at a time, and
the hard time limit stays below the broker's visibility timeout so a running task is never
delivered twice for being slow. Every worker also sweeps the database for rounds that need
sending again: queued while the broker lost its message, or abandoned by a dead worker.
"""

from __future__ import annotations

import logging
import threading

from celery import Celery, signals

from service.jobs import QUEUE, RUN_ROUND, BrokerUnreachable, broker_options, enqueue_round
from service.settings import settings

log = logging.getLogger(__name__)

app = Celery("ally", broker=settings.broker_url)
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_default_queue=QUEUE,
    task_ignore_result=True,
    task_time_limit=settings.round_time_limit_seconds,
    task_soft_time_limit=int(settings.round_time_limit_seconds * 0.95),
    broker_transport_options=broker_options(),
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name=RUN_ROUND)
def run_round(round_id: int) -> str | None:
    from worker.pipeline import execute

    status = execute(round_id)
    return None if status is None else str(status)


def sweep() -> list[int]:
    """Send again the due rounds that may have no message in the broker any more; those sent."""
    from worker.leases import resend_due

    sent = []
    for round_id in resend_due(older_than_seconds=2 * settings.round_lease_seconds):
        try:
            enqueue_round(round_id)
        except BrokerUnreachable as error:
            # The round was touched all the same: a sweep two leases later sends it again.
            log.warning("round %s is due but the broker is unreachable: %s", round_id, error)
            continue
        sent.append(round_id)
    return sent


@signals.worker_process_init.connect
def _own_connections(**_: object) -> None:
    # A pool process forked after the sweeper used the database (a replacement for one that
    # was killed or timed out) inherits the parent's pooled connections; two processes on one
    # socket corrupt each other's traffic. Drop them without closing the parent's.
    from service.db import get_engine

    get_engine().dispose(close=False)


@signals.worker_ready.connect
def _start_sweeper(**_: object) -> None:
    stop = threading.Event()

    def loop() -> None:
        # The first sweep picks up rounds a previous worker left behind. It runs in the loop
        # so that a database still starting up delays the sweeper instead of ending it.
        while True:
            try:
                sweep()
            except Exception:
                log.exception("sweeping for due rounds failed")
            if stop.wait(settings.round_lease_seconds):
                return

    threading.Thread(target=loop, name="ally-sweeper", daemon=True).start()
    signals.worker_shutdown.connect(lambda **_: stop.set(), weak=False)
