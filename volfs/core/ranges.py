"""The volatile ranges of one inode: an interval set of pages, and the pages lost to purges.

Pure logic over page numbers; no FUSE, no I/O. Two sorted maps per inode:

- ``ranges``: start page -> :class:`VolatileRange`, non-overlapping. Marking merges
  overlapping ranges into one (purged if any of them was or it holds a lost page, FULL if any
  of them was); ranges that only touch stay apart. Unmarking splits ranges at the edges of the span.
- ``lost``: start page -> end page of pages purged and not yet rewritten, truncated away or
  reported by an unmark. Reads touching them fail (EIO); a write takes its pages out; unmarking
  takes them out (they read as zeros from then on, being holes in the store). Lost pages
  outlive the volatility that lost them: when the last handle closes, the ranges go and the
  lost pages stay (:meth:`InodeRanges.end_volatility`).

Ranges and lost runs are *records* the daemon holds for a client, so their number is bounded:
per inode and per mount (:class:`RecordLimits`). A mark or unmark that would need a record past
a bound fails with ENOSPC and changes nothing; purges and writes never fail for it. A purge
adds the lost run of each range it takes, past the bound if need be, so records reach at most
twice it; it splits a PARTIAL range (two records more) only within the bound, and takes the
whole range otherwise. A write's split of a lost run is bounded by the pages it allocates.

Every range that may hold purgeable data is registered with a :class:`RangeTracker` (the
global LRU of :mod:`volfs.core.purge`); the set tells it when ranges appear, vanish or split.

Mark and unmark cost O(log n + k) for n ranges in the inode and k ranges overlapping the span
(each of which the call removes or trims, so k is amortised O(1)): applications call them often.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from sortedcontainers import SortedDict

from volfs.core.intervals import Change, add_interval, remove_interval
from volfs.core.sums import WeightedKeys, covered


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

    @property
    def limits(self) -> RecordLimits:
        """The bounds on records, and the records of the whole mount."""


class RecordLimits:
    """How many records (ranges and lost runs) one inode and the whole mount may hold."""

    def __init__(self, per_inode: int, per_mount: int) -> None:
        """Bound records to ``per_inode`` in one inode and ``per_mount`` in all."""
        self.per_inode = per_inode
        self.per_mount = per_mount
        #: Records held in the whole mount, those of closed files not yet discarded included.
        self.records = 0

    def admit(self, inode_records: int, growth: int) -> None:
        """Refuse ``growth`` more records for an inode holding ``inode_records``.

        Raises:
            OSError: ENOSPC past either bound.
        """
        if growth <= 0:
            return
        if inode_records + growth > self.per_inode:
            raise OSError(errno.ENOSPC, "too many volatile ranges in this file")
        if self.records + growth > self.per_mount:
            raise OSError(errno.ENOSPC, "too many volatile ranges in this filesystem")


class InodeRanges:
    """The volatile ranges and lost pages of one inode."""

    def __init__(self, tracker: RangeTracker, ino: int) -> None:
        """Create an empty set for inode ``ino`` whose ranges are reported to ``tracker``."""
        self.tracker = tracker
        self.ino = ino
        self._ranges: SortedDict[int, VolatileRange] = SortedDict()
        self._lost: SortedDict[int, int] = SortedDict()
        # The lengths of the ranges and of the lost runs by start: status in O(log n).
        self._range_pages = WeightedKeys()
        self._lost_pages = WeightedKeys()
        #: True once the inode's volatility ended: the ranges left are only waiting to be
        #: discarded (:meth:`discard`), and no purge may take anything from them.
        self.ended = False

    def __bool__(self) -> bool:
        return bool(self._ranges or self._lost)

    @property
    def volatile_pages(self) -> int:
        """Pages in ranges. Runtime complexity: O(1)."""
        return self._range_pages.total

    @property
    def lost_pages(self) -> int:
        """Lost pages. Runtime complexity: O(1)."""
        return self._lost_pages.total

    @property
    def range_count(self) -> int:
        """Ranges held. Runtime complexity: O(1)."""
        return len(self._ranges)

    @property
    def records(self) -> int:
        """Ranges and lost runs held. Runtime complexity: O(1)."""
        return len(self._ranges) + len(self._lost)

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

        Runtime complexity: O(log n).
        """
        return covered(self._range_pages, first, end), covered(self._lost_pages, first, end)

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

    def mark_volatile(self, first: int, end: int, *, partial: bool, admit: bool = True) -> None:
        """Make [first, end) volatile, merging with the ranges it overlaps.

        Args:
            admit: check the bounds on records (a caller that checked the whole span with
                :meth:`admit_mark` before taking it in pieces passes False).

        Raises:
            OSError: ENOSPC if the new range needs a record past a bound; nothing changes.

        Runtime complexity: O(log n + k) for k ranges merged.
        """
        if first >= end:
            return
        overlapping = self._overlapping(first, end)
        if admit:
            self._admit(1 - len(overlapping))
        merged_start, merged_end = first, end
        purged = False
        full = not partial
        for overlapped in overlapping:
            merged_start = min(merged_start, overlapped.start)
            merged_end = max(merged_end, overlapped.end)
            purged = purged or overlapped.purged
            full = full or not overlapped.partial
            self._remove(overlapped)
        # Pages lost in an earlier volatility and never reported make the range purged: an
        # unmark must report them whatever happens to them meanwhile.
        purged = purged or self.is_lost(merged_start, merged_end)
        self._add(
            VolatileRange(
                merged_start, merged_end, not full, purged, self.tracker.next_stamp(), self
            )
        )

    def mark_nonvolatile(self, first: int, end: int, *, admit: bool = True) -> bool:
        """Make [first, end) non-volatile; return True if any of it had been purged.

        The purge record of the span is forgotten: its lost pages read as zeros from now on.

        Args:
            admit: check the bounds on records (a caller that checked the whole span with
                :meth:`admit_unmark` before taking it in pieces passes False).

        Raises:
            OSError: ENOSPC if splitting a range or a lost run needs a record past a bound;
                nothing changes then.

        Runtime complexity: O(log n + k) for k ranges overlapping the span.
        """
        if first >= end:
            return False
        if admit:
            self.admit_unmark(first, end)
        overlapping = self._overlapping(first, end)
        purged = self.is_lost(first, end)
        for overlapped in overlapping:
            purged = purged or overlapped.purged
            # Pieces of a range holding nothing purgeable stay out of the LRU too.
            tracked = overlapped.tracked
            self._remove(overlapped)
            if overlapped.start < first:
                self._add(self._piece(overlapped, overlapped.start, first), track=tracked)
            if overlapped.end > end:
                self._add(self._piece(overlapped, end, overlapped.end), track=tracked)
        self._remove_lost(first, end)
        return purged

    def clear(self) -> None:
        """Drop every range and every lost page (the inode's contents are gone).

        Runtime complexity: O(n log n) for n ranges; O(1) for the lost pages.
        """
        for volatile_range in list(self._ranges.values()):
            self._remove(volatile_range)
        self.tracker.limits.records -= len(self._lost)
        self._lost = SortedDict()
        self._lost_pages = WeightedKeys()

    def end_volatility(self) -> InodeRanges | None:
        """End the inode's volatility (its last handle closed); return what stays of it.

        The lost pages move to a new set (None if there are none), which takes this one's
        place in the inode: they stay lost until rewritten, truncated away or reported by an
        unmark. This set keeps its ranges only until :meth:`discard` drops them; from now on
        they count in no statistic and no purge takes anything from them.

        Runtime complexity: O(1).
        """
        self.ended = True
        self.tracker.account(-self.volatile_pages, -len(self._ranges))
        # Nobody asks an ended set for its status: its sums go at once.
        self._range_pages = WeightedKeys()
        if not self._lost:
            return None
        survivor = InodeRanges(self.tracker, self.ino)
        survivor._lost, self._lost = self._lost, SortedDict()
        survivor._lost_pages, self._lost_pages = self._lost_pages, WeightedKeys()
        return survivor

    def discard(self, budget: int) -> bool:
        """Drop up to ``budget`` ranges of an ended set; return True once none is left.

        Runtime complexity: O(budget log n).
        """
        assert self.ended
        ranges = self._ranges
        for _ in range(min(budget, len(ranges))):
            _start, volatile_range = ranges.popitem()
            self.tracker.limits.records -= 1
            if volatile_range.tracked:
                volatile_range.tracked = False
                self.tracker.untrack(volatile_range)
        return not ranges

    # -- purging and rewriting -------------------------------------------------------------

    def purged(self, volatile_range: VolatileRange, first: int, end: int) -> VolatileRange:
        """Record that pages [first, end) of ``volatile_range`` were purged.

        [first, end) must end at ``volatile_range.end`` (a PARTIAL range loses its tail) or be
        the whole range. The purged part becomes a range of its own, flagged purged and
        untracked; an unpurged head stays as it was. Returns the purged range.
        """
        assert volatile_range.start <= first < end == volatile_range.end
        assert not self.ended
        self._remove(volatile_range)
        if first > volatile_range.start:
            self._add(self._piece(volatile_range, volatile_range.start, first))
        gone = self._piece(volatile_range, first, end)
        gone.purged = True
        self._add(gone, track=False)
        self._add_lost(first, end)
        return gone

    def lose(self, first: int, end: int) -> None:
        """Pages [first, end), of a segment rather than a range, were purged: lost.

        Runtime complexity: O(log m + k) for m lost runs, k of them merged.
        """
        if first < end:
            self._add_lost(first, end)

    def forget_lost(self, first: int, end: int) -> None:
        """Pages [first, end) are no longer lost: a pin reported them. Never fails for a
        bound: segments bound how many lost runs this can split.

        Runtime complexity: O(log m + k).
        """
        if first < end:
            self._remove_lost(first, end)

    def may_split(self) -> bool:
        """True if a purge may split a range: the head it leaves and the lost run of the tail
        are two records more, both within the bounds."""
        limits = self.tracker.limits
        return self.records + 2 <= limits.per_inode and limits.records + 2 <= limits.per_mount

    def rewritten(self, first: int, end: int) -> None:
        """Pages [first, end) were written: no longer lost, and purgeable again.

        Runtime complexity: O(log n + k).
        """
        if first >= end:
            return
        self._remove_lost(first, end)
        for overlapped in self._overlapping(first, end):
            if not overlapped.tracked:
                overlapped.tracked = True
                self.tracker.track(overlapped)

    def next_cut(self, low: int, end: int, step: int, *, lost: bool = True) -> int:
        """Where a piece of a long span that starts at ``low`` ends: at most ``end``, and
        with at most ``step`` ranges (and, with ``lost``, ``step`` lost runs) starting in it
        after ``low``.

        The cut is the start of a range or a lost run (or ``end``), so a piece ending there
        never splits what starts there. Taken from the live set at each step, it bounds the
        work of every step whatever other requests did in between.

        Runtime complexity: O(log n).
        """
        cut = end
        for starts in (self._ranges, self._lost) if lost else (self._ranges,):
            index = starts.bisect_right(low) + step - 1
            if index < len(starts):
                cut = min(cut, starts.keys()[index])
        return cut

    def range_ending_at(self, page: int) -> VolatileRange | None:
        """The range whose last page is ``page - 1``, if any. Runtime complexity: O(log n)."""
        index = self._ranges.bisect_left(page) - 1
        if index < 0:
            return None
        found = self._ranges.values()[index]
        return found if found.end == page else None

    def admit_mark(self, first: int, end: int) -> None:
        """Refuse a mark of [first, end) that would need a record past a bound.

        Raises:
            OSError: ENOSPC.

        Runtime complexity: O(log n).
        """
        ranges = self._ranges
        low = max(ranges.bisect_right(first) - 1, 0)
        overlaps = any(
            ranges.values()[index].end > first and ranges.keys()[index] < end
            for index in range(low, min(low + 2, len(ranges)))
        )
        self._admit(0 if overlaps else 1)

    def admit_unmark(self, first: int, end: int) -> None:
        """Refuse an unmark of [first, end) that would need a record past a bound.

        Raises:
            OSError: ENOSPC.

        Runtime complexity: O(log n).
        """
        ranges = self._ranges
        index = ranges.bisect_right(first) - 1
        splits = index >= 0 and ranges.keys()[index] < first and ranges.values()[index].end > end
        self._admit(int(splits) + self._lost_splits(first, end))

    def admit_rewrite(self, first: int, end: int) -> None:
        """Refuse a rewrite of [first, end) that allocates nothing (a punched hole) if it
        would split a lost run past a bound.

        Raises:
            OSError: ENOSPC.
        """
        if first < end:
            self._admit(self._lost_splits(first, end))

    # -- internals -------------------------------------------------------------------------

    def _admit(self, growth: int) -> None:
        self.tracker.limits.admit(self.records, growth)

    def _lost_splits(self, first: int, end: int) -> int:
        """1 if taking [first, end) out of the lost pages splits a lost run in two, else 0."""
        lost = self._lost
        index = lost.bisect_right(first) - 1
        return int(index >= 0 and lost.keys()[index] < first and lost.values()[index] > end)

    def _add_lost(self, first: int, end: int) -> None:
        self._lost_changed(add_interval(self._lost, first, end))

    def _remove_lost(self, first: int, end: int) -> None:
        if self._lost:
            self._lost_changed(remove_interval(self._lost, first, end))

    def _lost_changed(self, change: Change) -> None:
        removed, added = change
        sums = self._lost_pages
        for start, _end in removed:
            sums.remove(start)
        for start, end in added:
            sums.add(start, end - start)
        self.tracker.limits.records += len(added) - len(removed)

    def _piece(self, source: VolatileRange, start: int, end: int) -> VolatileRange:
        return VolatileRange(start, end, source.partial, source.purged, source.stamp, self)

    def _add(self, volatile_range: VolatileRange, *, track: bool = True) -> None:
        self._ranges[volatile_range.start] = volatile_range
        self._range_pages.add(volatile_range.start, volatile_range.pages)
        self.tracker.limits.records += 1
        self.tracker.account(volatile_range.pages, 1)
        if track:
            volatile_range.tracked = True
            self.tracker.track(volatile_range)

    def _remove(self, volatile_range: VolatileRange) -> None:
        del self._ranges[volatile_range.start]
        self._range_pages.remove(volatile_range.start)
        self.tracker.limits.records -= 1
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
            assert not (self.ended and volatile_range.tracked), "an ended range in the LRU"
            previous_end = volatile_range.end
        if not self.ended:
            assert list(self._range_pages.items()) == [
                (r.start, r.pages) for r in self._ranges.values()
            ]
            self._range_pages._check()
        previous_end = -1
        for start, end in self._lost.items():
            assert start < end and start > previous_end, "lost runs overlap or touch"
            previous_end = end
        assert list(self._lost_pages.items()) == [(lo, hi - lo) for lo, hi in self._lost.items()]
        self._lost_pages._check()
