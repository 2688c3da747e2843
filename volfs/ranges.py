"""The volatile ranges of one inode: an interval set of pages, and the pages lost to purges.

Pure logic over page numbers; no FUSE, no I/O. Two sorted maps per inode:

- ``ranges``: start page -> :class:`VolatileRange`, non-overlapping. Marking merges
  overlapping ranges into one (purged if any of them was, FULL if any of them was); ranges that
  only touch stay apart. Unmarking splits ranges at the edges of the span.
- ``lost``: start page -> end page of pages purged and not yet rewritten or unmarked. Reads
  touching them fail (EIO); a write takes its pages out; unmarking takes them out (they read as
  zeros from then on, being holes in the store).

Every range that may hold purgeable data is registered with a :class:`RangeTracker` (the
global LRU of :mod:`volfs.purge`); the set tells it when ranges appear, vanish or split.

Mark and unmark cost O(log n + k) for n ranges in the inode and k ranges overlapping the span
(each of which the call removes or trims, so k is amortised O(1)): applications call them often.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from sortedcontainers import SortedDict

from volfs.intervals import add_interval, clip, remove_interval
from volfs.store import FileContents

_serials = itertools.count()


@dataclass(slots=True, eq=False)
class VolatileRange:
    """Pages ``[start, end)`` of one inode, marked volatile together."""

    start: int
    end: int
    #: VRANGE_PARTIAL: may be purged a page at a time.
    partial: bool
    #: Some of it was purged since it was marked (reported by NON_VOLATILE).
    purged: bool
    #: When it was marked: the LRU order. Pieces of a split range keep their stamp.
    stamp: int
    owner: InodeRanges = field(repr=False)
    #: Unique, to order pieces sharing a stamp.
    serial: int = field(default_factory=lambda: next(_serials))
    #: Registered with the tracker (it may hold data a purge can take).
    tracked: bool = False

    @property
    def pages(self) -> int:
        """Length in pages."""
        return self.end - self.start


class RangeTracker(Protocol):
    """What an inode's set tells the global purge order."""

    def track(self, volatile_range: VolatileRange) -> None:
        """``volatile_range`` may hold purgeable data from now on."""

    def untrack(self, volatile_range: VolatileRange) -> None:
        """``volatile_range`` is gone or holds nothing a purge could take."""

    def next_stamp(self) -> int:
        """A stamp newer than every stamp given before."""

    def account(self, pages: int, ranges: int) -> None:
        """Volatile pages and ranges came (positive) or went (negative)."""


