"""The pieces of a mount without a kernel: the core wired as ``run_mount`` wires it, a recorder
standing in for the kernel's page cache, and helpers to wait on a condition with a deadline.

Nothing here imports pyfuse3 (tests of the adapter import :mod:`volfs.daemon.fs` themselves), so the
reclaim tests run without it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import trio

from volfs.abi import PAGE_SIZE
from volfs.core.inode import Inode
from volfs.core.namespace import ROOT_INODE, Namespace
from volfs.core.purge import Invalidation
from volfs.core.ranges import RecordLimits
from volfs.core.reclaim import Reclaimer
from volfs.core.stepping import Backlog
from volfs.core.store import Store
from volfs.core.worker import WorkerThread

#: Seconds a test waits for something that takes microseconds before it gives up.
DEADLINE = 10.0


class PageCache:
    """Stands in for the kernel's page cache: records each batch of ranges it is told to drop.

    While :meth:`hold` is in effect a drop blocks in the worker thread, as one does while the
    kernel writes dirty pages back, until :meth:`release`. With ``failure`` set, a drop raises
    it after recording its batch. Each drop reports ``written_back`` bytes of dirty pages
    written back into its ranges and discarded.
    """

    def __init__(self) -> None:
        self.batches: list[list[Invalidation]] = []
        #: What happened, in order: ``("dropped", batch size)``; tests add their own events.
        self.events: list[tuple[str, int]] = []
        self.failure: BaseException | None = None
        self.written_back = 0
        self.entered = threading.Event()
        self._open = threading.Event()
        self._open.set()
        self._lock = threading.Lock()

    def __call__(self, invalidations: Sequence[Invalidation]) -> int:
        self.entered.set()
        if not self._open.wait(DEADLINE):
            raise TimeoutError("a held cache drop was never released")
        with self._lock:
            self.batches.append(list(invalidations))
            self.events.append(("dropped", len(invalidations)))
        if self.failure is not None:
            raise self.failure
        return self.written_back

    def hold(self) -> None:
        """Make drops block until :meth:`release`."""
        self.entered.clear()
        self._open.clear()

    def release(self) -> None:
        """Let held and later drops through."""
        self._open.set()

    @property
    def ranges(self) -> list[Invalidation]:
        """Every range dropped so far, in order."""
        with self._lock:
            return [entry for batch in self.batches for entry in batch]


@dataclass
class Core:
    """One mount's core, serving: what ``run_mount`` builds before it mounts."""

    store: Store
    namespace: Namespace
    reclaimer: Reclaimer
    discards: Backlog
    nursery: trio.Nursery
    cache: PageCache = field(repr=False)


@contextlib.asynccontextmanager
async def serving(
    capacity_pages: int,
    *,
    purged_reads_zero: bool = False,
    limits: RecordLimits | None = None,
) -> AsyncIterator[Core]:
    """Build a store of ``capacity_pages`` and the core over it, with their tasks running.

    Held cache drops are let through on the way out, so that the worker thread can end.
    """
    cache = PageCache()
    with Store(capacity_pages * PAGE_SIZE) as store, WorkerThread("test-cache-drop") as dropper:
        async with trio.open_nursery() as nursery:
            namespace = Namespace(
                store,
                limits=limits,
                max_inodes=0,
                root_mode=0o755,
                root_uid=0,
                root_gid=0,
                purged_reads_zero=purged_reads_zero,
            )
            reclaimer = Reclaimer(
                namespace.purger,
                store,
                invalidate=cache,
                nursery=nursery,
                cache_dropper=dropper,
                statistics=namespace.statistics,
            )
            discards = Backlog(namespace.discard_ended)
            await nursery.start(store.run_reclaimer)
            await nursery.start(discards.run)
            try:
                yield Core(store, namespace, reclaimer, discards, nursery, cache)
            finally:
                # A drop in flight is waited for even when cancelled: let it end first.
                cache.release()
                nursery.cancel_scope.cancel()


def page(tag: int) -> bytes:
    """One page of the byte ``tag``: pages with different tags tell which one is read."""
    return bytes([tag % 256]) * PAGE_SIZE


def open_file(namespace: Namespace, name: bytes, pages: Sequence[int] = ()) -> Inode:
    """Create and open a regular file holding ``page(tag)`` at page ``i`` for each tag."""
    inode = namespace.mknod(ROOT_INODE, name, 0o644, 0, 0)
    namespace.open(inode)
    for index, tag in enumerate(pages):
        namespace.write(inode, index * PAGE_SIZE, page(tag))
    return inode


async def wait_until(condition: Callable[[], bool], deadline: float = DEADLINE) -> None:
    """Let other tasks (and threads) run until ``condition()`` holds.

    Checked after every step of the other tasks, so that a test can catch stepped work
    between two of its steps.

    Raises:
        trio.TooSlowError: it did not hold within ``deadline`` seconds.
    """
    with trio.fail_after(deadline):
        while not condition():
            await trio.sleep(0)


def run_core(test: Callable[[Core], Awaitable[None]], capacity_pages: int = 64) -> None:
    """Run ``test`` on a fresh core of ``capacity_pages`` inside its own event loop."""

    async def main() -> None:
        async with serving(capacity_pages) as core:
            await test(core)

    trio.run(main)
