"""A long-lived thread for the blocking calls the event loop hands off.

``trio.to_thread`` starts threads on demand. When the daemon is short of memory no new thread
can start, and what is handed off (giving memory back to the system, dropping purged pages
from the kernel's cache) is exactly what is needed then. A :class:`WorkerThread` is started
once, while memory is plentiful, and runs the calls given to it one after another.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from typing import TypeVar

import trio

_R = TypeVar("_R")

#: What a call gave: its result, or the exception it raised.
_Result = tuple[object, BaseException | None]
_Job = tuple[Callable[[], object], trio.lowlevel.TrioToken, Callable[[_Result], None]]


class WorkerThread:
    """One thread running blocking calls for a trio event loop, in the order given.

    Use as a context manager: the thread starts on entry and is joined on exit, after the
    calls already given have run.
    """

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)

    def __enter__(self) -> WorkerThread:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._jobs.put(None)
        self._thread.join()

    async def run(self, function: Callable[[], _R]) -> _R:
        """Run ``function()`` in the thread and return its result (or raise its exception).

        Not cancellable: once given, a call runs to its end and its caller waits for it, as
        the callers rely on (memory taken for punching must come back to the free space).
        """
        finished = trio.Event()
        results: list[_Result] = []

        def deliver(result: _Result) -> None:
            results.append(result)
            finished.set()

        self._jobs.put((function, trio.lowlevel.current_trio_token(), deliver))
        with trio.CancelScope(shield=True):
            await finished.wait()
        value, error = results[0]
        if error is not None:
            raise error
        return value  # type: ignore[return-value]

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            function, token, deliver = job
            result: _Result
            try:
                result = (function(), None)
            except BaseException as error:  # handed to the caller, which raises it
                result = (None, error)
            # If the event loop is gone, nobody waits for the result any more.
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(deliver, result)
