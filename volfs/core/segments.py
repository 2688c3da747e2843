"""Segments: volatility pinned and unpinned in memory shared with the file's users.

A file's *segment table* is a memfd the daemon creates and hands to the file's users (see
``volfs/include/volfs.h``): a header, then one slot per segment whose state word clients
change by compare-and-swap (pin, unpin) without asking the daemon. The daemon learns of pins
and unpins lazily, when it looks: it scans for unpinned segments when it purges, claims one
with a compare-and-swap of its own (UNPINNED -> PURGING), releases its pages, and publishes
PURGED only once they have left the kernel's cache (the reclaimer calls :meth:`publish`).

The table is untrusted input: a client may write anything into it. The daemon keeps its own
record of every segment (:class:`Segment`: where it is, how it may be purged) and reads only
state words and stamps from the table, through :mod:`volfs._segments`, which bounds every
access by the mapping's length. A corrupt word can only make its own segment be purged or
not, on a file its writers could overwrite anyway.

Purged pages are *lost* in the file's :class:`~volfs.core.ranges.InodeRanges` as for ranges.
A pin that reports the purge acknowledges them, but the daemon only sees that later: a
segment whose pages are lost and whose word is no longer PURGING or PURGED has been pinned
since, and its lost pages read as zeros from then on (:meth:`SegmentTable.acknowledged`).
"""

from __future__ import annotations

import array
import errno
import fcntl
import mmap
import os
import resource
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from sortedcontainers import SortedDict

from volfs import _segments
from volfs.abi import (
    PAGE_SHIFT,
    SEGMENT_FREE,
    SEGMENT_PINNED,
    SEGMENT_PURGED,
    SEGMENT_PURGING,
    SEGMENT_SLOT,
    SEGMENT_TABLE_HEADER,
    SEGMENT_TABLE_MAGIC,
    SEGMENT_TABLE_VERSION,
    SEGMENT_UNPINNED,
    SEGMENTS_PER_MOUNT_MAX,
    VRANGE_PARTIAL,
    segment_slot_offset,
    segment_table_bytes,
)

#: Bytes the daemon holds per slot besides the table: the first and end page of its record,
#: and whether a scan may offer it.
RECORD_ARRAY_BYTES = 17
#: Bytes charged to ``size=`` for each registered segment's record.
SEGMENT_RECORD_BYTES = 256

#: Descriptors the daemon keeps for its own use (the FUSE device, its sockets and pipes, a
#: table reopened for a handover, files it reads); segment tables may hold the rest of its
#: RLIMIT_NOFILE.
DESCRIPTORS_KEPT = 256
#: Descriptors a table holds: its memfd, and the duplicate Python's mmap keeps of it.
DESCRIPTORS_PER_TABLE = 2

#: A stamp :func:`volfs._segments.claim` takes for any.
ANY_STAMP = (1 << 64) - 1

#: A segment a scan found: its place in the order, the segment, the stamp it carried then.
Candidate = tuple[int, "Segment", int]


@dataclass(slots=True, eq=False)
class Segment:
    """The daemon's own record of one registered segment: pages ``[first, end)``."""

    table: SegmentTable
    index: int
    first: int
    end: int
    partial: bool
    #: Released: the slot may hold another segment now.
    released: bool = False
    #: Pages of it were lost to a purge, and no pin was seen since.
    unacknowledged: bool = False

    @property
    def pages(self) -> int:
        """Length in pages."""
        return self.end - self.first


