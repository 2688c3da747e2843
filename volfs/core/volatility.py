"""The volatility of files: marking spans volatile and non-volatile, a bounded step at a time,
and reporting on them (VOLFS_IOC_VRANGE, VRANGE_STATUS and VRANGE_NEXT).

A file's ranges and lost pages are an :class:`InodeRanges` hung on its inode while it has
any; its ranges join the mount's purge order (:class:`Purger`). Spans are validated here, in
bytes, and taken to pages for :mod:`volfs.core.ranges`.

A file's segments (:mod:`volfs.core.segments`) are registered and released here; their table
joins the purge order while it lives. A page belongs to a segment or may be in ranges, never
both: each refuses a span overlapping the other (EBUSY).
"""

from __future__ import annotations

import errno
from collections.abc import Generator, Iterator

from volfs.abi import (
    NO_PAGE,
    PAGE_SHIFT,
    PAGE_SIZE,
    SEGMENT_PURGED,
    SEGMENT_PURGING,
    SEGMENTS_DEFAULT,
    SEGMENTS_PER_FILE_MAX,
    SEGMENTS_PER_MOUNT_MAX,
    U64_MAX,
    VRANGE_NONVOLATILE,
    VRANGE_PARTIAL,
    VRANGE_VOLATILE,
    pages_for,
)
from volfs.core.inode import Inode
from volfs.core.purge import Purger
from volfs.core.ranges import InodeRanges, VolatileRange
from volfs.core.segments import SEGMENT_RECORD_BYTES, Segment, SegmentTable, tables_allowed
from volfs.core.store import FileContents, Store

#: Ranges (or lost runs) one step of a mark or unmark takes on: about a millisecond of work.
VRANGE_STEP = 200


