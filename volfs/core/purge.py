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
import heapq
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from sortedcontainers import SortedDict

from volfs.abi import NO_PAGE, PAGE_SHIFT, U64_MAX, pages_for
from volfs.core.ranges import RecordLimits, VolatileRange
from volfs.core.segments import Candidate, Segment, SegmentTable, oldest_unpinned
from volfs.core.store import FileContents

log = logging.getLogger(__name__)

#: Ranges one call of :meth:`Purger.purge` looks at, at most: a fraction of a millisecond,
#: so that other users' requests wait little for a purge that walks many empty ranges.
PURGE_BUDGET = 16

#: A byte range ``(ino, offset, length)`` to drop from the kernel's page cache.
Invalidation = tuple[int, int, int]

#: Unpinned segments one scan of the segment tables collects, oldest first.
SEGMENT_SCAN = 256

#: Where the pages of inode ``ino`` live: how a purge reaches the data of a range.
ContentsOf = Callable[[int], FileContents]
#: Pages ``[first, end)`` of inode ``ino`` were purged (``lose``) or a pin reported them
#: (``forget``): how a segment purge keeps the file's lost pages.
LostPages = Callable[[int, int, int], None]


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
    #: Ranges and segments (or tails of PARTIAL ones) purged.
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
    #: Bytes in unpinned segments, purged or not.
    unpinned_bytes: int
    #: Segments registered in all files.
    segments: int
    #: Purges by what asked for them.
    purges: dict[PurgeSource, int]
    #: Memory released by purges since the mount.
    purged_bytes: int


class PurgePass:
    """One purge, over as many calls of :meth:`Purger.purge` as it takes.

    It holds the segments it claimed, which the caller must :meth:`SegmentTable.publish` once
    their pages have left the kernel's cache, whatever happens, or their pins wait. Until then
    no scan offers them again, so each scan that wins a segment wins a new one; and a pass
    scans the tables again only if its last scan won a segment or lost one to another purge
    (which took it out of the scans too). Whatever clients write into their tables, a pass
    ends.
    """

    __slots__ = ("candidates", "claims", "fruitless_scan")

    def __init__(self) -> None:
        #: What the pass's last scan found and the pass has not tried yet, oldest first.
        self.candidates: deque[Candidate] = deque()
        #: The segments claimed, in the order they were claimed.
        self.claims: list[Segment] = []
        #: The last scan of this pass won no segment yet, nor lost one to another purge.
        self.fruitless_scan = False


