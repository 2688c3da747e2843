"""File contents in memory: a page arena, sparse per-file page maps and memory accounting.

Every file's data lives in one *arena*: a single memfd mapped once into the daemon. The arena
is carved into 4 KiB pages by an extent allocator; a file maps runs of its own pages onto runs of
arena pages (extents). Nothing is allocated for holes, and a page that is freed is punched out
of the memfd (``FALLOC_FL_PUNCH_HOLE``) before it can be handed out again, so memory really
returns to the operating system and a freshly allocated page always reads as zeros.

Data is read through the mapping (no copy) but written with ``pwrite``: a page written through
the mapping stays mapped into the daemon, and punching a mapped page must first unmap it, which
made a purge take 1.3 to 1.45 times as long as punching a tmpfs file. A page is mapped when it
is first read instead, which costs that read about as much as a copy would. The bridge's
request threads note the pages they read (:attr:`Arena.mapped`) and copy writes into those
through the mapping, which is cheaper than a system call and maps nothing new.

One memfd for the whole store keeps the daemon within the kernel's limits on descriptors and
mappings whatever the number of files, and keeps the data reachable from C: a base pointer
(reads) and the memfd (writes) plus the extent tables.

Errors are raised as :class:`OSError` with an errno (``ENOSPC`` when the size cap is reached,
as :class:`CapacityError`,
``EFBIG`` for offsets past :data:`MAX_FILE_SIZE`); nothing here knows about FUSE.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import math
import mmap
import os
from collections.abc import Callable, Iterator
from typing import Protocol

import trio
from sortedcontainers import SortedDict

from volfs.abi import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    MAX_FILE_SIZE,
    NO_PAGE,
    PAGE_SHIFT,
    PAGE_SIZE,
    pages_for,
    pages_spanned,
)
from volfs.core._pagemap import PageMap, PageTable
from volfs.core.intervals import add_interval, clip, remove_interval
from volfs.core.worker import WorkerThread

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]

#: mmap(2)'s MAP_NORESERVE (linux/mman.h), which Python's mmap module does not define.
_MAP_NORESERVE = 0x4000

#: Releases up to this many pages are punched on the event loop; larger ones in a thread.
INLINE_PUNCH_PAGES = 256
#: Punched runs given back to the free space in one turn of the event loop (about a
#: millisecond): tens of thousands of removed one-page files can be released at once.
GIVE_BACK_RUNS = 512

Run = tuple[int, int]

#: Reasons a file is served by Python alone: bits of its page map's holds (the bridge's
#: request threads serve a file's reads and writes only while none is set).
HOLD_RESERVED = 1  # fallocate reserved pages SEEK_DATA must skip until written
HOLD_VOLATILE = 2  # volatile ranges or lost pages: reads may fail, writes repopulate
HOLD_SEGMENTS = 4  # a segment table: writes refill segments
HOLD_PRIVILEGED = 8  # setuid, setgid or capabilities a write by another user removes


class Times(Protocol):
    """An inode's timestamps, in nanoseconds since the epoch."""

    atime_ns: int
    mtime_ns: int
    ctime_ns: int


#: Requests that may wait at once for removed inodes whose forgets are not queued
#: (:meth:`Store.wait_forgotten`): a fraction of pyfuse3's 99 request workers, so that
#: requests waiting never stop the daemon from taking others.
FORGET_WAITERS = 16

#: Zeros written over pages the kernel would not punch, allocated while memory is plentiful.
_ZEROS_PAGES = 256
_ZEROS = memoryview(bytes(_ZEROS_PAGES << PAGE_SHIFT))


def coalesced(runs: list[Run]) -> list[Run]:
    """``runs`` with each run that starts where the one before it ends merged into it.

    A purge releases a file's ranges one after another, so what it hands over is mostly one run
    of the arena per file, in pieces. Punched as one, the run costs one system call, one unmap
    from the daemon's mapping and one flush of the other CPUs' TLBs instead of one a range.
    O(n) in the runs.
    """
    merged: list[Run] = []
    for start, count in runs:
        if merged and merged[-1][0] + merged[-1][1] == start:
            merged[-1] = (merged[-1][0], merged[-1][1] + count)
        else:
            merged.append((start, count))
    return merged


