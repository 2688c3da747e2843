"""Reclaim: purging volatile data to make room under the size cap, on request and under
memory pressure, and dropping what was purged from the kernel's page cache.

Nothing here knows about FUSE. The purge itself (:class:`volfs.core.purge.Purger`) only changes the
store and the ranges, a bounded budget at a time; this module runs it on the event loop with
other requests served between budgets, and hands the purged byte ranges to an injected
``invalidate`` callable (the FUSE bridge in production, a recorder in tests) that drops them
from the kernel's page cache in a worker thread: the kernel first writes dirty mmap pages of
those ranges back through the daemon, whose event loop must stay free to serve them.

Until its purged pages have left the cache, an inode is *dropping*: a volatility change on
it waits (:meth:`Reclaimer.dropped`), so a program told its range was purged never reads the
old bytes from the cache afterwards.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

import trio

from volfs.abi import PAGE_SHIFT, MountStatistics
from volfs.core.purge import Invalidation, PurgePass, Purger, PurgeResult, PurgeSource
from volfs.core.segments import Segment
from volfs.core.store import CapacityError, FileContents, Store
from volfs.core.worker import WorkerThread

log = logging.getLogger(__name__)

#: Purged ranges whose pages leave the kernel's cache in one hand-off to the worker thread.
DROP_BATCH = 1024

#: Seconds an allocation that hit the cap waits for the kernel to forget removed files whose
#: memory comes back then: it tells the daemon within a few requests, unless a program still
#: holds one (an O_PATH descriptor), and then the allocation goes on without it.
FORGET_WAIT = 0.2

#: Drops purged byte ranges ``(ino, offset, length)`` from the kernel's page cache; blocks
#: while the kernel writes dirty pages back, so it is called in a worker thread. Returns the
#: bytes of those it discarded, being inside the ranges, instead of storing them.
Invalidate = Callable[[Sequence[Invalidation]], int]

_R = TypeVar("_R")


class Reclaimer:
    """Purges of one mount and the cache drops that follow them."""

    def __init__(
        self,
        purger: Purger,
        store: Store,
        *,
        invalidate: Invalidate,
        nursery: trio.Nursery,
        cache_dropper: WorkerThread,
        statistics: Callable[[], MountStatistics],
        settled: Callable[[int], None] = lambda ino: None,
    ) -> None:
        """Purge ``purger``'s ranges out of ``store``.

        Args:
            invalidate: drops purged byte ranges from the kernel's cache.
            nursery: where cache drops run after the purge that caused them.
            cache_dropper: the thread ``invalidate`` runs in.
            statistics: the mount's counters, logged with each purge.
            settled: called with an inode once none of its purged pages is on its way out
                of the cache any more.
        """
        self._purger = purger
        self._store = store
        self._invalidate = invalidate
        self._nursery = nursery
        self._cache_dropper = cache_dropper
        self._statistics = statistics
        self._settled = settled
        #: Inodes whose purged pages are still leaving the kernel's cache, with an event per
        #: purge that has some of them on the way.
        self._dropping: dict[int, list[trio.Event]] = {}
        #: Set by :meth:`close`: the mount is going away, nothing more is purged.
        self._closed = False

    async def close(self) -> None:
        """Purge nothing more, and return once no purged page is on its way out of the cache.

        Called before the daemon stops serving: a cache drop makes the kernel write dirty
        mmap pages back through the daemon, and one still running once requests are no
        longer served would wait for ever, holding the mount.
        """
        self._closed = True
        while self._dropping:
            await next(iter(self._dropping.values()))[0].wait()

    def is_dropping(self, ino: int) -> bool:
        """True while purged pages of ``ino`` may still be in the kernel's cache."""
        return ino in self._dropping

    async def dropped(self, ino: int) -> None:
        """Wait until no purged page of ``ino`` is on its way out of the kernel's cache."""
        while (drops := self._dropping.get(ino)) is not None:
            await drops[0].wait()

    async def purge(self, wanted: int, source: PurgeSource, *, wait: bool = False) -> PurgeResult:
        """Purge up to ``wanted`` bytes (0: all) oldest first, a budget at a time.

        Between budgets other requests are served. The inodes a budget purged are noted as
        dropping at once, and their pages leave the kernel's cache in batches of
        :data:`DROP_BATCH` ranges (whatever happens next); with ``wait`` this returns only
        once they are all gone, and what it freed then includes the dirty pages the kernel
        wrote back into the purged ranges meanwhile, discarded instead of stored (never more
        than the purged pages span). The purge is logged with the mount's counters, so a log
        alone tells what each one did.

        Returns:
            What the whole purge did: nothing once :meth:`close` was called.
        """
        if self._closed:
            return PurgeResult(0, 0)
        self._purger.count_purge(source)
        freed = ranges = 0
        done = trio.Event()
        noted: set[int] = set()
        pending: list[Invalidation] = []
        batches: list[trio.Event] = []
        purge_pass = PurgePass()
        discarded: list[int] = []
        spanned = 0
        try:
            while True:
                invalidations: list[Invalidation] = []
                try:
                    result = self._purger.purge(
                        wanted - freed if wanted else 0, invalidations, purge_pass
                    )
                finally:
                    inodes = {ino for ino, _offset, _length in invalidations} - noted
                    self._note_dropping(inodes, done)
                    noted |= inodes
                    pending += invalidations
                    spanned += sum(length for _ino, _offset, length in invalidations)
                    while len(pending) >= DROP_BATCH:
                        batches.append(self._start_drop(pending[:DROP_BATCH], discarded))
                        del pending[:DROP_BATCH]
                freed += result.freed_bytes
                ranges += result.ranges
                if result.complete:
                    break
                await trio.sleep(0)
        finally:
            if pending:
                batches.append(self._start_drop(pending, discarded))
            written_back: list[int] = []

            def settle() -> None:
                """Count what the drops discarded, once they are over. Pages the store held
                and the cache had dirty again are both freed and discarded: the figure stays
                within the pages purged."""
                written_back.append(max(min(sum(discarded), spanned - freed), 0))
                self._purger.count_freed(written_back[0])

            self._nursery.start_soon(
                self._end_drop, batches, noted, done, purge_pass.claims, settle
            )
        try:
            if wait:
                await done.wait()
                freed += written_back[0]
        finally:
            if ranges:
                self._log_purge(source, ranges, freed)
        return PurgeResult(freed, ranges)

    async def make_room(
        self, contents: FileContents, first: int, end: int, attempt: Callable[[], _R]
    ) -> _R:
        """Retry ``attempt``, an allocation of the holes of pages [first, end) of
        ``contents`` that hit the cap, once there is room; return what it returns.

        Memory on its way back to the free space is waited for, never purged for: released
        pages being punched, what removed inodes hold whose forgets the kernel has sent but
        wait their turn, and for up to :data:`FORGET_WAIT` the pages of removed files the
        kernel is about to forget (unless too many requests wait for forgets already, see
        :meth:`Store.wait_forgotten`). Otherwise volatile data is purged, oldest first, for
        the pages still missing (holes of the span, not pages the file already holds), so
        the cap's ENOSPC is raised only when no volatile data is left. A purge may take
        pages of this very span and so widen what is missing: it goes on until the attempt
        fits or nothing is left to purge. The purged pages leave the kernel's cache in the
        background, not before the attempt: the kernel may hold locked pages of a write in a
        purged range.

        Raises:
            CapacityError: nothing is left to purge.
            OSError: ENOSPC for a span larger than the whole store (nothing purged), or what
                ``attempt`` raises for another reason than the cap (a bound on range records,
                say): no purge can help those.
        """
        store = self._store
        forgets_deadline = trio.current_time() + FORGET_WAIT
        may_wait = True  # for forgets, until the deadline or a refusal
        while True:
            progress = True
            if store.reclaim_pending:
                await store.wait_reclaimed()
            elif may_wait and store.unforgotten_pages:
                may_wait = await store.wait_forgotten(forgets_deadline)
            else:
                missing = store.shortfall(contents, first, end)
                purged = await self.purge(max(missing, 1) << PAGE_SHIFT, PurgeSource.SIZE)
                # Freed bytes, not purged ranges: segments over holes, which a client may
                # unpin again and again, free nothing and must not keep this loop going.
                progress = bool(purged.freed_bytes)
            try:
                return attempt()
            except CapacityError:
                if not progress and not store.reclaim_pending:
                    raise

    async def relieve_pressure(self, wanted: int) -> int:
        """Purge up to ``wanted`` bytes for memory pressure; return the bytes freed.

        Returns once the memory is back with the system, so the caller can judge whether the
        pressure eased. Never raises: the pressure watcher must outlive a failed batch (out of
        memory, a bug), being what gives memory back the next time.
        """
        try:
            result = await self.purge(wanted, PurgeSource.PRESSURE, wait=True)
            await self._store.wait_reclaimed()
        except Exception:
            log.exception("purging for memory pressure failed")
            return 0
        return result.freed_bytes

    def _note_dropping(self, inodes: set[int], done: trio.Event) -> None:
        """Note ``inodes`` as dropping until ``done``.

        Noted as soon as they are purged, before anything is awaited: a volatility change on
        them waits for ``done`` instead of being answered while the cache may still serve
        their old bytes.
        """
        for ino in inodes:
            self._dropping.setdefault(ino, []).append(done)

    def _start_drop(self, invalidations: list[Invalidation], discarded: list[int]) -> trio.Event:
        """Start dropping purged byte ranges from the kernel's cache; return its event.

        The bytes the kernel wrote back into them meanwhile, discarded, go to ``discarded``.
        """
        dropped = trio.Event()

        async def drop() -> None:
            try:
                discarded.append(
                    await self._cache_dropper.run(
                        functools.partial(self._invalidate, invalidations)
                    )
                )
            except Exception:
                # A task of the mount's nursery: what escapes would end the daemon.
                log.exception("cannot drop purged pages from the kernel's cache")
            finally:
                dropped.set()

        self._nursery.start_soon(drop)
        return dropped

    async def _end_drop(
        self,
        batches: list[trio.Event],
        inodes: set[int],
        done: trio.Event,
        claims: Iterable[Segment],
        settle: Callable[[], None],
    ) -> None:
        """Once every batch of a purge left the cache, ``settle`` its count, publish its
        segments as purged, lift its notes and set ``done``."""
        try:
            for batch in batches:
                await batch.wait()
        finally:
            settle()
            # Only now: a pin told "purged" must not find the old bytes in the cache.
            for segment in claims:
                segment.table.publish(segment)
            done.set()
            for ino in inodes:
                events = self._dropping[ino]
                events.remove(done)
                if not events:
                    del self._dropping[ino]
                    self._settled(ino)

    def _log_purge(self, source: PurgeSource, ranges: int, freed: int) -> None:
        try:
            log.info(
                "purge (%s): %d ranges, %d bytes freed; %s",
                source.value,
                ranges,
                freed,
                self._statistics().describe(),
            )
        except Exception:
            # Nothing about a log line may undo or fail a purge that has happened.
            log.exception("cannot log a purge")
