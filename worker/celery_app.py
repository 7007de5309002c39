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

from service.jobs import QUEUE, RUN_ROUND, broker_options, enqueue_round
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
    task_soft_time_limit=settings.round_time_limit_seconds - 60,
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
    """Send again the due rounds that may have no message in the broker any more."""
    from worker.leases import resend_due

    due = resend_due(older_than_seconds=2 * settings.round_lease_seconds)
    for round_id in due:
        enqueue_round(round_id)
    return due


@signals.worker_ready.connect
def _start_sweeper(**_: object) -> None:
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(settings.round_lease_seconds):
            try:
                sweep()
            except Exception:
                log.exception("sweeping for due rounds failed")

    sweep()  # rounds a previous worker left behind
    threading.Thread(target=loop, name="ally-sweeper", daemon=True).start()
    signals.worker_shutdown.connect(lambda **_: stop.set(), weak=False)