def tables_allowed() -> int:
    """How many segment tables the daemon may hold and still have :data:`DESCRIPTORS_KEPT`
    descriptors for itself. Read at each call: an administrator may change the limit of a
    running daemon (``prlimit``)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return SEGMENTS_PER_MOUNT_MAX
    return max((soft - DESCRIPTORS_KEPT) // DESCRIPTORS_PER_TABLE, 0)


class SegmentTable:
    """The segment table of one file: the shared memfd and the daemon's records."""

    def __init__(self, ino: int, capacity: int) -> None:
        """Create the table of inode ``ino`` with ``capacity`` slots, every one free.

        Raises:
            OSError: the memfd cannot be created or mapped.
        """
        self.ino = ino
        self.capacity = capacity
        self.size = segment_table_bytes(capacity)
        self.memfd = os.memfd_create(f"volfs-segments-{ino}", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            # Its holders reach it through /proc/self/fd too: only its owner may reopen it,
            # or a read-only holder could reopen it for writing.
            os.fchmod(self.memfd, 0o600)
            os.ftruncate(self.memfd, self.size)
            # A client holding the memfd must not shrink it under the daemon's mapping (a
            # SIGBUS in the daemon) nor grow it past what is charged.
            fcntl.fcntl(self.memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
            fcntl.fcntl(self.memfd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL)
            self.view = mmap.mmap(self.memfd, self.size)
        except BaseException:
            os.close(self.memfd)
            raise
        SEGMENT_TABLE_HEADER.pack_into(
            self.view, 0, SEGMENT_TABLE_MAGIC, SEGMENT_TABLE_VERSION, capacity, SEGMENT_SLOT.size
        )
        #: The pages of the segment in each slot, the daemon's own copy (0, 0: none).
        self.firsts = array.array("Q", bytes(8 * capacity))
        self.ends = array.array("Q", bytes(8 * capacity))
        #: 1 for a slot a scan may offer: it holds a segment that no purge has claimed and
        #: not yet published. A client turning a claimed word back to UNPINNED cannot make
        #: purges take it again and again, and slots it sets on its own are never looked at.
        self.scannable = bytearray(capacity)
        self._segments: dict[int, Segment] = {}
        self._by_first: SortedDict[int, Segment] = SortedDict()
        self._never_used = 0
        self._free: list[int] = []
        #: Segments with lost pages no pin was seen to report yet.
        self.unacknowledged: set[Segment] = set()
        #: Purged segments (no pin seen since) holding pages a purge may still take: the
        #: rest of a PARTIAL one, pages written since (even while a purge held it).
        self.refilled: set[Segment] = set()
        #: The file's volatility ended: every word is STALE and nothing is purged.
        self.ended = False

    def __len__(self) -> int:
        return len(self._segments)

    @property
    def charge_bytes(self) -> int:
        """What the table itself holds, charged to ``size=`` while it lives."""
        return self.size + RECORD_ARRAY_BYTES * self.capacity

    def get(self, index: int) -> Segment | None:
        """The segment in slot ``index``, if any."""
        return self._segments.get(index)

    def overlapping(self, first: int, end: int) -> Iterator[Segment]:
        """Segments sharing a page with [first, end), in file order. O(log n + k)."""
        by_first = self._by_first
        index = max(by_first.bisect_right(first) - 1, 0)
        for segment in by_first.values()[index:]:
            if segment.first >= end:
                return
            if segment.end > first:
                yield segment

    def register(self, first: int, end: int, partial: bool) -> Segment:
        """Record a segment of pages [first, end), pinned, in a free slot.

        The caller checked the span against the file; this checks it against the table.

        Raises:
            OSError: EBUSY if it overlaps a segment, ENOSPC if no slot is free.

        Runtime complexity: O(log n).
        """
        if next(self.overlapping(first, end), None) is not None:
            raise OSError(errno.EBUSY, "the span overlaps another segment")
        if self._free:
            index = self._free.pop()
        elif self._never_used < self.capacity:
            index = self._never_used
            self._never_used += 1
        else:
            raise OSError(errno.ENOSPC, "the file's segment table is full")
        segment = Segment(self, index, first, end, partial)
        self._segments[index] = segment
        self._by_first[first] = segment
        self.firsts[index] = first
        self.ends[index] = end
        self.scannable[index] = 1
        SEGMENT_SLOT.pack_into(
            self.view,
            segment_slot_offset(index),
            SEGMENT_FREE,
            VRANGE_PARTIAL if partial else 0,
            0,
            first << PAGE_SHIFT,
            (end - first) << PAGE_SHIFT,
        )
        _segments.set(self.view, index, SEGMENT_PINNED)
        return segment

    def release(self, segment: Segment) -> int:
        """Free a segment's slot; return the state its word had."""
        state = _segments.state(self.view, segment.index)
        _segments.set(self.view, segment.index, SEGMENT_FREE)
        segment.released = True
        self.acknowledge(segment)
        self.refilled.discard(segment)
        del self._segments[segment.index]
        del self._by_first[segment.first]
        self.firsts[segment.index] = self.ends[segment.index] = 0
        self.scannable[segment.index] = 0
        self._free.append(segment.index)
        return state

    def state(self, segment: Segment) -> int:
        """The segment's state word, as a client last left it."""
        return _segments.state(self.view, segment.index)

    def volatile_pages(self, first: int, end: int) -> tuple[int, int]:
        """``(pages, segments)`` of the unpinned segments within [first, end).

        Runtime complexity: O(capacity), in C.
        """
        return _segments.volatile_pages(self.view, self.firsts, self.ends, first, end)

    def refilled_candidates(self, now: int) -> list[Candidate]:
        """The :attr:`refilled` segments still purged, with their stamps (at most ``now``).

        Runtime complexity: O(r) for r refilled segments.
        """
        found = []
        for segment in list(self.refilled):
            if not self.scannable[segment.index]:
                continue  # claimed by a purge still under way
            state = self.state(segment)
            if state == SEGMENT_PURGED:
                stamp = min(_segments.stamp(self.view, segment.index), now)
                found.append((stamp, segment, ANY_STAMP))
            elif state != SEGMENT_PURGING:  # still claimed: purgeable once published
                self.refilled.discard(segment)  # pinned since: its next unpin says when
        return found

    def claim(self, segment: Segment, stamp: int) -> bool:
        """Win the segment for a purge if it is still unpinned with the stamp it was scanned
        with (UNPINNED -> PURGING) or, being :attr:`refilled`, still purged (PURGED ->
        PURGING); a pin then waits, and scans pass it over, until :meth:`publish`. One
        unpinned again since it was scanned waits for its new place in the order."""
        if self.ended or segment.released or not self.scannable[segment.index]:
            return False
        won = False
        if segment in self.refilled:
            won = _segments.claim(self.view, segment.index, SEGMENT_PURGED, ANY_STAMP)
            if not won and self.state(segment) != SEGMENT_PURGING:
                self.refilled.discard(segment)
        won = won or _segments.claim(self.view, segment.index, SEGMENT_UNPINNED, stamp)
        if won:
            self.scannable[segment.index] = 0
        return won

    def in_purge(self, segment: Segment) -> bool:
        """True while a purge holds the segment: claimed, and not yet published."""
        return not (self.ended or segment.released or self.scannable[segment.index])

    def publish(self, segment: Segment) -> None:
        """The purge of a claimed segment is over, its pages out of the kernel's cache:
        PURGED, and the pins waiting on it go on."""
        if not (self.ended or segment.released):
            _segments.set(self.view, segment.index, SEGMENT_PURGED)
            self.scannable[segment.index] = 1

    def lost(self, segment: Segment) -> None:
        """Pages of ``segment`` were lost to a purge: nobody was told yet."""
        segment.unacknowledged = True
        self.unacknowledged.add(segment)

    def acknowledge(self, segment: Segment) -> None:
        """The lost pages of ``segment`` were reported by a pin (or are gone otherwise)."""
        segment.unacknowledged = False
        self.unacknowledged.discard(segment)

    def acknowledged(self, first: int, end: int) -> list[Segment]:
        """Segments within [first, end) whose lost pages a pin has reported since the daemon
        last looked; they are no longer counted as unacknowledged.

        Runtime complexity: O(min(u, log n + k)) for u unacknowledged segments and k segments
        in the span (u when u is small).
        """
        seen = []
        # Whichever is likely fewer: the unacknowledged segments, or those of the span.
        if len(self.unacknowledged) <= _FEW:
            candidates: Iterable[Segment] = [
                s for s in self.unacknowledged if s.first < end and s.end > first
            ]
        else:
            candidates = self.overlapping(first, end)
        for segment in candidates:
            if segment.unacknowledged and self.state(segment) not in _PURGE_STATES:
                self.acknowledge(segment)
                seen.append(segment)
        return seen

    def end(self) -> list[Segment]:
        """End the table (the file's last close): every word turns STALE, waiting pins fail.

        Returns:
            The segments whose lost pages a pin had reported: they are no longer lost.

        Runtime complexity: O(capacity) in C, plus O(u) for u unacknowledged segments.
        """
        before = _segments.end(self.view)
        self.ended = True
        acknowledged = [s for s in self.unacknowledged if before[s.index] not in _PURGE_STATES]
        self.unacknowledged.clear()
        return acknowledged

    def close(self) -> None:
        """Let go of the memfd, the mapping and the records (after :meth:`end`): what still
        refers to the table (a token not redeemed, a scanned candidate) holds nothing big."""
        self.view.close()
        os.close(self.memfd)
        self.firsts = array.array("Q")
        self.ends = array.array("Q")
        self.scannable = bytearray()
        self._segments.clear()
        self._by_first.clear()
        self._free.clear()
        self.refilled.clear()


def oldest_unpinned(tables: Sequence[SegmentTable], limit: int, now: int) -> list[Candidate]:
    """The ``limit`` least recently unpinned segments of ``tables``, oldest first: ``(stamp,
    segment, stamp as read)``, a stamp past ``now`` ordered as ``now``. Slots that are not
    :attr:`~SegmentTable.scannable` are passed over, whatever their words say.

    Runtime complexity: O(slots log limit) in C, plus O(tables + limit) here.
    """
    found = []
    views = [(table.view, table.scannable) for table in tables]
    for stamp, position, index, seen in _segments.scan(views, limit, now):
        segment = tables[position].get(index)
        if segment is not None:
            found.append((stamp, segment, seen))
    return found


_PURGE_STATES = frozenset((SEGMENT_PURGING, SEGMENT_PURGED))

#: Unacknowledged segments few enough to look at all of them rather than at a span's.
_FEW = 64
