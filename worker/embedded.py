"""The embedded runner: rounds in local worker processes, with no broker.

It polls the database for due rounds (queued, or abandoned by a dead worker) and runs each in
a process pool, through the same `pipeline.execute` and the same leases as Celery workers, so
recovery works the same way. The pool spawns rather than forks: this parent process never
imports torch, and a forked child must never inherit CUDA state.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from worker.leases import due_rounds

log = logging.getLogger(__name__)


def _exit_with_parent(parent: int) -> None:
    """Pool initializer: end this process once the runner's process is gone.

    `stop()` never runs when the runner's process dies at once: killed, or re-raising SIGTERM
    after uvicorn's graceful shutdown, as `ally serve` does. A spawned child then lives on
    holding torch's memory, since its own end of the call queue's pipe never reports EOF.
    """

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)  # a round it was running is run again once its lease expires

    threading.Thread(target=watch, name="ally-parent-watch", daemon=True).start()


def _execute(round_id: int) -> str | None:
    from worker.pipeline import execute  # imported in the child: torch stays out of the parent

    status = execute(round_id)
    return None if status is None else str(status)


def _warm_up() -> None:
    import worker.pipeline  # noqa: F401


class EmbeddedRunner:
    def __init__(self, processes: int = 1, poll_seconds: float = 1.0):
        self.processes, self.poll_seconds = processes, poll_seconds
        self._stop = threading.Event()
        self._running: dict[int, Future] = {}
        self._thread: threading.Thread | None = None
        self._executor: ProcessPoolExecutor | None = None

    def start(self) -> EmbeddedRunner:
        self._thread = threading.Thread(target=self._loop, name="ally-embedded", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._executor is not None:
            # A running round is not waited for: its lease runs out and a worker runs it again.
            processes = list(self._executor._processes.values())  # no public handle exists
            self._executor.shutdown(wait=False, cancel_futures=True)
            for process in processes:
                process.terminate()

    def __enter__(self) -> EmbeddedRunner:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _loop(self) -> None:
        self._pool()
        while not self._stop.is_set():
            try:
                self._dispatch()
            except Exception:  # the database may be briefly unreachable: try again next poll
                log.exception("embedded runner: polling for rounds failed")
            self._stop.wait(self.poll_seconds)

    def _pool(self) -> ProcessPoolExecutor:
        if self._executor is None:
            context = multiprocessing.get_context("spawn")
            self._executor = ProcessPoolExecutor(
                self.processes,
                mp_context=context,
                initializer=_exit_with_parent,
                initargs=(os.getpid(),),
            )
            # Start the processes and import torch now, not when the first round waits.
            for _ in range(self.processes):
                self._executor.submit(_warm_up)
        return self._executor

    def _dispatch(self) -> None:
        for round_id, future in list(self._running.items()):
            if future.done():
                del self._running[round_id]
                if isinstance(future.exception(), BrokenProcessPool):
                    # A worker process died (e.g. killed): its lease will expire and the
                    # round comes back through due_rounds(); start a fresh pool for it.
                    self._executor = None
        free = self.processes - len(self._running)
        if free <= 0:
            return
        for round_id in due_rounds():
            if round_id in self._running:
                continue
            self._running[round_id] = self._pool().submit(_execute, round_id)
            free -= 1
            if free == 0:
                return
