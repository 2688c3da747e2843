"""The worker thread that runs the event loop's blocking calls (volfs.core.worker)."""

from __future__ import annotations

import threading

import pytest
import trio

from volfs.core.worker import WorkerThread


def test_calls_run_in_one_other_thread_in_order_and_their_errors_reach_the_caller() -> None:
    seen: list[tuple[int, str]] = []

    def record(number: int) -> int:
        seen.append((number, threading.current_thread().name))
        return number * 10

    def fail() -> None:
        raise OSError(5, "refused")

    async def main() -> list[int]:
        with WorkerThread("volfs-test-worker") as worker:
            results = [await worker.run(lambda n=n: record(n)) for n in range(3)]
            with pytest.raises(OSError, match="refused"):
                await worker.run(fail)
            async with trio.open_nursery() as nursery:
                for n in range(3, 6):
                    nursery.start_soon(worker.run, lambda n=n: record(n))
            return results

    assert trio.run(main) == [0, 10, 20]
    assert [number for number, _thread in seen[:3]] == [0, 1, 2]
    assert sorted(number for number, _thread in seen) == list(range(6))
    assert {thread for _number, thread in seen} == {"volfs-test-worker"}


def test_a_call_in_flight_is_waited_for_even_when_cancelled() -> None:
    started, release = threading.Event(), threading.Event()
    finished: list[bool] = []

    def slow() -> None:
        started.set()
        release.wait(10)
        finished.append(True)

    async def main() -> None:
        with WorkerThread("volfs-test-worker") as worker:
            threading.Timer(0.3, release.set).start()
            with trio.move_on_after(0.05):
                await worker.run(slow)
            # The cancellation did not cut the wait short: the call had ended.
            assert finished == [True]

    trio.run(main)
    assert started.is_set()