class Volatility:
    """Volatile ranges of the files of one mount."""

    def __init__(self, purger: Purger, store: Store) -> None:
        """Mark ranges into ``purger``'s order; charge segment tables to ``store``'s cap."""
        self._purger = purger
        self._store = store
        #: The files with a segment table, by inode number.
        self._with_tables: dict[int, Inode] = {}
        #: Slots of all tables.
        self._slots = 0
        #: Spans ``[first, end)`` of marks under way, taken a step at a time, by inode number:
        #: a segment registered between two steps would share pages with the ranges.
        self._marking: dict[int, list[tuple[int, int]]] = {}

    @staticmethod
    def _span(inode: Inode, start: int, length: int) -> tuple[int, int]:
        """Validate an ioctl's byte span and return it as pages ``[first, end)``.

        Raises:
            OSError: EISDIR or EINVAL for a non-regular file; EINVAL for an unaligned start
                or length, an overflowing span, or one past the page-rounded file size.
        """
        _require_regular(inode)
        assert inode.contents is not None
        if start % PAGE_SIZE or length % PAGE_SIZE:
            raise OSError(errno.EINVAL, "start and length must be multiples of the page size")
        eof_page = pages_for(inode.contents.size)
        first = start >> PAGE_SHIFT
        end = eof_page if length == 0 else (start + length) >> PAGE_SHIFT
        if start + length > U64_MAX or first > end or end > eof_page:
            raise OSError(errno.EINVAL, "span past the end of the file")
        return first, end

    @staticmethod
    def next_range(inode: Inode, start: int) -> VolatileRange | None:
        """The first range of a file ending after byte ``start`` (VOLFS_IOC_VRANGE_NEXT).

        Raises:
            OSError: EISDIR or EINVAL for a non-regular file; EINVAL for an unaligned start.

        Runtime complexity: O(log n) in the file's ranges.
        """
        _require_regular(inode)
        if start % PAGE_SIZE:
            raise OSError(errno.EINVAL, "start must be a multiple of the page size")
        return None if inode.vranges is None else inode.vranges.next_range(start >> PAGE_SHIFT)

    def vrange(
        self, inode: Inode, start: int, length: int, mode: int, flags: int
    ) -> tuple[int, bool]:
        """Mark a span volatile or non-volatile (VOLFS_IOC_VRANGE) in one go.

        See :meth:`vrange_steps`, which this runs to the end.
        """
        steps = self.vrange_steps(inode, start, length, mode, flags)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                result: tuple[int, bool] = done.value
                return result

    def vrange_steps(
        self, inode: Inode, start: int, length: int, mode: int, flags: int
    ) -> Generator[None, None, tuple[int, bool]]:
        """Mark a span volatile or non-volatile (VOLFS_IOC_VRANGE), a bounded step at a time.

        A span over many ranges is taken in pieces of at most :data:`VRANGE_STEP` ranges (or
        lost runs) each, from left to right, each piece's end found in the live set; the
        generator yields between them so that the caller can serve other requests. Pieces
        taken in order do what the whole span does (an unmark splits at most the ranges
        straddling the span's two ends; each piece of a mark merges the one before it), and
        everything that can fail is checked before the first one. What other requests do in
        between takes effect as if it came before or after.

        Returns:
            ``(marked bytes, purged)``: purged tells, for NON_VOLATILE, whether any of the
            span had been purged while volatile.

        Raises:
            OSError: EINVAL for a bad mode, flag or span; ENOSPC if a bound on ranges would be
                passed; nothing changes then.

        Runtime complexity: O(log n) per step in the inode's ranges, plus O(1) amortised per
        range merged or removed; a step takes on at most :data:`VRANGE_STEP` of them.
        """
        if mode not in (VRANGE_VOLATILE, VRANGE_NONVOLATILE) or flags & ~VRANGE_PARTIAL:
            raise OSError(errno.EINVAL, "unknown mode or flags")
        first, end = self._span(inode, start, length)
        marked = (end - first) << PAGE_SHIFT
        if first == end:
            return 0, False
        if inode.segments is not None and next(inode.segments.overlapping(first, end), None):
            raise OSError(errno.EBUSY, "the span overlaps a segment: pin or release it")
        if mode == VRANGE_VOLATILE:
            yield from self._mark_steps(inode, first, end, partial=bool(flags & VRANGE_PARTIAL))
            return marked, False
        purged = yield from self._unmark_steps(inode, first, end)
        return marked, purged

    def _mark_steps(
        self, inode: Inode, first: int, end: int, *, partial: bool
    ) -> Generator[None, None, None]:
        """Mark pages [first, end) volatile, a step at a time (see :meth:`vrange_steps`)."""
        contents = inode.contents
        assert contents is not None
        self.ranges_of(inode).admit_mark(first, end)
        span = (first, end)
        self._marking.setdefault(inode.ino, []).append(span)
        try:
            yield from self._mark_pieces(inode, contents, first, end, partial=partial)
        finally:
            spans = self._marking[inode.ino]
            spans.remove(span)
            if not spans:
                del self._marking[inode.ino]

    def _mark_pieces(
        self, inode: Inode, contents: FileContents, first: int, end: int, *, partial: bool
    ) -> Generator[None, None, None]:
        """The steps of :meth:`_mark_steps`, once the mark was admitted."""
        low = first
        while True:
            live = self.ranges_of(inode)
            # A truncation meanwhile may have cut the span short: nothing past EOF.
            stop = min(end, pages_for(contents.size))
            cut = min(live.next_cut(low, stop, VRANGE_STEP, lost=False), stop)
            # The piece marked by the step before ends at ``low``: marking over it merges
            # the two, one neighbour more to merge whatever happened in between.
            left = live.range_ending_at(low) if low > first else None
            live.mark_volatile(
                low if left is None else left.start, cut, partial=partial, admit=low == first
            )
            if cut >= stop:
                return
            low = cut
            yield

    @staticmethod
    def _unmark_steps(inode: Inode, first: int, end: int) -> Generator[None, None, bool]:
        """Mark pages [first, end) non-volatile, a step at a time; True if any was purged."""
        if inode.vranges is None:
            return False
        inode.vranges.admit_unmark(first, end)
        purged = False
        low = first
        while True:
            ranges = inode.vranges
            if ranges is None:
                return purged  # another request left nothing to unmark
            cut = ranges.next_cut(low, end, VRANGE_STEP)
            purged = ranges.mark_nonvolatile(low, cut, admit=False) or purged
            if not ranges:
                inode.vranges = None
            if cut >= end:
                return purged
            low = cut
            yield

    def ranges_of(self, inode: Inode) -> InodeRanges:
        """The inode's range set, created empty if it has none."""
        if inode.vranges is None:
            inode.vranges = InodeRanges(self._purger, inode.ino)
        return inode.vranges

    def status(self, inode: Inode, start: int, length: int) -> tuple[int, int]:
        """Return ``(volatile bytes, purged bytes)`` of a span (VOLFS_IOC_VRANGE_STATUS):
        unpinned segments count as volatile."""
        first, end = self._span(inode, start, length)
        unpinned = 0
        if inode.segments is not None and first < end:
            self.acknowledge(inode, first, end)
            unpinned, _count = inode.segments.volatile_pages(first, end)
        if inode.vranges is None or first == end:
            return unpinned << PAGE_SHIFT, 0
        volatile, lost = inode.vranges.status(first, end)
        return (volatile + unpinned) << PAGE_SHIFT, lost << PAGE_SHIFT

    # -- segments ---------------------------------------------------------------------------

    def segment_table(self, inode: Inode, capacity: int) -> SegmentTable:
        """The file's segment table, created with ``capacity`` slots (0: the default) if it
        has none (VOLFS_IOC_SEGMENTS).

        Raises:
            OSError: EISDIR or EINVAL for a non-regular file; EINVAL for a capacity past
                :data:`SEGMENTS_PER_FILE_MAX`; ENOSPC if the table does not fit under the cap,
                the mount's tables would pass :data:`SEGMENTS_PER_MOUNT_MAX` slots, or the
                daemon holds as many tables as its descriptors allow (:func:`tables_allowed`).
        """
        _require_regular(inode)
        if capacity > SEGMENTS_PER_FILE_MAX:
            raise OSError(errno.EINVAL, f"at most {SEGMENTS_PER_FILE_MAX} segments per file")
        if inode.segments is not None:
            return inode.segments
        capacity = capacity or SEGMENTS_DEFAULT
        if self._slots + capacity > SEGMENTS_PER_MOUNT_MAX:
            raise OSError(errno.ENOSPC, "too many segment slots in this filesystem")
        if len(self._with_tables) >= tables_allowed():
            raise OSError(errno.ENOSPC, "too many segment tables for the daemon's descriptors")
        table = SegmentTable(inode.ino, capacity)
        try:
            self._store.charge(table.charge_bytes)
        except BaseException:
            table.close()
            raise
        self._slots += capacity
        inode.segments = table
        self._with_tables[inode.ino] = inode
        self._purger.tables.add(table)
        return table

    def register(self, inode: Inode, start: int, length: int, flags: int) -> Segment:
        """Register a segment of bytes [start, start+length), pinned
        (VOLFS_IOC_SEGMENT_REGISTER).

        Raises:
            OSError: ENOENT if the file has no table; EINVAL for a bad span or flag; EBUSY if
                the span overlaps a segment, a volatile range, a mark under way or lost
                pages; ENOSPC if the table is full, the record does not fit under the cap,
                or the file or the mount holds as many range records as allowed.
        """
        table = inode.segments
        if table is None:
            raise OSError(errno.ENOENT, "the file has no segment table")
        if flags & ~VRANGE_PARTIAL or length == 0:
            raise OSError(errno.EINVAL, "unknown flags or an empty segment")
        first, end = self._span(inode, start, length)
        ranges = inode.vranges
        if ranges is not None and any(ranges.status(first, end)):
            raise OSError(
                errno.EBUSY, "the span has volatile ranges or purged data nobody was told of"
            )
        if any(low < end and first < high for low, high in self._marking.get(inode.ino, ())):
            raise OSError(errno.EBUSY, "the span is being marked volatile")
        # Pages a purge takes from the segment stay lost once it is released, or its table
        # ends, until rewritten: a range record, then no longer charged as the segment.
        self._purger.limits.admit(0 if ranges is None else ranges.records, 1)
        self._store.charge(SEGMENT_RECORD_BYTES)
        try:
            return table.register(first, end, bool(flags & VRANGE_PARTIAL))
        except BaseException:
            self._store.uncharge(SEGMENT_RECORD_BYTES)
            raise

    def release(self, inode: Inode, index: int) -> Segment:
        """Release the segment in slot ``index`` (VOLFS_IOC_SEGMENT_RELEASE): it is no longer
        volatile; pages of it purged and not reported stay lost.

        Raises:
            OSError: ENOENT if the file has no table, EINVAL if no segment is in that slot.
        """
        table = inode.segments
        if table is None:
            raise OSError(errno.ENOENT, "the file has no segment table")
        segment = table.get(index)
        if segment is None:
            raise OSError(errno.EINVAL, f"no segment in slot {index}")
        self.acknowledge(inode, segment.first, segment.end)
        table.release(segment)
        self._store.uncharge(SEGMENT_RECORD_BYTES)
        return segment

    @staticmethod
    def refilled(inode: Inode, first: int, end: int) -> None:
        """Pages [first, end) of the file hold data again: purged segments among them may
        be purged again. Runtime complexity: O(log n + k) for k segments in the span."""
        table = inode.segments
        if table is None:
            return
        for segment in table.overlapping(first, end):
            # Written while a purge holds it (PURGING) too: PURGED once published.
            if table.state(segment) in (SEGMENT_PURGED, SEGMENT_PURGING):
                table.refilled.add(segment)

    def acknowledge(self, inode: Inode, first: int, end: int) -> None:
        """Forget the lost pages within [first, end) of segments a pin has reported since."""
        table = inode.segments
        if table is None or not table.unacknowledged or inode.vranges is None:
            return
        for segment in table.acknowledged(first, end):
            self.forget_lost(inode, segment.first, segment.end)

    @staticmethod
    def forget_lost(inode: Inode, first: int, end: int) -> None:
        """Pages [first, end) of the file are no longer lost."""
        ranges = inode.vranges
        if ranges is not None:
            ranges.forget_lost(first, end)
            if not ranges and not ranges.ended:
                inode.vranges = None

    def end_segments(self, inode: Inode) -> None:
        """End the file's segment table (its last close): pins and unpins fail from now on;
        pages purged and not reported stay lost."""
        table = inode.segments
        if table is None:
            return
        inode.segments = None
        del self._with_tables[inode.ino]
        self._purger.tables.discard(table)
        for segment in table.end():
            self.forget_lost(inode, segment.first, segment.end)
        self._slots -= table.capacity
        self._store.uncharge(table.charge_bytes + SEGMENT_RECORD_BYTES * len(table))
        table.close()

    def end_all_segments(self) -> None:
        """End every table (the mount goes away): their users learn it from ESTALE."""
        for inode in list(self._with_tables.values()):
            self.end_segments(inode)

    @staticmethod
    def cut_steps(inode: Inode, end_page: int) -> Iterator[None]:
        """Drop what a file's ranges and lost pages hold from ``end_page`` on (a truncation),
        :data:`VRANGE_STEP` at a time, yielding between steps.

        The set itself may change between steps (the last close leaves one of lost pages
        only): what lies past the end goes from whichever holds it.
        """
        while True:
            ranges = inode.vranges
            if ranges is None:
                return
            cut = ranges.next_cut(end_page, NO_PAGE, VRANGE_STEP)
            ranges.mark_nonvolatile(end_page, cut, admit=False)
            if not ranges:
                inode.vranges = None
            if cut >= NO_PAGE:
                return
            yield


def _require_regular(inode: Inode) -> None:
    """Volatility belongs to regular files: EISDIR for a directory, EINVAL for the rest."""
    if inode.contents is None:
        raise OSError(errno.EISDIR if inode.is_dir() else errno.EINVAL, "not a regular file")
