"""Handing rounds to workers: by task name, so the service never imports worker code."""

import functools
from typing import TYPE_CHECKING

from service.settings import settings

if TYPE_CHECKING:
    from celery import Celery

RUN_ROUND = "ally.run_round"
QUEUE = "gpu"


@functools.cache
def _celery(broker_url: str) -> "Celery":
    # Imported here: the embedded mode never needs Celery, and it is slow to import.
    from celery import Celery

    client = Celery("ally-service", broker=broker_url)
    # Fail fast when the broker is down rather than hang the request retrying.
    client.conf.broker_connection_retry = False
    client.conf.broker_connection_timeout = 2
    client.conf.broker_transport_options = broker_options() | {
        "socket_connect_timeout": 2,
        "socket_timeout": 2,
    }
    return client


def broker_options() -> dict[str, float]:
    """Transport options every Celery client and worker must share (celery#5935, #7651)."""
    return {"visibility_timeout": settings.broker_visibility_timeout_seconds}


class BrokerUnreachable(Exception):
    """The broker refused or dropped the connection: the round was not sent."""


def enqueue_round(round_id: int) -> None:
    """Send the round to a Celery worker; without a broker, the embedded runner polls for it."""
    if settings.broker_url is None:
        return
    # Celery raises kombu's OperationalError for every broker connection error (refused,
    # dropped, timed out); anything else is a bug and propagates.
    from kombu.exceptions import OperationalError

    try:
        _celery(settings.broker_url).send_task(RUN_ROUND, args=[round_id], queue=QUEUE, retry=False)
    except OperationalError as error:
        raise BrokerUnreachable(str(error)) from error