class CapacityError(OSError):
    """ENOSPC: the size cap has no room for the pages asked for; purging may make some."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)


class Arena:
    """A fixed-capacity pool of pages backed by one memfd, with an extent allocator.

    Free space is a sorted map ``start page -> length`` of maximal free runs, so allocation
    and release are O(log f) in the number of free runs f (plus the number of pieces an
    allocation is split into). Allocation is next-fit from a roving cursor, except that a
    caller may ask to continue an existing run (``hint``), which keeps sequentially written
    files contiguous and their reads zero-copy.

    A released page is *dirty* until its memory has been punched out of the memfd; only then
    does it become free, so a free page always reads as zeros. Punching a large release takes
    a while (about 0.15 s a GiB), so whoever owns the arena may take the dirty runs
    (:meth:`take_dirty`), punch them in a worker thread (:meth:`punch`, which touches no
    Python state) and hand them back (:meth:`give_back`). With no ``on_release`` callback
    set, releases are punched at once.
    """

    def __init__(self, capacity_pages: int) -> None:
        """Create an arena of ``capacity_pages`` pages; no memory is used until written.

        Raises:
            OSError: the memfd or its mapping could not be created.
        """
        self.capacity_pages = capacity_pages
        self._fd = os.memfd_create("volfs-arena", os.MFD_CLOEXEC)
        try:
            # A zero-length mapping is not allowed; a one-page arena costs nothing.
            length = max(capacity_pages, 1) << PAGE_SHIFT
            os.ftruncate(self._fd, length)
            self._map = mmap.mmap(self._fd, length, mmap.MAP_SHARED)
            #: A byte per page, set by the bridge's request threads once they have read the
            #: page through the mapping (so it is mapped), cleared when the page is released.
            #: Private and unreserved: the daemon holds only the pages of it that were set.
            self.mapped = mmap.mmap(
                -1, max(capacity_pages, 1), flags=mmap.MAP_PRIVATE | _MAP_NORESERVE
            )
        except BaseException:
            os.close(self._fd)
            raise
        self.view = memoryview(self._map)
        self._free: SortedDict[int, int] = SortedDict()
        if capacity_pages:
            self._free[0] = capacity_pages
        self.free_pages = capacity_pages
        self._cursor = 0
        self._dirty: list[Run] = []
        #: Released pages not yet punched.
        self.dirty_pages = 0
        #: Pages taken by :meth:`take_dirty` and not yet given back.
        self.punching_pages = 0
        #: Called after each release; None punches released pages at once instead.
        self.on_release: Callable[[], None] | None = None
        #: Pages of the cap set aside for what the store holds outside the arena (metadata):
        #: not allocatable, counted as used.
        self.reserved_pages = 0

    def close(self) -> None:
        """Release the mapping and the memfd."""
        self.view.release()
        try:
            self._map.close()
            self.mapped.close()
        finally:
            os.close(self._fd)

    @property
    def used_pages(self) -> int:
        """Pages held by files and reserved (released pages not yet punched are not counted)."""
        return (
            self.capacity_pages
            - self.free_pages
            - self.dirty_pages
            - self.punching_pages
            + self.reserved_pages
        )

    @property
    def available_pages(self) -> int:
        """Pages an allocation may take now."""
        return self.free_pages - self.reserved_pages

    @property
    def fd(self) -> int:
        """The memfd, for writers outside this class (the bridge's request threads)."""
        return self._fd

    def write(self, position: int, data: bytes | memoryview) -> int:
        """Copy ``data`` into the arena at byte ``position`` (see the module docstring).

        Returns:
            The bytes copied: all of them, or fewer if the kernel ran out of memory partway.

        Raises:
            OSError: the kernel could take none of them (ENOMEM, ENOSPC).
        """
        view = memoryview(data)
        done = 0
        while done < len(view):
            try:
                written = os.pwrite(self._fd, view[done:], position + done)
            except OSError:
                if done:
                    break
                raise
            if written <= 0:
                if done:
                    break
                raise OSError(errno.EIO, "the arena took no bytes")
            done += written
        return done

    def zero(self, position: int, length: int) -> None:
        """Write ``length`` zeros into the arena at byte ``position``.

        Raises:
            OSError: the kernel could not take them all.
        """
        while length:
            piece = min(length, len(_ZEROS))
            if self.write(position, _ZEROS[:piece]) != piece:
                raise OSError(errno.ENOMEM, "the arena took part of the zeros")
            position += piece
            length -= piece

    def ensure_free(self, count: int) -> None:
        """Make sure ``count`` pages can be allocated, punching dirty pages if needed.

        Raises:
            CapacityError: if they cannot.
        """
        if count > self.available_pages and self.dirty_pages:
            self._punch_dirty_now()
        if count > self.available_pages:
            raise CapacityError("volfs is full")

    def reserve(self, count: int) -> None:
        """Set ``count`` pages of the cap aside (they stay free memory but count as used).

        Raises:
            OSError: ENOSPC if fewer than ``count`` pages are available; nothing changes then.
        """
        self.ensure_free(count)
        self.reserved_pages += count

    def unreserve(self, count: int) -> None:
        """Give back ``count`` reserved pages."""
        assert 0 <= count <= self.reserved_pages
        self.reserved_pages -= count

    def allocate(self, count: int, hint: int | None = None) -> list[tuple[int, int]]:
        """Take ``count`` zeroed pages, as few runs as the free space allows.

        Args:
            count: pages wanted, at least 1.
            hint: an arena page the caller would like the first run to start at (the page
                after its previous run); used when free.

        Returns:
            ``(start, length)`` runs adding up to ``count``.

        Raises:
            OSError: ENOSPC if fewer than ``count`` pages are free; nothing is taken then.

        Runtime complexity: O(k log f) for k runs returned and f free runs.
        """
        self.ensure_free(count)
        runs: list[Run] = []
        free = self._free
        if hint is not None and hint in free:
            runs.append(self._take(hint, count))
            count -= runs[-1][1]
        while count:
            index = free.bisect_left(self._cursor)
            if index == len(free):
                index = 0
            start = free.keys()[index]
            runs.append(self._take(start, count))
            count -= runs[-1][1]
        return runs

    def _take(self, start: int, wanted: int) -> tuple[int, int]:
        """Cut up to ``wanted`` pages from the front of the free run at ``start``."""
        length = self._free.pop(start)
        taken = min(length, wanted)
        if taken < length:
            self._free[start + taken] = length - taken
        self.free_pages -= taken
        self._cursor = start + taken
        return start, taken

    def release(self, start: int, count: int) -> None:
        """Return ``count`` pages at ``start``; they become free once punched.

        Runtime complexity: O(count) to clear their bytes of :attr:`mapped` (a memset), plus
        O(log f) and the kernel's work when punched at once.
        """
        # The punch unmaps them; a request thread writing into them once they are reused must
        # not take them for mapped. Zeros are written only where needed: writing them would
        # allocate the byte map's pages.
        if self.mapped.find(b"\x01", start, start + count) >= 0:
            self.mapped[start : start + count] = bytes(count)
        self._dirty.append((start, count))
        self.dirty_pages += count
        if self.on_release is None:
            self._punch_dirty_now()
        else:
            self.on_release()

    def take_dirty(self) -> list[Run]:
        """Take the released runs for punching; give them back with :meth:`give_back`."""
        runs, self._dirty = self._dirty, []
        self.punching_pages += self.dirty_pages
        self.dirty_pages = 0
        return runs

    def punch(self, runs: list[Run]) -> None:
        """Free the memory of ``runs``. Safe in a worker thread: it touches no arena state.

        Should the kernel refuse to punch, the pages are overwritten with zeros instead, so
        that free pages still read as zeros; their memory then stays with the daemon (logged).
        """
        refused = 0
        for start, count in coalesced(runs):
            if (
                _libc.fallocate(
                    self._fd,
                    FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                    start << PAGE_SHIFT,
                    count << PAGE_SHIFT,
                )
                != 0
            ):
                refused = refused or ctypes.get_errno()
                self.zero(start << PAGE_SHIFT, count << PAGE_SHIFT)
        if refused:
            log.error(
                "released memory stays with the daemon: punching it failed: %s",
                os.strerror(refused),
            )

    def give_back(self, runs: list[Run]) -> None:
        """Add punched runs to the free space. Runtime complexity: O(r log f) for r runs."""
        for start, count in runs:
            self.punching_pages -= count
            self._add_free(start, count)

    def _punch_dirty_now(self) -> None:
        runs = self.take_dirty()
        self.punch(runs)
        self.give_back(runs)

    def _add_free(self, start: int, count: int) -> None:
        self.free_pages += count
        free = self._free
        index = free.bisect_left(start)
        if index < len(free) and free.keys()[index] == start + count:
            count += free.pop(start + count)
        if index > 0:
            prev_start = free.keys()[index - 1]
            if prev_start + free[prev_start] == start:
                free[prev_start] += count
                return
        free[start] = count

    def _check(self) -> None:
        """Assert the allocator's invariants. Runtime complexity: O(f)."""
        total = 0
        previous_end = -1
        for start, length in self._free.items():
            assert length > 0, (start, length)
            assert start > previous_end, "free runs overlap or touch"
            assert start + length <= self.capacity_pages
            previous_end = start + length
            total += length
        assert total == self.free_pages, (total, self.free_pages)
        assert 0 <= self.reserved_pages <= self.free_pages, "reserved pages that are not free"


#: Runs fetched from a page map at a time by walks that usually stop early (seeking).
_RUNS_FETCHED = 32


class FileContents:
    """The bytes of one regular file: a logical size and a sparse map of its pages.

    The facts (where each run of pages is in the arena, the size, the timestamps) live in a
    :class:`~volfs.core._pagemap.PageMap`, which the bridge's request threads read and write
    without Python; this class keeps the logic. Every change of the runs or the size holds
    the map's lock throughout (``with self.map``), so a request thread never sees half of one.
    Lookups cost O(log e) in the number of runs e; a request touching k runs costs O(k) more.
    """

    __slots__ = ("_arena", "_unwritten", "map")

    def __init__(self, arena: Arena, times: Times | None = None) -> None:
        self._arena = arena
        #: The file's runs, size and timestamps (see the class docstring).
        self.map = (
            PageMap()
            if times is None
            else PageMap(atime_ns=times.atime_ns, mtime_ns=times.mtime_ns, ctime_ns=times.ctime_ns)
        )
        #: Pages reserved by fallocate and not written since: zeros that, as on tmpfs,
        #: SEEK_DATA counts as holes. None until the first fallocate.
        self._unwritten: SortedDict[int, int] | None = None

    @property
    def size(self) -> int:
        """Logical size in bytes (may extend past the last held page: a sparse tail)."""
        return self.map.size

    @property
    def pages(self) -> int:
        """Pages held in the arena: what the file really costs in memory."""
        return self.map.pages

    def grow(self, size: int) -> None:
        """Make the size at least ``size`` bytes."""
        with self.map:
            self.map.size = max(self.map.size, size)

    def _note_unwritten(self) -> None:
        """Keep request threads off the file while fallocate's reserved pages are tracked."""
        self.map.set_hold(HOLD_RESERVED, bool(self._unwritten))

    def _runs(self, first: int, end: int) -> list[tuple[int, int, int]]:
        """The ``(file page, arena page, count)`` of the held runs overlapping [first, end).

        Runs are whole (they may start before ``first`` or end after ``end``).
        """
        return self.map.runs(first, end)

    def read(self, offset: int, length: int) -> memoryview | bytes | bytearray:
        """Return up to ``length`` bytes at ``offset``; holes read as zeros, EOF shortens.

        A range inside one run comes back as a view of the arena, without a copy; the caller
        must not keep it past the request.

        Runtime complexity: O(log e + k) for k runs touched, plus the copy when k > 1.
        """
        size = self.size
        if offset >= size or length <= 0:
            return b""
        length = min(length, size - offset)
        end = offset + length
        first, end_page = pages_spanned(offset, length)
        run = self.map.floor(first)
        if run is not None:
            page, arena_page, count = run
            if (page + count) << PAGE_SHIFT >= end:
                start = (arena_page << PAGE_SHIFT) + offset - (page << PAGE_SHIFT)
                return self._arena.view[start : start + length]
        buffer = bytearray(length)
        view = self._arena.view
        for page, arena_page, count in self._runs(first, end_page):
            lo = max(offset, page << PAGE_SHIFT)
            hi = min(end, (page + count) << PAGE_SHIFT)
            source = (arena_page << PAGE_SHIFT) + lo - (page << PAGE_SHIFT)
            buffer[lo - offset : hi - offset] = view[source : source + hi - lo]
        return buffer

    def write(self, offset: int, data: bytes | memoryview) -> int:
        """Store ``data`` at ``offset``, growing the file as needed; return the bytes written.

        Pages for holes are allocated first, all or nothing, so a write that does not fit
        changes nothing. Should the system run out of memory partway through the copy, the
        write is short, as on tmpfs; if it takes no byte, OSError, and the pages allocated
        stay (zeros, past the size or in holes).

        Raises:
            OSError: ENOSPC when the arena cannot hold the new pages; EFBIG past the
                largest file size; ENOMEM when the system has no memory for the first bytes.

        Runtime complexity: O(log e + k) for k runs touched, plus the copy.
        """
        length = len(data)
        if length == 0:
            return 0
        end = offset + length
        if end > MAX_FILE_SIZE:
            raise OSError(errno.EFBIG, "write past the largest file size")
        first, end_page = pages_spanned(offset, length)
        with self.map:
            run = self.map.floor(first)
            if run is None or run[0] + run[2] < end_page:
                self._allocate(first, end_page)
                run = self.map.floor(first)
                assert run is not None
            page, arena_page, count = run
            arena = self._arena
            if page + count >= end_page:
                written = arena.write(
                    (arena_page << PAGE_SHIFT) + offset - (page << PAGE_SHIFT), data
                )
            else:
                source = memoryview(data)
                written = 0
                for page, arena_page, count in self._runs(first, end_page):
                    lo = max(offset, page << PAGE_SHIFT)
                    hi = min(end, (page + count) << PAGE_SHIFT)
                    target = (arena_page << PAGE_SHIFT) + lo - (page << PAGE_SHIFT)
                    try:
                        piece = arena.write(target, source[lo - offset : hi - offset])
                    except OSError:
                        if not written:
                            raise
                        break
                    written += piece
                    if piece < hi - lo:
                        break
            # Out of memory partway: a short write, as on tmpfs.
            end = offset + written
            if self._unwritten:
                remove_interval(self._unwritten, *pages_spanned(offset, written))
                self._note_unwritten()
            self.map.size = max(self.map.size, end)
        return written

    def holes(self, first: int, end: int) -> list[tuple[int, int]]:
        """Return the ``(page, count)`` runs of [first, end) that hold no page.

        Runtime complexity: O(log e + k) for k runs in the interval.
        """
        holes: list[tuple[int, int]] = []
        cursor = first
        for page, _arena_page, count in self._runs(first, end):
            if page > cursor:
                holes.append((cursor, page - cursor))
            cursor = max(cursor, page + count)
        if cursor < end:
            holes.append((cursor, end - cursor))
        return holes

    def _allocate(self, first: int, end: int) -> None:
        """Give every hole of [first, end) arena pages, all or nothing. Holding the lock."""
        holes = self.holes(first, end)
        needed = sum(count for _page, count in holes)
        self._arena.ensure_free(needed)
        for page, count in holes:
            hint = None
            previous = self.map.floor(page - 1) if page else None
            if previous is not None and previous[0] + previous[2] == page:
                hint = previous[1] + previous[2]
            target = page
            for arena_page, run in self._arena.allocate(count, hint):
                self.map.insert(target, arena_page, run)
                target += run

    def release_pages(self, first: int, end: int) -> int:
        """Free every held page in [first, end), splitting runs at the edges.

        Returns:
            The number of pages freed.

        Runtime complexity: O(log e + k) for k runs touched, plus the kernel's work.
        """
        freed = 0
        with self.map:
            for arena_page, count in self.map.remove(first, end):
                self._arena.release(arena_page, count)
                freed += count
            if self._unwritten:
                remove_interval(self._unwritten, first, end)
                self._note_unwritten()
        return freed

    def allocate(self, offset: int, length: int) -> None:
        """Give every hole of a byte range zeroed pages (fallocate), all or nothing.

        Raises:
            OSError: ENOSPC if they do not fit; EFBIG past the largest file size.
        """
        if offset + length > MAX_FILE_SIZE:
            raise OSError(errno.EFBIG, "range past the largest file size")
        first, end = pages_spanned(offset, length)
        with self.map:
            holes = self.holes(first, end)
            self._allocate(first, end)
            if self._unwritten is None:
                self._unwritten = SortedDict()
            for page, count in holes:
                add_interval(self._unwritten, page, page + count)
            self._note_unwritten()

    def punch(self, offset: int, length: int) -> None:
        """Make a byte range read as zeros, freeing the pages it covers whole."""
        end = offset + length
        first_whole = pages_for(offset)
        end_whole = end >> PAGE_SHIFT
        with self.map:
            if first_whole < end_whole:
                self.release_pages(first_whole, end_whole)
                self.zero(offset, (first_whole << PAGE_SHIFT) - offset)
                self.zero(end_whole << PAGE_SHIFT, end - (end_whole << PAGE_SHIFT))
            else:
                self.zero(offset, length)

    def _runs_from(self, first: int) -> Iterator[tuple[int, int, int]]:
        """Yield the held runs from the one overlapping ``first`` on, fetched a few at a time:
        a caller that stops early costs O(log e), not O(e)."""
        while True:
            runs = self.map.runs(first, NO_PAGE, _RUNS_FETCHED)
            yield from runs
            if len(runs) < _RUNS_FETCHED:
                return
            first = runs[-1][0] + runs[-1][2]

    def _data(self, first: int) -> Iterator[tuple[int, int]]:
        """Yield the page intervals from ``first`` on that hold written data, in order."""
        unwritten = self._unwritten
        for page, _arena_page, count in self._runs_from(first):
            lo = max(page, first)
            if not unwritten:
                yield lo, page + count
                continue
            for hole_lo, hole_hi in clip(unwritten, lo, page + count):
                if hole_lo > lo:
                    yield lo, hole_lo
                lo = hole_hi
            if lo < page + count:
                yield lo, page + count

    def seek_data(self, offset: int) -> int | None:
        """The first offset at or after ``offset`` holding data, or None (SEEK_DATA).

        Runtime complexity: O(log e) plus the reserved runs skipped.
        """
        if offset >= self.size:
            return None
        for lo, _hi in self._data(offset >> PAGE_SHIFT):
            found = max(offset, lo << PAGE_SHIFT)
            return found if found < self.size else None
        return None

    def seek_hole(self, offset: int) -> int | None:
        """The first offset at or after ``offset`` in a hole or at EOF, or None (SEEK_HOLE).

        Runtime complexity: O(log e + k) for k runs of contiguous data crossed.
        """
        if offset >= self.size:
            return None
        cursor = offset >> PAGE_SHIFT
        for lo, hi in self._data(cursor):
            if lo > cursor:
                break
            cursor = hi
        return min(max(offset, cursor << PAGE_SHIFT), self.size)

    def tail_start(self, first: int, end: int, wanted: int) -> int:
        """Return the highest page p >= first such that [p, end) holds ``wanted`` pages.

        If all of [first, end) holds fewer, return ``first``. Used to purge a PARTIAL range
        from its end, only as much as needed.

        Runtime complexity: O(k log e) for the k runs from ``end`` back to where the
        wanted pages are found (not all the runs of the interval).
        """
        run = self.map.floor(end - 1)
        while run is not None:
            page, _arena_page, count = run
            if page + count <= first:
                break
            lo, hi = max(page, first), min(page + count, end)
            if hi - lo >= wanted:
                return hi - wanted
            wanted -= hi - lo
            run = self.map.floor(page - 1) if page else None
        return first

    def zero(self, offset: int, length: int) -> None:
        """Write zeros over held pages in a byte range, leaving holes as they are."""
        end = offset + length
        first, end_page = pages_spanned(offset, length)
        with self.map:
            for page, arena_page, count in self._runs(first, end_page):
                lo = max(offset, page << PAGE_SHIFT)
                hi = min(end, (page + count) << PAGE_SHIFT)
                self._arena.zero((arena_page << PAGE_SHIFT) + lo - (page << PAGE_SHIFT), hi - lo)

    def truncate(self, size: int) -> None:
        """Set the logical size; shrinking frees the pages past it and zeros the tail page.

        Growing allocates nothing: the new bytes are a hole and read as zeros.

        Raises:
            OSError: EFBIG past the largest file size; ENOMEM if the kernel cannot take the
                zeros of the tail page (nothing changes then).
        """
        if size > MAX_FILE_SIZE or size < 0:
            raise OSError(errno.EFBIG, "size past the largest file size")
        with self.map:
            if size < self.size:
                if size & (PAGE_SIZE - 1):
                    # The rest of the last page kept must read as zeros if the file grows.
                    # First: if the kernel cannot take the zeros, nothing has changed yet.
                    self.zero(size, PAGE_SIZE - (size & (PAGE_SIZE - 1)))
                # To the end of the map, not of the old size: fallocate may have left pages
                # past EOF.
                self.release_pages(pages_for(size), NO_PAGE)
            self.map.size = size

    def clear(self) -> None:
        """Free every page and set the size to zero."""
        self.truncate(0)

    def _check(self) -> None:
        """Assert the run map's invariants. Runtime complexity: O(e)."""
        previous: tuple[int, int, int] | None = None
        total = 0
        for page, arena_page, count in self.map.items():
            assert count > 0
            assert arena_page >= 0 and arena_page + count <= self._arena.capacity_pages
            if previous is not None:
                prev_page, prev_arena, prev_count = previous
                assert prev_page + prev_count <= page, "runs overlap"
                assert not (
                    prev_page + prev_count == page and prev_arena + prev_count == arena_page
                ), "mergeable runs left apart"
            previous = (page, arena_page, count)
            total += count
        assert total == self.pages, (total, self.pages)
        for lo, hi in (self._unwritten or {}).items():
            assert not self.holes(lo, hi), "reserved pages that are not held"
        assert bool(self.map.holds & HOLD_RESERVED) == bool(self._unwritten)


class Store:
    """All file contents of one mount, within a size cap.

    The cap is the arena's capacity: every held page counts against it, free pages do not.
    While :meth:`run_reclaimer` runs, memory released by truncation and deletion is returned
    to the system in the background, large releases in a worker thread, so the event loop is
    never held up by them.
    """

    def __init__(self, capacity_bytes: int) -> None:
        """Create a store holding at most ``capacity_bytes`` (rounded down to pages)."""
        self.arena = Arena(capacity_bytes >> PAGE_SHIFT)
        #: The page maps of the files the bridge's request threads may serve, by inode.
        self.table = PageTable()
        #: Bytes held outside the arena and charged to the cap (symlink targets, attributes).
        self.charged_bytes = 0
        self._wakeup = trio.Event()
        self._reclaimed = trio.Event()
        #: The pages removed inodes (no name, no handle) the kernel still holds keep, by inode
        #: (a file's contents, a symlink's long target, or none but an inode slot): they come
        #: back when the kernel forgets them, a moment later.
        self._unforgotten: dict[int, int] = {}
        self._unforgotten_pages = 0
        self._forget_waiters = 0
        self._forgotten = trio.Event()
        #: Forgets the kernel has sent that are not taken yet: what removed inodes among them
        #: hold is on its way back.
        self.forgets_queued = 0

    def charge(self, nbytes: int) -> None:
        """Count ``nbytes`` the daemon holds outside the arena against the cap.

        The cap is kept in pages, so charges are added up and reserved a page at a time.

        Raises:
            OSError: ENOSPC if the cap has no room for them; nothing is charged then.
        """
        pages = pages_for(self.charged_bytes + nbytes) - self.arena.reserved_pages
        if pages > 0:
            self.arena.reserve(pages)
        self.charged_bytes += nbytes

    def uncharge(self, nbytes: int) -> None:
        """Give back a charge made with :meth:`charge`."""
        self.charged_bytes -= nbytes
        assert self.charged_bytes >= 0
        surplus = self.arena.reserved_pages - pages_for(self.charged_bytes)
        if surplus > 0:
            self.arena.unreserve(surplus)

    def new_file(self, ino: int | None = None, times: Times | None = None) -> FileContents:
        """Return empty contents for a new regular file, its timestamps from ``times``.

        With ``ino``, the bridge's request threads may serve the file's reads and writes
        (see :attr:`table`) until the contents are freed or :meth:`forget_file` is called.
        """
        contents = FileContents(self.arena, times)
        if ino is not None:
            self.table.add(ino, contents.map)
        return contents

    def forget_file(self, ino: int) -> None:
        """Serve no more requests for ``ino`` outside Python."""
        self.table.discard(ino)

    def note_unforgotten(self, ino: int, pages: int) -> None:
        """Note that removed inode ``ino`` keeps ``pages`` until :meth:`note_forgotten`
        (noting it again replaces the count)."""
        self._unforgotten_pages += pages - self._unforgotten.get(ino, 0)
        self._unforgotten[ino] = pages

    def note_reopened(self, ino: int) -> None:
        """Removed inode ``ino`` was opened again: what it keeps is not on its way back."""
        self._unforgotten_pages -= self._unforgotten.pop(ino, 0)

    def note_forgotten(self, ino: int) -> None:
        """Inode ``ino``'s memory is freed: wake whoever waits for removed inodes' memory."""
        pages = self._unforgotten.pop(ino, None)
        if pages is not None:
            self._unforgotten_pages -= pages
            self._wake_forgotten()

    def note_forgets_queued(self, count: int) -> None:
        """``count`` forgets were queued, or taken if negative (which wakes whoever waits
        for removed inodes' memory)."""
        self.forgets_queued += count
        if count < 0:
            self._wake_forgotten()

    def _wake_forgotten(self) -> None:
        self._forgotten.set()
        self._forgotten = trio.Event()

    @property
    def unforgotten_pages(self) -> int:
        """Pages held by removed inodes the kernel has not forgotten yet, as last noted.

        Runtime complexity: O(1): a program may hold as many removed inodes as
        ``nr_inodes`` allows (O_PATH descriptors).
        """
        return self._unforgotten_pages

    async def wait_forgotten(self, deadline: float) -> bool:
        """Wait for removed inodes to be freed: until one is or queued forgets were taken;
        while none is queued, only until ``deadline`` (trio's clock).

        Returns:
            False, having waited for nothing, if no forget is queued and ``deadline`` has
            passed or :data:`FORGET_WAITERS` requests wait so already: each holds one of the
            daemon's request workers meanwhile, which all users share, and a program may
            hold removed inodes for good. Waits while forgets are queued end as the daemon
            takes them, so they are neither timed nor bounded.
        """
        bounded = not self.forgets_queued
        if bounded and (trio.current_time() >= deadline or self._forget_waiters >= FORGET_WAITERS):
            await trio.lowlevel.checkpoint()
            return False
        counted = int(bounded)
        self._forget_waiters += counted
        try:
            with trio.move_on_at(deadline if bounded else math.inf):
                await self._forgotten.wait()
        finally:
            self._forget_waiters -= counted
        return True

    @property
    def capacity_bytes(self) -> int:
        """The size cap in bytes."""
        return self.arena.capacity_pages << PAGE_SHIFT

    @property
    def used_bytes(self) -> int:
        """Bytes of memory held by file contents."""
        return self.arena.used_pages << PAGE_SHIFT

    def shortfall(self, contents: FileContents, first: int, end: int) -> int:
        """Pages that filling the holes of [first, end) in ``contents`` lacks: those not free
        now and not on their way back either (released, or being punched by the reclaimer).

        Raises:
            OSError: ENOSPC if the span is larger than the whole store (nothing can make room).

        Runtime complexity: O(log e + k) for the k runs of the span.
        """
        arena = self.arena
        if end - first > arena.capacity_pages:
            raise OSError(errno.ENOSPC, "more than the whole filesystem")
        holes = sum(count for _page, count in contents.holes(first, end))
        return holes - arena.available_pages - arena.dirty_pages - arena.punching_pages

    @property
    def reclaim_pending(self) -> bool:
        """True while released memory is still on its way back to the free space."""
        return bool(self.arena.dirty_pages or self.arena.punching_pages)

    async def wait_reclaimed(self) -> None:
        """Wait until the reclaimer has finished its current round."""
        if self.reclaim_pending:
            await self._reclaimed.wait()

    async def run_reclaimer(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Punch released pages as they come, until cancelled."""
        arena = self.arena
        arena.on_release = self._wakeup.set
        with WorkerThread("volfs-reclaimer") as worker:
            task_status.started()
            try:
                while True:
                    await self._wakeup.wait()
                    self._wakeup = trio.Event()
                    arena.on_release = self._wakeup.set
                    runs = arena.take_dirty()
                    if sum(count for _start, count in runs) <= INLINE_PUNCH_PAGES:
                        arena.punch(runs)
                    else:
                        await worker.run(functools.partial(arena.punch, runs))
                    for start in range(0, len(runs), GIVE_BACK_RUNS):
                        if start:
                            # Not cancellable: a run taken must be given back.
                            await trio.lowlevel.cancel_shielded_checkpoint()
                        arena.give_back(runs[start : start + GIVE_BACK_RUNS])
                    self._reclaimed.set()
                    self._reclaimed = trio.Event()
            finally:
                arena.on_release = None
                arena._punch_dirty_now()

    def close(self) -> None:
        """Give all memory back; the store is unusable afterwards."""
        self.arena.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
