"""service.api.group_commit: requests that arrive while a write is under way share the next."""

import asyncio
import threading
from collections.abc import Sequence

import pytest

from service.api.group_commit import GroupCommit


class Recorder:
    """A write that records its batches, answers each request with its double, refuses odd
    requests alone and fails a whole batch holding 13; it waits for `release` when told
    (on a thread of its own, as the event loop goes on)."""

    def __init__(self, hold: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.release = threading.Event()
        self.started = threading.Event()
        if not hold:
            self.release.set()

    async def __call__(self, requests: Sequence[int]) -> list[int | Exception]:
        return await asyncio.to_thread(self.write, requests)

    def write(self, requests: Sequence[int]) -> list[int | Exception]:
        self.batches.append(list(requests))
        self.started.set()
        self.release.wait(timeout=10)
        if 13 in requests:
            raise RuntimeError("the database went away")
        return [ValueError(f"{r} is odd") if r % 2 else 2 * r for r in requests]


def test_a_lone_request_is_written_at_once() -> None:
    write = Recorder()

    async def main() -> int:
        return await GroupCommit(write).submit(4)

    assert asyncio.run(main()) == 8
    assert write.batches == [[4]]


@pytest.mark.parametrize(("turns", "batches"), [(3, [[2, 4, 6]]), (0, [[2], [4, 6]])])
def test_requests_a_turn_of_the_event_loop_apart_share_a_batch(
    turns: int, batches: list[list[int]]
) -> None:
    write = Recorder()

    async def main() -> list[int]:
        writer = GroupCommit(write, turns=turns)
        answers = []
        for request in (2, 4, 6):
            answers.append(asyncio.ensure_future(writer.submit(request)))
            await asyncio.sleep(0)  # the next request arrives a turn later
        return await asyncio.gather(*answers)

    assert asyncio.run(main()) == [4, 8, 12]
    assert write.batches == batches


def test_requests_arriving_during_a_write_share_the_next_one() -> None:
    write = Recorder(hold=True)

    async def main() -> list[int]:
        writer = GroupCommit(write)
        first = asyncio.ensure_future(writer.submit(2))
        await asyncio.to_thread(write.started.wait, 10)
        later = [asyncio.ensure_future(writer.submit(r)) for r in (4, 6, 8)]
        await asyncio.sleep(0.01)
        write.release.set()
        return await asyncio.gather(first, *later)

    assert asyncio.run(main()) == [4, 8, 12, 16]
    assert write.batches == [[2], [4, 6, 8]]


def test_a_refused_request_fails_alone() -> None:
    write = Recorder(hold=True)

    async def main() -> list[int | BaseException]:
        writer = GroupCommit(write)
        first = asyncio.ensure_future(writer.submit(0))
        await asyncio.to_thread(write.started.wait, 10)
        later = [asyncio.ensure_future(writer.submit(r)) for r in (2, 3, 4)]
        write.release.set()
        return await asyncio.gather(first, *later, return_exceptions=True)

    answers = asyncio.run(main())
    assert answers[:2] == [0, 4] and answers[3] == 8
    assert isinstance(answers[2], ValueError) and str(answers[2]) == "3 is odd"
    assert write.batches == [[0], [2, 3, 4]]


def test_a_failed_write_fails_its_batch_and_the_next_batch_is_written() -> None:
    write = Recorder(hold=True)

    async def main() -> list[int | BaseException]:
        writer = GroupCommit(write)
        first = asyncio.ensure_future(writer.submit(13))
        await asyncio.to_thread(write.started.wait, 10)
        second = asyncio.ensure_future(writer.submit(2))
        write.release.set()
        failed = await asyncio.gather(first, return_exceptions=True)
        return [*failed, await second, await writer.submit(6)]

    failed, second, third = asyncio.run(main())
    assert isinstance(failed, RuntimeError)
    assert (second, third) == (4, 12)
    assert write.batches == [[13], [2], [6]]


def test_at_most_most_requests_share_a_write() -> None:
    write = Recorder(hold=True)

    async def main() -> list[int]:
        writer = GroupCommit(write, most=2)
        first = asyncio.ensure_future(writer.submit(0))
        await asyncio.to_thread(write.started.wait, 10)
        later = [asyncio.ensure_future(writer.submit(r)) for r in (2, 4, 6)]
        write.release.set()
        return await asyncio.gather(first, *later)

    assert asyncio.run(main()) == [0, 4, 8, 12]
    assert write.batches == [[0], [2, 4], [6]]


def test_a_batch_holds_at_most_most_in_size_and_a_larger_request_alone() -> None:
    write = Recorder(hold=True)

    async def main() -> list[int]:
        writer = GroupCommit(write, most=10, size=lambda request: request)
        first = asyncio.ensure_future(writer.submit(0))
        await asyncio.to_thread(write.started.wait, 10)
        later = [asyncio.ensure_future(writer.submit(r)) for r in (4, 6, 12, 2, 2)]
        write.release.set()
        return await asyncio.gather(first, *later)

    assert asyncio.run(main()) == [0, 8, 12, 24, 4, 4]
    assert write.batches == [[0], [4, 6], [12], [2, 2]]


def test_a_request_whose_client_left_does_not_stop_the_others() -> None:
    write = Recorder(hold=True)

    async def main() -> int:
        writer = GroupCommit(write)
        first = asyncio.ensure_future(writer.submit(0))
        await asyncio.to_thread(write.started.wait, 10)
        gone = asyncio.ensure_future(writer.submit(2))
        kept = asyncio.ensure_future(writer.submit(4))
        await asyncio.sleep(0)
        gone.cancel()
        write.release.set()
        await first
        with pytest.raises(asyncio.CancelledError):
            await gone
        return await kept

    assert asyncio.run(main()) == 8
    assert write.batches == [[0], [2, 4]]  # the departed request was written all the same
