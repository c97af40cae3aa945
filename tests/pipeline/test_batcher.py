"""pipeline.serve.batcher: batches fill up with what queued while the previous batch was answered.

Driven by events, not by time: a sender that holds its batch until the test releases it.
"""

from __future__ import annotations

import asyncio

import pytest

from pipeline.serve.batcher import Batcher


class HeldSender:
    """Answers each item with item * 10, one batch at a time, each held until released."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        self.started = asyncio.Event()

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.started.set()
        await self.release.wait()
        self.release.clear()
        return [i * 10 for i in items]


def test_requests_that_wait_during_a_batch_make_the_next_batch() -> None:
    async def scenario() -> tuple[list[list[int]], list[int]]:
        send = HeldSender()
        batcher = Batcher(send, slots=1, max_batch_size=4, wait_s=0.0)
        first = asyncio.create_task(batcher.submit(0))
        await send.started.wait()  # batch [0] is being answered; 1..6 queue meanwhile
        rest = [asyncio.create_task(batcher.submit(i)) for i in range(1, 7)]
        await asyncio.sleep(0)
        for _ in range(3):
            send.release.set()
            while send.release.is_set():
                await asyncio.sleep(0)
        answers = await asyncio.gather(first, *rest)
        batcher.close()
        return send.batches, answers

    batches, answers = asyncio.run(scenario())
    assert batches == [[0], [1, 2, 3, 4], [5, 6]]  # full to max_batch_size, then the rest
    assert answers == [i * 10 for i in range(7)]  # each request its own answer, in order
    assert sum(len(b) for b in batches) == 7


def test_a_batch_smaller_than_the_last_waits_for_the_rest_and_a_lone_request_does_not() -> None:
    """Under load the next batch waits (up to wait_s, here never reached) for as many requests
    as the previous one held; a lone request after a batch of one goes at once."""
    batches: list[list[int]] = []

    async def send(items: list[int]) -> list[int]:
        batches.append(list(items))
        return [i * 10 for i in items]

    async def scenario() -> list[int]:
        batcher = Batcher(send, slots=1, max_batch_size=8, wait_s=3600.0)
        alone = await asyncio.wait_for(batcher.submit(0), 10)  # no wait: last batch held 1
        await asyncio.gather(*[batcher.submit(i) for i in (1, 2, 3, 4)])  # taken as queued
        early = [asyncio.create_task(batcher.submit(i)) for i in (5, 6)]
        for _ in range(10):
            await asyncio.sleep(0)
        assert len(batches) == 2  # 5 and 6 wait for two more
        late = [asyncio.create_task(batcher.submit(i)) for i in (7, 8)]
        answers = await asyncio.gather(*early, *late)
        batcher.close()
        return [alone, *answers]

    answers = asyncio.run(scenario())
    assert batches == [[0], [1, 2, 3, 4], [5, 6, 7, 8]]
    assert answers == [0, 50, 60, 70, 80]


def test_requests_seen_at_once_make_full_batches_not_alternating_halves() -> None:
    """Four requests are being answered while four more queue: the next batch waits (wait_s is
    never reached here) for the first four's clients to send again, so batches are of eight,
    not halves of four taking turns."""
    async def scenario() -> list[list[int]]:
        send = HeldSender()
        batcher = Batcher(send, slots=1, max_batch_size=8, wait_s=3600.0)
        first = [asyncio.create_task(batcher.submit(i)) for i in range(4)]
        await send.started.wait()  # [0, 1, 2, 3] is being answered
        second = [asyncio.create_task(batcher.submit(i)) for i in range(4, 8)]
        for _ in range(10):
            await asyncio.sleep(0)
        send.release.set()
        await asyncio.gather(*first)
        for _ in range(10):
            await asyncio.sleep(0)
        assert len(send.batches) == 1  # 4..7 wait for the clients just answered
        again = [asyncio.create_task(batcher.submit(i)) for i in range(8, 12)]
        while len(send.batches) < 2:
            await asyncio.sleep(0)
        send.release.set()
        await asyncio.gather(*second, *again)
        batcher.close()
        return send.batches

    assert asyncio.run(scenario()) == [[0, 1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11]]


def test_each_slot_takes_its_own_batch_and_errors_reach_every_request_of_theirs() -> None:
    async def scenario() -> tuple[list[list[int]], list[object]]:
        seen: list[list[int]] = []
        gate = asyncio.Event()

        async def send(items: list[int]) -> list[int]:
            seen.append(list(items))
            await gate.wait()
            if 13 in items:
                raise RuntimeError("replica lost")
            return [-i for i in items]

        batcher = Batcher(send, slots=2, max_batch_size=8, wait_s=0.0)
        first = [asyncio.create_task(batcher.submit(i)) for i in (13, 14)]
        for _ in range(5):
            await asyncio.sleep(0)
        later = [asyncio.create_task(batcher.submit(i)) for i in (1, 2)]
        for _ in range(5):
            await asyncio.sleep(0)
        gate.set()
        got = await asyncio.gather(*first, *later, return_exceptions=True)
        batcher.close()
        return seen, got

    seen, got = asyncio.run(scenario())
    assert seen[0] == [13, 14] and seen[1] == [1, 2]  # the second slot did not wait
    assert [str(g) for g in got[:2]] == ["replica lost", "replica lost"]
    assert got[2:] == [-1, -2]


def test_bad_settings_are_named() -> None:
    async def send(items: list[int]) -> list[int]:
        return items

    with pytest.raises(ValueError, match="slots"):
        Batcher(send, slots=0, max_batch_size=1, wait_s=0.0)
    with pytest.raises(ValueError, match="wait_s"):
        Batcher(send, slots=1, max_batch_size=1, wait_s=-1.0)