class Purger:
    """The LRU of purgeable volatile ranges and unpinned segments of a mount, and the purge
    that walks it.

    Ranges are ordered as they are marked. Segments are unpinned without the daemon knowing:
    a purge scans the tables for the oldest unpinned ones (:data:`SEGMENT_SCAN` at a time,
    kept for the rest of its pass: a segment unpinned later is newer than all of them) and
    takes whichever of the two heads is older. Both are stamped by one clock, CLOCK_MONOTONIC.

    Implements :class:`volfs.core.ranges.RangeTracker`.
    """

    def __init__(
        self,
        contents_of: ContentsOf,
        limits: RecordLimits | None = None,
        *,
        lose: LostPages | None = None,
        forget: LostPages | None = None,
    ) -> None:
        """Create an empty order.

        Args:
            contents_of: the pages of an inode with tracked ranges, which a purge releases.
            limits: the bounds on records of ranges (default: none).
            lose: records pages of a file lost to a segment purge (needed with segments).
            forget: forgets lost pages a pin has reported (needed with segments).
        """
        self._contents_of = contents_of
        self._lose = lose
        self._forget = forget
        #: The segment tables of open files.
        self.tables: set[SegmentTable] = set()
        self._last_stamp = 0
        self._limits = limits or RecordLimits(per_inode=U64_MAX, per_mount=U64_MAX)
        # Keyed by (stamp, start): pieces of one range share its stamp and never a start.
        self._order: SortedDict[tuple[int, int], VolatileRange] = SortedDict()
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
        """A stamp newer than all before, on the clock segments are stamped with (CLOCK_MONOTONIC
        nanoseconds). Runtime complexity: O(1)."""
        self._last_stamp = max(self._last_stamp + 1, time.monotonic_ns())
        return self._last_stamp

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

    def count_freed(self, nbytes: int) -> None:
        """Count memory a purge freed outside the store: dirty cached pages it discarded."""
        self._purged_bytes += nbytes

    def purge(
        self,
        wanted_bytes: int,
        invalidations: list[Invalidation],
        purge_pass: PurgePass | None = None,
        *,
        budget: int = PURGE_BUDGET,
    ) -> PurgeResult:
        """Purge oldest ranges and segments first until ``wanted_bytes`` are freed (0: all).

        Looks at ``budget`` ranges or segments at most; a result that is not ``complete`` asks
        for another call, with the same ``purge_pass``, for what is still wanted.

        Args:
            wanted_bytes: memory to free; 0 purges every volatile range and unpinned segment.
            invalidations: where each purged byte range is appended as it is purged, so that
                the caller drops it from the kernel's cache even if this call fails halfway.
            purge_pass: the purge this call is part of, which holds the segments it claims
                (needed if the mount has segments; None purges ranges only).
            budget: ranges and segments to look at, at most.

        Runtime complexity: O(budget log n), plus the pages released, plus one scan of the
        segment tables (O(slots) in C) when no scanned segment is left.
        """
        this_pass = purge_pass if purge_pass is not None else PurgePass()
        wanted = pages_for(wanted_bytes) if wanted_bytes else None
        freed = 0
        purged = 0
        order = self._order
        candidates = this_pass.candidates
        scanned = False
        try:
            for _ in range(budget):
                if wanted is not None and freed >= wanted:
                    break
                if not candidates and not scanned:
                    self._scan_segments(this_pass)
                    scanned = True
                if candidates and (not order or candidates[0][0] < order.peekitem(0)[0][0]):
                    _stamp, segment, seen = candidates.popleft()
                    if purge_pass is None:
                        raise ValueError("a purge of segments needs a pass to hold its claims")
                    taken = self._purge_segment(
                        segment,
                        seen,
                        None if wanted is None else wanted - freed,
                        invalidations,
                        purge_pass,
                    )
                    if taken is not None:
                        freed += taken
                        purged += 1
                    continue
                if not order:
                    break
                taken = self._purge_range(
                    order.peekitem(0)[1],
                    None if wanted is None else wanted - freed,
                    invalidations,
                )
                if taken is not None:
                    freed += taken
                    purged += 1
        finally:
            self._purged_bytes += freed << PAGE_SHIFT
        complete = (wanted is not None and freed >= wanted) or (
            not order and not candidates and scanned
        )
        return PurgeResult(freed << PAGE_SHIFT, purged, complete)

    def _purge_range(
        self, victim: VolatileRange, still_wanted: int | None, invalidations: list[Invalidation]
    ) -> int | None:
        """Purge the oldest range (its tail, if PARTIAL and less is wanted); return the pages
        freed, or None if it was only dropped from the order."""
        owner = victim.owner
        if owner.ended:
            # Volatility ended with the last close: nothing of it may be purged.
            victim.tracked = False
            self.untrack(victim)
            return None
        try:
            contents = self._contents_of(owner.ino)
        except LookupError:
            # A bug: left at the head of the order, it would fail every purge.
            log.exception("inode %d has ranges but no contents; dropped", owner.ino)
            victim.tracked = False
            self.untrack(victim)
            return None
        first = victim.start
        if victim.partial and still_wanted is not None and owner.may_split():
            first = contents.tail_start(victim.start, victim.end, still_wanted)
        # Noted first: dropping cached pages that a failure left in place costs a re-read,
        # while keeping cached pages that were purged would serve lost data.
        invalidations.append((owner.ino, first << PAGE_SHIFT, (victim.end - first) << PAGE_SHIFT))
        freed = contents.release_pages(first, victim.end)
        owner.purged(victim, first, victim.end)
        return freed

    def _scan_segments(self, purge_pass: PurgePass) -> None:
        """Collect the :data:`SEGMENT_SCAN` least recently unpinned segments of all tables,
        unless the pass's last scan won none of those it found."""
        if purge_pass.fruitless_scan:
            return
        purge_pass.fruitless_scan = True
        now = time.monotonic_ns()
        tables = [table for table in self.tables if not table.ended]
        found = heapq.merge(
            oldest_unpinned(tables, SEGMENT_SCAN, now),
            sorted(
                (c for t in tables if t.refilled for c in t.refilled_candidates(now)),
                key=lambda candidate: candidate[0],
            ),
            key=lambda candidate: candidate[0],
        )
        purge_pass.candidates.extend(itertools.islice(found, SEGMENT_SCAN))

    def _purge_segment(
        self,
        segment: Segment,
        seen: int,
        still_wanted: int | None,
        invalidations: list[Invalidation],
        purge_pass: PurgePass,
    ) -> int | None:
        """Purge a segment if it is still unpinned as scanned; return the pages freed, or
        None if a pin (or a newer unpin, or another purge) got there first."""
        table = segment.table
        if not table.claim(segment, seen):
            if table.in_purge(segment):
                # Another purge took it since the scan, and no scan offers it: what that
                # scan found may all be gone so, while older segments wait unscanned.
                purge_pass.fruitless_scan = False
            return None
        # From here the pins of the segment wait: it must be published whatever happens.
        purge_pass.claims.append(segment)
        purge_pass.fruitless_scan = False
        assert self._lose is not None and self._forget is not None
        resumed = segment in table.refilled
        if segment.unacknowledged and not resumed:
            # Unpinned again since its last purge, so pinned in between: reported.
            self._forget(table.ino, segment.first, segment.end)
            table.acknowledge(segment)
        contents = self._contents_of(table.ino)
        first, end = segment.first, min(segment.end, pages_for(contents.size))
        if first >= end:
            # Wholly past the end of the file: purged as a unit, as a range is, freeing
            # nothing; the pin reports it.
            table.refilled.discard(segment)
            return 0
        if segment.partial and still_wanted is not None:
            first = contents.tail_start(first, end, still_wanted)
        invalidations.append((table.ino, first << PAGE_SHIFT, (end - first) << PAGE_SHIFT))
        freed = contents.release_pages(first, end)
        self._lose(table.ino, first, end)
        table.lost(segment)
        if first > segment.first:
            table.refilled.add(segment)  # the head is still there for the next purge
        else:
            table.refilled.discard(segment)
        return freed

    def statistics(self) -> PurgeStatistics:
        """Return the counters. Runtime complexity: O(slots of all tables), in C."""
        unpinned = sum(table.volatile_pages(0, NO_PAGE)[0] for table in self.tables)
        return PurgeStatistics(
            volatile_bytes=(self._volatile_pages + unpinned) << PAGE_SHIFT,
            ranges=self._ranges,
            purgeable_ranges=len(self._order),
            unpinned_bytes=unpinned << PAGE_SHIFT,
            segments=sum(len(table) for table in self.tables),
            purges=dict(self._purges),
            purged_bytes=self._purged_bytes,
        )

    def _check(self) -> None:
        """Assert the order's invariants. Runtime complexity: O(n)."""
        for (stamp, start), volatile_range in self._order.items():
            assert volatile_range.tracked
            assert (volatile_range.stamp, volatile_range.start) == (stamp, start)
            assert volatile_range.owner._ranges.get(volatile_range.start) is volatile_range
