"""Group commit: the requests that arrive while one write is under way share the next.

Under load one write then serves many requests (one connection and a few statements for
all of them); a lone request is written at once, a few turns of the event loop after it
arrives.
"""

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

Request = TypeVar("Request")
Answer = TypeVar("Answer")

# write(requests) -> each request's answer, or the exception that refuses it alone.
Write = Callable[[Sequence[Request]], Awaitable[Sequence[Answer | Exception]]]


class GroupCommit(Generic[Request, Answer]):
    """Awaits `write` for the requests waiting, one batch at a time.

    `write` stores a batch whole (or not at all) before it returns. An exception it raises
    fails every request of its batch; one it returns in a request's place fails that request
    alone.
    """

    def __init__(
        self,
        write: Write[Request, Answer],
        most: int = 1000,
        size: Callable[[Request], int] = lambda request: 1,
        turns: int = 8,
    ) -> None:
        self.write = write
        self.most = most  # the size of a batch: the sum of its requests' sizes
        self.size = size
        # A request read from its socket reaches submit() within a few turns of the event
        # loop (read, parsed, then run up to here): waiting this many turns before each batch
        # lets the requests already arrived join it, rather than wait a whole write for the
        # next. Fewer, larger batches: less work per request under load (worker/bench_load.py:
        # 3 turns made batches of 8 to 20 requests, 8 turns of 11 to 18). A turn with nothing
        # else to run costs microseconds.
        self.turns = turns
        self._waiting: list[tuple[Request, asyncio.Future[Answer]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def submit(self, request: Request) -> Answer:
        """The request's answer once its batch is committed; its exception if refused."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((request, future))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write_while_waiting())
        return await future

    async def _write_while_waiting(self) -> None:
        batch: list[tuple[Request, asyncio.Future[Answer]]] = []
        try:
            while self._waiting:
                for _ in range(self.turns):
                    await asyncio.sleep(0)
                batch = self._next_batch()
                try:
                    answers = await self.write([request for request, _ in batch])
                except Exception as error:
                    answers = [error] * len(batch)
                for (_, future), answer in zip(batch, answers, strict=True):
                    if future.done():  # the client went away; the batch is stored anyway
                        continue
                    if isinstance(answer, Exception):
                        future.set_exception(answer)
                    else:
                        future.set_result(answer)
        finally:
            self._writer = None
            # Cancelled (the event loop is closing): none waits for an answer never to come.
            for _, future in batch + self._waiting:
                future.cancel()
            self._waiting = []

    def _next_batch(self) -> list[tuple[Request, asyncio.Future[Answer]]]:
        """The first waiting requests, up to `most` in size (at least one, however large)."""
        taken = total = 0
        for request, _ in self._waiting:
            total += self.size(request)
            if taken and total > self.most:
                break
            taken += 1
        batch, self._waiting = self._waiting[:taken], self._waiting[taken:]
        return batch
