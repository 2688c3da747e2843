"""Long work on the event loop, a bounded step at a time, with other requests served between.

The core hands long work out as generators that yield between bounded steps (a mark over many
ranges, a truncation, the ranges of closed files); this module runs them on the event loop,
and keeps writers of an inode waiting while its truncation is under way.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from typing import TypeVar

import trio

_T = TypeVar("_T")


async def finish(steps: Generator[None, None, _T]) -> _T:
    """Run ``steps`` to the end, serving other requests between two of them; its result."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            result: _T = done.value
            return result
        await trio.sleep(0)


class Truncations:
    """The inodes being truncated a step at a time, one truncation per inode at once.

    While an inode is truncated, its writes, fallocate and volatility requests wait: a write
    past the new end would land in a range that is about to go, where a purge could take it.
    """

    def __init__(self) -> None:
        self._running: dict[int, trio.Event] = {}

    def __contains__(self, ino: int) -> bool:
        return ino in self._running

    async def run(self, ino: int, steps: Iterator[None]) -> None:
        """Run a truncation's ``steps`` for ``ino`` once no other one of it is under way."""
        await self.wait(ino)
        done = trio.Event()
        self._running[ino] = done
        try:
            for _step in steps:
                await trio.sleep(0)
        finally:
            del self._running[ino]
            done.set()

    async def wait(self, ino: int) -> None:
        """Wait until no truncation of ``ino`` is under way."""
        while (running := self._running.get(ino)) is not None:
            await running.wait()


class Backlog:
    """Work left for later, done a step at a time between requests whenever woken."""

    def __init__(self, step: Callable[[], bool]) -> None:
        """``step()`` does a bounded piece of the work and returns True while more is left."""
        self._step = step
        self._wakeup = trio.Event()

    def wake(self) -> None:
        """There is work: the task goes on with it at its next turn."""
        self._wakeup.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Do the work whenever woken, until cancelled."""
        task_status.started()
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            while self._step():
                await trio.sleep(0)
