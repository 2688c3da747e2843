"""The global purge order of volatile ranges and the purge policy.

One LRU across all files: ranges are ordered by when they were marked (pieces of a split range
keep their place), and a purge takes them oldest first. A FULL range goes as a whole; a PARTIAL
range loses only as many pages from its end as the purge still needs. Ranges holding nothing a
purge could take (already purged, and not rewritten since) are not in the order.

The purge itself only changes the store and the ranges; it hands the caller the byte ranges
whose kernel page cache must be dropped, which the caller does outside the event loop. A purge
does a bounded amount of work per call (``budget`` ranges looked at), so a caller on the event
loop can purge a little, let other requests run, and go on.
"""

from __future__ import annotations

import enum
import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

from sortedcontainers import SortedDict

from volfs.abi import PAGE_SHIFT, U64_MAX, pages_for
from volfs.core.ranges import RecordLimits, VolatileRange
from volfs.core.store import FileContents

log = logging.getLogger(__name__)

#: Ranges one call of :meth:`Purger.purge` looks at, at most: a fraction of a millisecond,
#: so that other users' requests wait little for a purge that walks many empty ranges.
PURGE_BUDGET = 16

#: A byte range ``(ino, offset, length)`` to drop from the kernel's page cache.
Invalidation = tuple[int, int, int]

#: Where the pages of inode ``ino`` live: how a purge reaches the data of a range.
ContentsOf = Callable[[int], FileContents]


class PurgeSource(enum.Enum):
    """What asked for a purge; the statistics count purges by it."""

    IOCTL = "ioctl"
    SIZE = "size"
    PRESSURE = "pressure"


@dataclass(frozen=True, slots=True)
class PurgeResult:
    """What one call of :meth:`Purger.purge` did."""

    #: Bytes of memory released.
    freed_bytes: int
    #: Ranges (or tails of PARTIAL ranges) purged.
    ranges: int
    #: False if the budget ran out before the purge was done: call again for the rest.
    complete: bool = True


@dataclass(frozen=True, slots=True)
class PurgeStatistics:
    """Volatile data now, and purges since the mount."""

    #: Bytes in volatile ranges, purged or not, held or holes.
    volatile_bytes: int
    #: Volatile ranges in all files.
    ranges: int
    #: Ranges a purge could take something from.
    purgeable_ranges: int
    #: Purges by what asked for them.
    purges: dict[PurgeSource, int]
    #: Memory released by purges since the mount.
    purged_bytes: int


class Purger:
    """The LRU of purgeable volatile ranges of a mount, and the purge that walks it.

    Implements :class:`volfs.core.ranges.RangeTracker`.
    """

    def __init__(self, contents_of: ContentsOf, limits: RecordLimits | None = None) -> None:
        """Create an empty order.

        Args:
            contents_of: the pages of an inode with tracked ranges, which a purge releases.
            limits: the bounds on records of ranges (default: none).
        """
        self._contents_of = contents_of
        self._limits = limits or RecordLimits(per_inode=U64_MAX, per_mount=U64_MAX)
        # Keyed by (stamp, start): pieces of one range share its stamp and never a start.
        self._order: SortedDict[tuple[int, int], VolatileRange] = SortedDict()
        self._stamps = itertools.count()
        self._purges = dict.fromkeys(PurgeSource, 0)
        self._purged_bytes = 0
        self._volatile_pages = 0
        self._ranges = 0

    def __len__(self) -> int:
        return len(self._order)

    @property
    def limits(self) -> RecordLimits:
        """The bounds on records of ranges, and the mount's count of them."""
        return self._limits

    def next_stamp(self) -> int:
        """A stamp newer than all before. Runtime complexity: O(1)."""
        return next(self._stamps)

    def account(self, pages: int, ranges: int) -> None:
        """Count volatile pages and ranges coming and going. Runtime complexity: O(1)."""
        self._volatile_pages += pages
        self._ranges += ranges

    def track(self, volatile_range: VolatileRange) -> None:
        """Enter a range in the order. Runtime complexity: O(log n)."""
        self._order[volatile_range.stamp, volatile_range.start] = volatile_range

    def untrack(self, volatile_range: VolatileRange) -> None:
        """Remove a range from the order. Runtime complexity: O(log n)."""
        del self._order[volatile_range.stamp, volatile_range.start]

    def count_purge(self, source: PurgeSource) -> None:
        """Count one purge request, for the statistics."""
        self._purges[source] += 1

    def purge(
        self,
        wanted_bytes: int,
        invalidations: list[Invalidation],
        *,
        budget: int = PURGE_BUDGET,
    ) -> PurgeResult:
        """Purge oldest ranges first until ``wanted_bytes`` are freed (0: all of them).

        Looks at ``budget`` ranges at most; a result that is not ``complete`` asks for another
        call with what is still wanted.

        Args:
            wanted_bytes: memory to free; 0 purges every volatile range.
            invalidations: where each purged byte range is appended as it is purged, so that
                the caller drops it from the kernel's cache even if this call fails halfway.
            budget: ranges to look at, at most.

        Runtime complexity: O(budget log n), plus the pages released.
        """
        wanted = pages_for(wanted_bytes) if wanted_bytes else None
        freed = 0
        purged = 0
        order = self._order
        try:
            for _ in range(budget):
                if not order or (wanted is not None and freed >= wanted):
                    break
                victim = order.peekitem(0)[1]
                owner = victim.owner
                if owner.ended:
                    # Volatility ended with the last close: nothing of it may be purged.
                    victim.tracked = False
                    self.untrack(victim)
                    continue
                try:
                    contents = self._contents_of(owner.ino)
                except LookupError:
                    # A bug: left at the head of the order, it would fail every purge.
                    log.exception("inode %d has ranges but no contents; dropped", owner.ino)
                    victim.tracked = False
                    self.untrack(victim)
                    continue
                first = victim.start
                if victim.partial and wanted is not None and owner.may_split():
                    first = contents.tail_start(victim.start, victim.end, wanted - freed)
                # Noted first: dropping cached pages that a failure left in place costs a
                # re-read, while keeping cached pages that were purged would serve lost data.
                invalidations.append(
                    (owner.ino, first << PAGE_SHIFT, (victim.end - first) << PAGE_SHIFT)
                )
                freed += contents.release_pages(first, victim.end)
                owner.purged(victim, first, victim.end)
                purged += 1
        finally:
            self._purged_bytes += freed << PAGE_SHIFT
        complete = not order or (wanted is not None and freed >= wanted)
        return PurgeResult(freed << PAGE_SHIFT, purged, complete)

    def statistics(self) -> PurgeStatistics:
        """Return the counters."""
        return PurgeStatistics(
            volatile_bytes=self._volatile_pages << PAGE_SHIFT,
            ranges=self._ranges,
            purgeable_ranges=len(self._order),
            purges=dict(self._purges),
            purged_bytes=self._purged_bytes,
        )

    def _check(self) -> None:
        """Assert the order's invariants. Runtime complexity: O(n)."""
        for (stamp, start), volatile_range in self._order.items():
            assert volatile_range.tracked
            assert (volatile_range.stamp, volatile_range.start) == (stamp, start)
            assert volatile_range.owner._ranges.get(volatile_range.start) is volatile_range