class InodeRanges:
    """The volatile ranges and lost pages of one inode."""

    def __init__(self, tracker: RangeTracker, ino: int, contents: FileContents) -> None:
        """Create an empty set for inode ``ino`` whose ranges are reported to ``tracker``."""
        self.tracker = tracker
        self.ino = ino
        #: Where the inode's pages live, for the purger.
        self.contents = contents
        self._ranges: SortedDict[int, VolatileRange] = SortedDict()
        self._lost: SortedDict[int, int] = SortedDict()

    def __bool__(self) -> bool:
        return bool(self._ranges or self._lost)

    # -- queries ---------------------------------------------------------------------------

    def _overlapping(self, first: int, end: int) -> list[VolatileRange]:
        """Ranges sharing at least one page with [first, end). O(log n + k)."""
        ranges = self._ranges
        index = max(ranges.bisect_right(first) - 1, 0)
        found = []
        values = ranges.values()
        for i in range(index, len(values)):
            candidate = values[i]
            if candidate.start >= end:
                break
            if candidate.end > first:
                found.append(candidate)
        return found

    def ranges(self) -> Iterator[VolatileRange]:
        """All ranges in page order. O(n)."""
        return iter(self._ranges.values())

    def next_range(self, page: int) -> VolatileRange | None:
        """Return the first range ending after ``page`` (holding it, or the next), or None.

        Ranges that only touch are distinct ranges, answered one at a time.

        Runtime complexity: O(log n).
        """
        ranges = self._ranges
        values = ranges.values()
        # Ranges do not overlap, so their ends are sorted too: the range starting at or before
        # ``page`` holds it, or else the one after it is the answer.
        index = max(ranges.bisect_right(page) - 1, 0)
        for i in range(index, min(index + 2, len(values))):
            candidate = values[i]
            if candidate.end > page:
                return candidate
        return None

    def status(self, first: int, end: int) -> tuple[int, int]:
        """Return ``(volatile pages, lost pages)`` within [first, end).

        Runtime complexity: O(log n + k) for k ranges and lost runs in the span.
        """
        volatile = sum(min(r.end, end) - max(r.start, first) for r in self._overlapping(first, end))
        lost = sum(hi - lo for lo, hi in clip(self._lost, first, end))
        return volatile, lost

    def is_lost(self, first: int, end: int) -> bool:
        """True if any page of [first, end) was purged and not rewritten or unmarked.

        Runtime complexity: O(log m) for m lost runs.
        """
        lost = self._lost
        if not lost:
            return False
        index = lost.bisect_left(end) - 1
        return index >= 0 and lost.values()[index] > first

    # -- marking ---------------------------------------------------------------------------

    def mark_volatile(self, first: int, end: int, *, partial: bool) -> None:
        """Make [first, end) volatile, merging with the ranges it overlaps.

        Runtime complexity: O(log n + k) for k ranges merged.
        """
        if first >= end:
            return
        merged_start, merged_end = first, end
        purged = False
        full = not partial
        for overlapped in self._overlapping(first, end):
            merged_start = min(merged_start, overlapped.start)
            merged_end = max(merged_end, overlapped.end)
            purged = purged or overlapped.purged
            full = full or not overlapped.partial
            self._remove(overlapped)
        self._add(
            VolatileRange(
                merged_start, merged_end, not full, purged, self.tracker.next_stamp(), self
            )
        )

    def mark_nonvolatile(self, first: int, end: int) -> bool:
        """Make [first, end) non-volatile; return True if any of it had been purged.

        The purge record of the span is forgotten: its lost pages read as zeros from now on.

        Runtime complexity: O(log n + k) for k ranges overlapping the span.
        """
        if first >= end:
            return False
        purged = False
        for overlapped in self._overlapping(first, end):
            purged = purged or overlapped.purged
            # Pieces of a range holding nothing purgeable stay out of the LRU too.
            tracked = overlapped.tracked
            self._remove(overlapped)
            if overlapped.start < first:
                self._add(self._piece(overlapped, overlapped.start, first), track=tracked)
            if overlapped.end > end:
                self._add(self._piece(overlapped, end, overlapped.end), track=tracked)
        remove_interval(self._lost, first, end)
        return purged

    def truncate(self, end_page: int) -> None:
        """Drop everything from page ``end_page`` on (the file shrank)."""
        self.mark_nonvolatile(end_page, _INFINITY)

    def clear(self) -> None:
        """Drop every range and every lost page (the last handle closed)."""
        for volatile_range in list(self._ranges.values()):
            self._remove(volatile_range)
        self._lost.clear()

    # -- purging and rewriting -------------------------------------------------------------

    def purged(self, volatile_range: VolatileRange, first: int, end: int) -> VolatileRange:
        """Record that pages [first, end) of ``volatile_range`` were purged.

        [first, end) must end at ``volatile_range.end`` (a PARTIAL range loses its tail) or be
        the whole range. The purged part becomes a range of its own, flagged purged and
        untracked; an unpurged head stays as it was. Returns the purged range.
        """
        assert volatile_range.start <= first < end == volatile_range.end
        self._remove(volatile_range)
        if first > volatile_range.start:
            self._add(self._piece(volatile_range, volatile_range.start, first))
        gone = self._piece(volatile_range, first, end)
        gone.purged = True
        self._add(gone, track=False)
        add_interval(self._lost, first, end)
        return gone

    def rewritten(self, first: int, end: int) -> None:
        """Pages [first, end) were written: no longer lost, and purgeable again.

        Runtime complexity: O(log n + k).
        """
        if not self._ranges or first >= end:
            return
        remove_interval(self._lost, first, end)
        for overlapped in self._overlapping(first, end):
            if not overlapped.tracked:
                overlapped.tracked = True
                self.tracker.track(overlapped)

    # -- internals -------------------------------------------------------------------------

    def _piece(self, source: VolatileRange, start: int, end: int) -> VolatileRange:
        return VolatileRange(start, end, source.partial, source.purged, source.stamp, self)

    def _add(self, volatile_range: VolatileRange, *, track: bool = True) -> None:
        self._ranges[volatile_range.start] = volatile_range
        self.tracker.account(volatile_range.pages, 1)
        if track:
            volatile_range.tracked = True
            self.tracker.track(volatile_range)

    def _remove(self, volatile_range: VolatileRange) -> None:
        del self._ranges[volatile_range.start]
        self.tracker.account(-volatile_range.pages, -1)
        if volatile_range.tracked:
            volatile_range.tracked = False
            self.tracker.untrack(volatile_range)

    def _check(self) -> None:
        """Assert the invariants. Runtime complexity: O(n + m)."""
        previous_end = -1
        for start, volatile_range in self._ranges.items():
            assert start == volatile_range.start < volatile_range.end
            assert start >= previous_end, "ranges overlap"
            assert volatile_range.owner is self
            previous_end = volatile_range.end
        previous_end = -1
        for start, end in self._lost.items():
            assert start < end and start > previous_end, "lost runs overlap or touch"
            previous_end = end
            assert self.status(start, end)[0] == end - start, "lost pages outside any range"


_INFINITY = 1 << 62
