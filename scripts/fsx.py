#!/usr/bin/env python3
"""fsx for volfs: random operations on one file, checked against an in-memory model.

In the spirit of the classic fsx (file system exerciser), one file is driven by seeded random
operations and every result is compared with a reference model of what the file must hold:

  read         pread(2) of a random span
  write        pwrite(2) of random bytes, growing the file as it goes
  mapread      read a span through mmap(MAP_SHARED), in a child process
  mapwrite     write a span through mmap(MAP_SHARED) in a child process, then msync(MS_SYNC);
               or no msync, and munmap writes the pages back; or no msync while the child
               keeps the mapping across a purge of everything, which writes back the dirty
               pages it drops from the kernel's cache and so repopulates them
  truncate     ftruncate(2) up or down
  otrunc       open(2) with O_TRUNC (rarely)
  punch        fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
  fallocate    fallocate(2) with mode 0 (may grow the file) or FALLOC_FL_KEEP_SIZE
  zero         fallocate(FALLOC_FL_ZERO_RANGE) (volfs only; tmpfs lacks it)
  fsync        fsync(2)
  volatile     VOLFS_IOC_VRANGE VOLATILE of a page span, FULL or PARTIAL (now and then from
               another process, through a descriptor of its own, as nonvolatile too)
  nonvolatile  VOLFS_IOC_VRANGE NON_VOLATILE: ``purged`` must be what the model predicts
  status       VOLFS_IOC_VRANGE_STATUS of a span: volatile and purged bytes as the model says
  badspan      an invalid VRANGE request (unaligned, past EOF, read-only descriptor): EINVAL
               or EBADF, and nothing changes
  purge        VOLFS_IOC_PURGE of everything, or of a random number of bytes
  probe        a child reads a purged page through mmap: it must die of SIGBUS (with
               --purged-zero, for a mount with purged=zero: read zeros, as every read does)
  reopen       close every descriptor (the last close ends all volatility) and open again
  reopen1      close and reopen one of two read-write descriptors (volatility stays)
  verify       read the whole file and compare, page by page

The model follows the semantics the README's "Volatile ranges" section gives: volatile ranges
per inode, merged when they overlap (purged if either was), split by NON_VOLATILE; purged pages
read as zeros once unmarked and fail with EIO (mmap: SIGBUS) until then or until rewritten;
writes, punches and zeroing repopulate purged pages; truncation trims the ranges; the last close
drops the ranges, and pages purged before it stay lost.
A purge of everything must take every range that holds purgeable data. A partial purge may
take any ranges, so after one the model learns what was taken from VRANGE_STATUS, and checks
that it was allowed: only ranges that held purgeable data, a FULL range whole, a PARTIAL range
from its end, least recently marked first, and no fewer bytes than asked while any are left.
A read of a purged span may also return the intact bytes before it (the kernel stops at the
error), never other bytes.

The run stops at the first mismatch and prints the tail of the operation log, the first
differing offset with the expected and actual bytes, and the model's ranges; exit status 1.

Purges must come only from fsx: run it on a mount of its own (the default: it mounts a volfs
with ``pressure=off`` and a cap far above ``--max-size``), or on a mount where nothing else
marks ranges volatile and memory pressure cannot strike. ``--plain`` runs the operations that
do not need volfs on any filesystem (a tmpfs, say), as a check of the model itself.

Usage:
  python scripts/fsx.py --seed 1 --ops 20000                # on a volfs mounted for the run
  python scripts/fsx.py --seed 7 --duration 3600            # a long run
  python scripts/fsx.py --file /mnt/vol/fsx.bin --ops 5000  # on an existing volfs mount
  python scripts/fsx.py --plain --file /dev/shm/fsx.bin     # the model against tmpfs
  python scripts/fsx.py --purged-zero --seed 3              # a mount with purged=zero

Exit status: 0 if every operation matched the model (and the daemon fsx mounted exited 0
without logging an exception), 1 on a mismatch, 2 for usage errors.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import errno
import itertools
import json
import mmap
import os
import random
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import volfs_mounts

from volfs.abi import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    PAGE_SIZE,
    pages_spanned,
)
from volfs.client import (
    VRANGE_FULL,
    VRANGE_NONVOLATILE,
    VRANGE_PARTIAL,
    VRANGE_VOLATILE,
    fvrange,
    purge,
    statistics,
    vrange_status,
)

PAGE = PAGE_SIZE
#: Operation log lines kept for a failure report.
LOG_TAIL = 40

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]

#: Relative frequency of each operation.
WEIGHTS: dict[str, int] = {
    "read": 12,
    "write": 14,
    "mapread": 5,
    "mapwrite": 5,
    "truncate": 5,
    "otrunc": 1,
    "punch": 4,
    "fallocate": 3,
    "zero": 2,
    "fsync": 1,
    "volatile": 12,
    "nonvolatile": 9,
    "status": 4,
    "badspan": 1,
    "purge": 3,
    "probe": 2,
    "reopen": 1,
    "reopen1": 1,
    "verify": 1,
}
#: Operations that need volfs (dropped by --plain).
VOLFS_ONLY = frozenset({"zero", "volatile", "nonvolatile", "status", "badspan", "purge", "probe"})

# The odds of the random choices within operations, each the chance of the case it names.
#: A write goes through the first of the two read-write descriptors (else the second).
FIRST_WRITER_CHANCE = 0.5
#: Where an offset falls: within the file, at or next to a page boundary, or anywhere below
#: --max-size; cumulative chances, as random.choices takes them.
OFFSET_ODDS = {"within": 0.6, "page boundary": 0.85, "anywhere": 1.0}
#: How long a span is: up to 512 bytes, up to 4 pages, or up to 16 pages (cumulative).
LENGTH_ODDS = {"bytes": 0.5, "pages": 0.8, "many pages": 1.0}
#: A page span asks for everything up to EOF (length 0).
SPAN_TO_EOF_CHANCE = 0.15
#: Otherwise it is at most 4 pages long (else it ends anywhere up to EOF).
SHORT_SPAN_CHANCE = 0.6
#: A truncation stays within the current size (else anywhere below --max-size).
TRUNCATE_WITHIN_CHANCE = 0.5
#: fallocate keeps the size (FALLOC_FL_KEEP_SIZE).
KEEP_SIZE_CHANCE = 0.5
#: A range is marked PARTIAL (else FULL).
PARTIAL_CHANCE = 0.4
#: NON_VOLATILE unmarks (part of) a marked range (else a random span).
UNMARK_A_RANGE_CHANCE = 0.5
#: VRANGE goes through our own descriptor (else another process opens the file for it).
VRANGE_HERE_CHANCE = 0.85
#: A purge asks for everything (else for 1 to 16 pages).
PURGE_ALL_CHANCE = 0.4


class MismatchError(Exception):
    """The file did something the model says it must not."""

    def __init__(
        self, message: str, offset: int | None = None, expected: bytes = b"", got: bytes = b""
    ) -> None:
        super().__init__(message)
        self.offset = offset
        self.expected = expected
        self.got = got


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with a mode, which the os module does not offer."""
    if _libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def pick(rng: random.Random, odds: dict[str, float]) -> str:
    """One case of ``odds`` (cumulative chances), drawn with one ``rng.random()``."""
    return rng.choices(tuple(odds), cum_weights=tuple(odds.values()))[0]


def errno_name(error: OSError) -> str:
    """``EIO`` for an OSError with errno 5, and so on."""
    return errno.errorcode.get(error.errno or 0, str(error.errno))


def first_difference(expected: bytes, got: bytes) -> int:
    """Index of the first byte that differs (or the shorter length)."""
    for index, (want, have) in enumerate(zip(expected, got, strict=False)):
        if want != have:
            return index
    return min(len(expected), len(got))


# -- the model --------------------------------------------------------------------------------


@dataclass(slots=True)
class ModelRange:
    """A volatile range as the semantics define it: pages [start, end) marked together."""

    start: int
    end: int
    partial: bool
    #: Some of it was purged since it was marked (NON_VOLATILE reports purged=1).
    purged: bool
    #: It may hold data a purge can take (not purged, or rewritten since).
    tracked: bool
    #: When it was marked: purges take the least recently marked first.
    stamp: int

    def pages(self) -> range:
        """Its page numbers."""
        return range(self.start, self.end)


@dataclass
class PurgeFindings:
    """What one purge did to the model's ranges, as VRANGE_STATUS shows it."""

    #: Each range the purge took from, and the first page it took.
    taken: list[tuple[ModelRange, int]] = field(default_factory=list)
    #: Pages this purge purged.
    newly: set[int] = field(default_factory=set)
    #: Dirty pages of ranges taken whole that the purge wrote back, repopulating them.
    survivors: set[int] = field(default_factory=set)
    #: Pages purged before that their dirty mmap contents, written back at last, rewrote.
    written_back: set[int] = field(default_factory=set)


@dataclass
class Model:
    """What the file must hold, and its volatile ranges and purged (lost) pages."""

    data: bytearray = field(default_factory=bytearray)
    ranges: list[ModelRange] = field(default_factory=list)
    #: Pages purged and not rewritten or unmarked since: reads fail with EIO.
    lost: set[int] = field(default_factory=set)
    #: Pages written through mmap without msync: the kernel may not have written them back.
    dirty: set[int] = field(default_factory=set)
    _stamps: Iterator[int] = field(default_factory=itertools.count)

    @property
    def size(self) -> int:
        """The file's size."""
        return len(self.data)

    @property
    def eof_pages(self) -> int:
        """Pages up to the page-rounded end of the file."""
        return (len(self.data) + PAGE - 1) // PAGE

    def volatile_pages(self) -> int:
        """Pages in volatile ranges."""
        return sum(r.end - r.start for r in self.ranges)

    def overlapping(self, first: int, end: int) -> list[ModelRange]:
        """Ranges sharing a page with [first, end)."""
        return [r for r in self.ranges if r.start < end and r.end > first]

    def status(self, first: int, end: int) -> tuple[int, int]:
        """``(volatile pages, lost pages)`` within [first, end)."""
        volatile = sum(min(r.end, end) - max(r.start, first) for r in self.overlapping(first, end))
        lost = sum(1 for page in self.lost if first <= page < end)
        return volatile, lost

    def is_volatile(self, page: int) -> bool:
        """True if ``page`` lies in a volatile range."""
        return bool(self.overlapping(page, page + 1))

    def mark_volatile(self, first: int, end: int, *, partial: bool) -> None:
        """Overlapping ranges merge: purged if any was (or holds a lost page), FULL if any was;
        touching ones don't."""
        if first >= end:
            return
        merged = ModelRange(first, end, partial, False, True, next(self._stamps))
        for overlapped in self.overlapping(first, end):
            merged.start = min(merged.start, overlapped.start)
            merged.end = max(merged.end, overlapped.end)
            merged.purged = merged.purged or overlapped.purged
            merged.partial = merged.partial and overlapped.partial
            self.ranges.remove(overlapped)
        # Pages lost before (in an earlier volatility, never reported) make it purged too.
        merged.purged = merged.purged or any(merged.start <= p < merged.end for p in self.lost)
        self._insert(merged)

    def mark_nonvolatile(self, first: int, end: int) -> bool:
        """Unmark [first, end); return whether any of it had been purged and not reported."""
        if first >= end:
            return False
        purged = any(first <= page < end for page in self.lost)
        for overlapped in self.overlapping(first, end):
            purged = purged or overlapped.purged
            self.ranges.remove(overlapped)
            if overlapped.start < first:
                self._insert(self._piece(overlapped, overlapped.start, first))
            if overlapped.end > end:
                self._insert(self._piece(overlapped, end, overlapped.end))
        self.lost = {page for page in self.lost if not first <= page < end}
        return purged

    def rewritten(self, first: int, end: int) -> None:
        """Pages [first, end) were written: no longer lost, their ranges purgeable again."""
        if first >= end:
            return
        self.lost = {page for page in self.lost if not first <= page < end}
        for overlapped in self.overlapping(first, end):
            overlapped.tracked = True

    def write(self, offset: int, data: bytes, *, reaches_daemon: bool = True) -> None:
        """pwrite(2), or a write through mmap.

        Args:
            reaches_daemon: False for mmap pages left dirty: the page cache holds the bytes,
                the daemon learns of them only when the kernel writes the pages back.
        """
        if offset > self.size:
            self.data.extend(bytes(offset - self.size))
        self.data[offset : offset + len(data)] = data
        if reaches_daemon:
            self.rewritten(*pages_spanned(offset, len(data)))

    def truncate(self, size: int) -> None:
        """ftruncate(2): the ranges past the new end go."""
        if size < self.size:
            del self.data[size:]
        else:
            self.data.extend(bytes(size - self.size))
        self.mark_nonvolatile(self.eof_pages, 1 << 62)
        self.dirty = {page for page in self.dirty if page < self.eof_pages}

    def zero(self, offset: int, length: int) -> None:
        """Bytes that read as zeros from now on (within the file)."""
        end = min(offset + length, self.size)
        if offset < end:
            self.data[offset:end] = bytes(end - offset)

    def punch(self, offset: int, length: int) -> None:
        """FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE: zeros; whole pages count as rewritten."""
        self.zero(offset, length)
        self.rewritten((offset + PAGE - 1) // PAGE, (offset + length) // PAGE)

    def zero_range(self, offset: int, length: int) -> None:
        """FALLOC_FL_ZERO_RANGE without KEEP_SIZE: may grow the file."""
        self.allocate(offset, length, keep_size=False)
        self.punch(offset, length)

    def allocate(self, offset: int, length: int, *, keep_size: bool) -> None:
        """fallocate mode 0 grows the file to cover the span; KEEP_SIZE changes nothing."""
        if not keep_size and offset + length > self.size:
            self.data.extend(bytes(offset + length - self.size))

    def lose(self, pages: set[int]) -> None:
        """A purge took ``pages``: they read as zeros (and fail while volatile)."""
        self.lost |= pages
        for page in pages:
            self.zero(page * PAGE, PAGE)

    def close_all(self) -> None:
        """The last close: every range goes; purged pages stay lost until reported."""
        self.ranges.clear()

    def _piece(self, source: ModelRange, start: int, end: int) -> ModelRange:
        return ModelRange(start, end, source.partial, source.purged, source.tracked, source.stamp)

    def _insert(self, volatile_range: ModelRange) -> None:
        self.ranges.append(volatile_range)
        self.ranges.sort(key=lambda r: r.start)

    def describe(self) -> str:
        """The ranges and lost pages, for a failure report."""
        ranges = ", ".join(
            f"[{r.start},{r.end}){'P' if r.partial else 'F'}"
            f"{' purged' if r.purged else ''}{'' if r.tracked else ' untracked'} #{r.stamp}"
            for r in self.ranges
        )
        return (
            f"size={self.size} ({self.eof_pages} pages); ranges (pages): {ranges or 'none'}; "
            f"lost pages: {sorted(self.lost) or 'none'}"
        )


# -- the exerciser ----------------------------------------------------------------------------


@dataclass
class Settings:
    """What one run does."""

    path: Path
    seed: int
    ops: int | None
    duration: float | None
    max_size: int
    plain: bool
    #: The mount has ``purged=zero``: purged pages read as zeros instead of failing.
    purged_zero: bool = False
    corrupt_at: int | None = None


class Exerciser:
    """Runs seeded random operations on one file and checks each against the model."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.random = random.Random(settings.seed)
        self.model = Model()
        self.log: collections.deque[str] = collections.deque(maxlen=LOG_TAIL)
        self.counts: collections.Counter[str] = collections.Counter()
        self.step = 0
        weights = {
            name: weight
            for name, weight in WEIGHTS.items()
            if not (settings.plain and name in VOLFS_ONLY)
        }
        self._names = list(weights)
        self._weights = list(weights.values())
        path = settings.path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.fd2 = os.open(path, os.O_RDWR)
        self.reader = os.open(path, os.O_RDONLY)

    # -- helpers ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close every descriptor."""
        for fd in (self.fd, self.fd2, self.reader):
            with contextlib.suppress(OSError):
                os.close(fd)

    def note(self, text: str) -> None:
        """Add a line to the operation log."""
        self.log.append(f"{self.step:7d} {text}")

    def writer(self) -> int:
        """One of the two read-write descriptors (both see and change the same ranges)."""
        return self.fd if self.random.random() < FIRST_WRITER_CHANCE else self.fd2

    def offset(self) -> int:
        """A byte offset, mostly inside the file, often at or near a page boundary."""
        limit = max(self.model.size, 1)
        where = pick(self.random, OFFSET_ODDS)
        if where == "within":
            offset = self.random.randrange(limit)
        elif where == "page boundary":
            offset = self.random.randrange(limit // PAGE + 2) * PAGE + self.random.choice(
                (0, 0, -1, 1)
            )
        else:
            offset = self.random.randrange(self.settings.max_size)
        return max(0, min(offset, self.settings.max_size - 1))

    def length(self, offset: int) -> int:
        """A length fitting under --max-size from ``offset``: mostly small, sometimes pages."""
        room = self.settings.max_size - offset
        size = pick(self.random, LENGTH_ODDS)
        if size == "bytes":
            length = self.random.randint(1, 512)
        elif size == "pages":
            length = self.random.randint(1, 4 * PAGE)
        else:
            length = self.random.randint(1, 16 * PAGE)
        return max(1, min(length, room))

    def page_span(self) -> tuple[int, int, int]:
        """A span within the page-rounded EOF as pages ``(first, end, length asked)``.

        A length of 0 asks for everything up to the page-rounded EOF: ``end`` is that then.
        """
        eof = self.model.eof_pages
        first = self.random.randrange(eof + 1)
        if self.random.random() < SPAN_TO_EOF_CHANCE:
            return first, eof, 0
        if self.random.random() < SHORT_SPAN_CHANCE:
            end = min(eof, first + self.random.randint(1, 4))
        else:
            end = self.random.randint(first, eof)
        if end == first:
            return first, eof, 0  # an empty span would ask for everything to EOF
        return first, end, end - first

    def stat_size(self) -> None:
        """The size the kernel reports must be the model's."""
        size = os.fstat(self.fd).st_size
        if size != self.model.size:
            raise MismatchError(f"st_size is {size}, the model says {self.model.size}")

    def expect_bytes(self, offset: int, got: bytes, what: str) -> None:
        """``got`` must be the model's bytes at ``offset``."""
        expected = bytes(self.model.data[offset : offset + len(got)])
        if got != expected:
            index = first_difference(expected, got)
            raise MismatchError(
                f"{what}: wrong data", offset + index, expected[index:], got[index : index + 64]
            )

    def failing(self) -> set[int]:
        """Pages whose reads fail: the lost ones, unless the mount has purged=zero."""
        return set() if self.settings.purged_zero else self.model.lost

    def first_lost(self, offset: int, end: int) -> int | None:
        """The first page touching bytes [offset, end) whose reads fail, if any."""
        first, last = pages_spanned(offset, end - offset)
        lost = [page for page in self.failing() if first <= page < last]
        return min(lost) if lost else None

    def check_read(self, offset: int, length: int, result: bytes | OSError, what: str) -> None:
        """A read must give the model's bytes; if it touches lost pages, EIO or what precedes."""
        end = min(offset + length, self.model.size)
        lost = self.first_lost(offset, end) if offset < end else None
        if isinstance(result, OSError):
            if result.errno == errno.EIO and lost is not None:
                self.counts[f"{what} EIO"] += 1
                return
            raise MismatchError(f"{what} of {length} at {offset} failed: {result}")
        if lost is None:
            if len(result) != max(0, end - offset):
                raise MismatchError(
                    f"{what} of {length} at {offset} returned {len(result)} bytes, "
                    f"expected {max(0, end - offset)}"
                )
            self.expect_bytes(offset, result, what)
            return
        # Purged pages ahead: the intact bytes before them, never more, never an early EOF.
        limit = lost * PAGE - offset
        if not 0 < len(result) <= limit:
            raise MismatchError(
                f"{what} of {length} at {offset} returned {len(result)} bytes; page {lost} "
                f"is purged, so EIO or 1..{max(limit, 0)} intact bytes were due",
                lost * PAGE,
                b"<EIO>",
                result[max(limit, 0) : max(limit, 0) + 64],
            )
        self.counts[f"{what} cut short"] += 1
        self.expect_bytes(offset, result, what)

    def in_child(self, action: Callable[[], bytes]) -> tuple[bytes | None, int]:
        """Run ``action`` in a forked child; return its output and its wait status.

        For mmap: a purged page kills the process touching it with SIGBUS, which fsx must
        survive to report.
        """
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            status = 1
            try:
                os.close(read_end)
                signal.signal(signal.SIGBUS, signal.SIG_DFL)
                payload = action()
                os.write(write_end, payload)
                status = 0
            finally:
                os._exit(status)
        os.close(write_end)
        chunks = []
        with os.fdopen(read_end, "rb") as pipe:
            while chunk := pipe.read():
                chunks.append(chunk)
        _pid, wait_status = os.waitpid(pid, 0)
        output = b"".join(chunks)
        return (output if os.waitstatus_to_exitcode(wait_status) == 0 else None), wait_status

    # -- operations ------------------------------------------------------------------------

    def op_read(self) -> None:
        offset, fd = self.offset(), self.random.choice((self.fd, self.fd2, self.reader))
        length = self.length(offset)
        try:
            result: bytes | OSError = os.pread(fd, length, offset)
        except OSError as error:
            result = error
        self.note(f"read {offset}+{length} -> {self._show(result)}")
        self.check_read(offset, length, result, "read")

    def op_write(self) -> None:
        offset = self.offset()
        data = self.random.randbytes(self.length(offset))
        written = os.pwrite(self.writer(), data, offset)
        self.note(f"write {offset}+{len(data)} -> {written}")
        if written != len(data):
            raise MismatchError(f"short write: {written} of {len(data)} at {offset}")
        self.model.write(offset, data)

    def _mappable_span(self) -> tuple[int, int] | None:
        """A span inside the file, cut short before any lost page (touching it is SIGBUS)."""
        if not self.model.size:
            return None
        offset = self.random.randrange(self.model.size)
        end = min(self.model.size, offset + self.length(offset))
        lost = self.first_lost(offset, end)
        if lost is not None:
            end = min(end, lost * PAGE)
        return (offset, end) if offset < end else None

    def op_mapread(self) -> None:
        span = self._mappable_span()
        if span is None:
            self.note("mapread: nothing mappable")
            return
        offset, end = span
        base = offset // PAGE * PAGE
        fd = self.fd

        def read() -> bytes:
            with mmap.mmap(fd, end - base, mmap.MAP_SHARED, mmap.PROT_READ, offset=base) as view:
                return view[offset - base : end - base]

        got, status = self.in_child(read)
        self.note(f"mapread {offset}+{end - offset} -> {self._show(got, status)}")
        if got is None:
            raise MismatchError(
                f"mmap read of {offset}+{end - offset} died: {self._status(status)}"
            )
        self.expect_bytes(offset, got, "mapread")
        if len(got) != end - offset:
            raise MismatchError(f"mapread returned {len(got)} of {end - offset} bytes")

    def op_mapwrite(self) -> None:
        span = self._mappable_span()
        if span is None:
            self.note("mapwrite: nothing mappable")
            return
        offset, end = span
        base = offset // PAGE * PAGE
        data = self.random.randbytes(end - offset)
        fd = self.fd
        # msync; or none, and munmap writes the pages back; or none while the mapping is
        # held across a purge of everything, which writes back what it drops.
        how = self.random.choices(
            ["msync", "munmap", "held"], [6, 2, 0 if self.settings.plain else 2]
        )[0]
        if how == "held":
            self._mapwrite_held(offset, end, data)
            return

        def write() -> bytes:
            with mmap.mmap(fd, end - base, mmap.MAP_SHARED, offset=base) as view:
                view[offset - base : end - base] = data
                if how == "msync":
                    view.flush()  # msync(MS_SYNC)
            return b"ok"

        got, status = self.in_child(write)
        self.note(f"mapwrite {offset}+{len(data)} ({how}) -> {self._show(got, status)}")
        if got != b"ok":
            raise MismatchError(f"mmap write of {offset}+{len(data)} died: {self._status(status)}")
        self.model.write(offset, data)

    def _mapwrite_held(self, offset: int, end: int, data: bytes) -> None:
        """A child writes through a mapping, keeps the pages dirty and mapped, and a purge of
        everything happens meanwhile; then the child unmaps and exits."""
        base = offset // PAGE * PAGE
        fd = self.fd
        ready_read, ready_write = os.pipe()
        go_read, go_write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            status = 1
            try:
                os.close(ready_read)
                os.close(go_write)
                signal.signal(signal.SIGBUS, signal.SIG_DFL)
                with mmap.mmap(fd, end - base, mmap.MAP_SHARED, offset=base) as view:
                    view[offset - base : end - base] = data
                    os.write(ready_write, b"r")
                    os.read(go_read, 1)
                status = 0
            finally:
                os._exit(status)
        os.close(ready_write)
        os.close(go_read)
        try:
            ready = os.read(ready_read, 1)
            self.note(f"mapwrite {offset}+{len(data)} (held) -> {'ok' if ready else 'died'}")
            if ready:
                self.model.write(offset, data, reaches_daemon=False)
                pages = set(range(*pages_spanned(offset, len(data))))
                self.model.dirty |= pages
                self.counts["mapwrite held across a purge"] += 1
                self.purge_now(0)
        finally:
            os.close(ready_read)
            os.close(go_write)  # the child unmaps and exits
            _pid, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise MismatchError(f"held mmap write of {offset}+{len(data)}: {self._status(status)}")
        # Unmapping wrote back what the purge left dirty: now the daemon has those bytes.
        for page in sorted(pages & self.model.dirty):
            self.model.rewritten(page, page + 1)
        self.model.dirty -= pages

    def op_truncate(self) -> None:
        if self.random.random() < TRUNCATE_WITHIN_CHANCE:
            size = self.random.randrange(self.model.size + 1)
        else:
            size = self.random.randrange(self.settings.max_size + 1)
        os.ftruncate(self.writer(), size)
        self.note(f"truncate {self.model.size} -> {size}")
        self.model.truncate(size)

    def op_punch(self) -> None:
        offset = self.offset()
        length = self.length(offset)
        fallocate(self.writer(), FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        self.note(f"punch {offset}+{length}")
        self.model.punch(offset, length)

    def op_fallocate(self) -> None:
        offset = self.offset()
        length = self.length(offset)
        keep = self.random.random() < KEEP_SIZE_CHANCE
        fallocate(self.writer(), FALLOC_FL_KEEP_SIZE if keep else 0, offset, length)
        self.note(f"fallocate {offset}+{length}{' keep-size' if keep else ''}")
        self.model.allocate(offset, length, keep_size=keep)

    def op_zero(self) -> None:
        offset = self.offset()
        length = self.length(offset)
        fallocate(self.writer(), FALLOC_FL_ZERO_RANGE, offset, length)
        self.note(f"zero {offset}+{length}")
        self.model.zero_range(offset, length)

    def op_fsync(self) -> None:
        os.fsync(self.writer())
        self.model.dirty.clear()
        self.note("fsync")

    def op_volatile(self) -> None:
        first, end, length = self.page_span()
        partial = self.random.random() < PARTIAL_CHANCE
        flags = VRANGE_PARTIAL if partial else VRANGE_FULL
        result, who = self.fvrange(first, length, VRANGE_VOLATILE, flags)
        self.note(
            f"volatile{who} pages [{first},{end}) {'partial' if partial else 'full'}"
            f"{' (length 0)' if not length else ''} -> {result}"
        )
        if result != ((end - first) * PAGE, False):
            raise MismatchError(
                f"VOLATILE returned {result}, expected {((end - first) * PAGE, False)}"
            )
        self.model.mark_volatile(first, end, partial=partial)

    def op_nonvolatile(self) -> None:
        first, end, length = self.page_span()
        if self.model.ranges and self.random.random() < UNMARK_A_RANGE_CHANCE:
            chosen = self.random.choice(self.model.ranges)  # unmark a range, whole or in part
            first = self.random.randint(chosen.start, chosen.end - 1)
            end = self.random.randint(first + 1, chosen.end)
            length = end - first
        result, who = self.fvrange(first, length, VRANGE_NONVOLATILE)
        expected = ((end - first) * PAGE, self.model.mark_nonvolatile(first, end))
        self.note(
            f"nonvolatile{who} pages [{first},{end}){' (length 0)' if not length else ''}"
            f" -> {result}"
        )
        if result != expected:
            raise MismatchError(f"NON_VOLATILE returned {result}, the model says {expected}")
        self.counts[f"nonvolatile purged={int(expected[1])}"] += 1

    def fvrange(
        self, first: int, length: int, mode: int, flags: int = VRANGE_FULL
    ) -> tuple[tuple[int, bool], str]:
        """VOLFS_IOC_VRANGE on pages, mostly here, sometimes from another process.

        The other process opens the file itself and closes it again: volatility belongs to
        the file, so its change stays, and its close is not the last one.
        """
        if self.random.random() < VRANGE_HERE_CHANCE:
            return fvrange(self.writer(), first * PAGE, length * PAGE, mode, flags), ""
        path = self.settings.path

        def elsewhere() -> bytes:
            fd = os.open(path, os.O_RDWR)
            try:
                marked, purged = fvrange(fd, first * PAGE, length * PAGE, mode, flags)
            finally:
                os.close(fd)
            return json.dumps([marked, purged]).encode()

        output, status = self.in_child(elsewhere)
        if output is None:
            raise MismatchError(f"VRANGE in another process failed: {self._status(status)}")
        marked, purged = json.loads(output)
        return (marked, purged), " (other process)"

    def op_otrunc(self) -> None:
        fd = os.open(self.settings.path, os.O_RDWR | os.O_TRUNC)
        os.close(fd)
        self.note(f"open with O_TRUNC {self.model.size} -> 0")
        self.model.truncate(0)

    def op_status(self) -> None:
        first, end, length = self.page_span()
        fd = self.random.choice((self.fd, self.reader))
        result = vrange_status(fd, first * PAGE, length * PAGE)
        volatile, lost = self.model.status(first, end)
        expected = (volatile * PAGE, lost * PAGE)
        self.note(f"status pages [{first},{end}){' (length 0)' if not length else ''} -> {result}")
        if result != expected:
            raise MismatchError(f"STATUS returned {result}, the model says {expected}")

    def op_badspan(self) -> None:
        eof = self.model.eof_pages
        cases = [
            ("unaligned start", self.writer(), 100, PAGE, errno.EINVAL),
            ("unaligned length", self.writer(), 0, PAGE + 1, errno.EINVAL),
            ("past EOF", self.writer(), eof * PAGE, PAGE, errno.EINVAL),
            ("read-only descriptor", self.reader, 0, 0, errno.EBADF),
        ]
        name, fd, start, length, wanted = self.random.choice(cases)
        mode = self.random.choice((VRANGE_VOLATILE, VRANGE_NONVOLATILE))
        try:
            result = fvrange(fd, start, length, mode)
        except OSError as error:
            self.note(f"badspan {name} -> {errno_name(error)}")
            if error.errno != wanted:
                raise MismatchError(f"{name}: {errno_name(error)}, expected {wanted}") from None
        else:
            self.note(f"badspan {name} -> {result}")
            raise MismatchError(f"{name}: VRANGE succeeded with {result}")
        self.check_status_total()

    def check_status_total(self) -> None:
        """The whole file's volatile and purged bytes must be the model's."""
        result = vrange_status(self.reader, 0, 0)
        volatile, lost = self.model.status(0, self.model.eof_pages)
        if result != (volatile * PAGE, lost * PAGE):
            raise MismatchError(
                f"STATUS of the whole file is {result}, the model says "
                f"{(volatile * PAGE, lost * PAGE)}"
            )

    def op_purge(self) -> None:
        everything = self.random.random() < PURGE_ALL_CHANCE
        wanted = 0 if everything else self.random.randint(1, 16) * PAGE
        volatile = {page for r in self.model.ranges for page in r.pages()}
        if wanted and self.model.dirty & volatile:
            # Which dirty pages a partial purge reaches cannot be learnt: none of them, then.
            os.fsync(self.fd)
            self.model.dirty.clear()
            self.note("fsync before a partial purge: no dirty mmap pages in volatile ranges")
        self.purge_now(wanted)

    def purge_now(self, wanted: int) -> None:
        """VOLFS_IOC_PURGE of ``wanted`` bytes (0: everything), then learn what it took."""
        freed = purge(self.fd, wanted)
        self.note(f"purge {wanted or 'all'} -> {freed}")
        self.learn_purge(wanted, freed)

    def learn_purge(self, wanted: int, freed: int) -> None:
        """Find out from VRANGE_STATUS what a purge took; check that it was allowed.

        A purge of everything takes every range that may hold data. Dirty mmap pages the kernel
        writes back while the purge drops the range from its cache are discarded with it; one
        written back otherwise (across the range's end, say) repopulates its page, which then
        survives with the bytes written.
        """
        found = PurgeFindings()
        for volatile_range in list(self.model.ranges):
            self.learn_range(volatile_range, wanted, found)
        if wanted:
            self.check_partial_purge(wanted, freed, found)
        self.apply_purge(found)
        self.counts["purged pages"] += len(found.newly)
        self.counts["dirty pages repopulated by a purge"] += len(found.survivors)
        self.check_status_total()

    def learn_range(self, volatile_range: ModelRange, wanted: int, found: PurgeFindings) -> None:
        """What the purge of ``wanted`` bytes (0: all) did to one range, into ``found``."""
        model = self.model
        pages = set(volatile_range.pages())
        lost_now = {page for page in pages if vrange_status(self.reader, page * PAGE, PAGE)[1]}
        before = model.lost & pages
        # Only a dirty page, written back at last, leaves the purged pages without a write.
        if (before - lost_now) - model.dirty:
            raise MismatchError(f"purge un-purged pages {sorted(before - lost_now)}")
        found.written_back |= before - lost_now
        new = lost_now - before
        where = f"range [{volatile_range.start},{volatile_range.end})"
        if new and not volatile_range.tracked:
            raise MismatchError(f"purge took pages {sorted(new)} of {where}, already purged")
        if wanted == 0:
            if volatile_range.tracked:
                kept = pages - lost_now - model.dirty
                if kept:
                    raise MismatchError(f"purge of everything left pages {sorted(kept)} of {where}")
                found.taken.append((volatile_range, volatile_range.start))
                found.survivors |= pages - lost_now
                found.newly |= new
        elif new:
            first = min(new)
            if any(page not in lost_now for page in range(first, volatile_range.end)):
                raise MismatchError(f"purge took pages {sorted(new)} of {where}: not its tail")
            if not volatile_range.partial and lost_now != pages:
                raise MismatchError(
                    f"purge took pages {sorted(new)} of FULL {where}: not all of it"
                )
            found.taken.append((volatile_range, first))
            found.newly |= new

    def check_partial_purge(self, wanted: int, freed: int, found: PurgeFindings) -> None:
        """A purge of ``wanted`` bytes freed enough, least recently marked ranges first."""
        lost = self.model.lost | found.newly
        left = [r for r in self.model.ranges if r.tracked and not set(r.pages()) <= lost]
        if freed < wanted and left:
            raise MismatchError(f"purge freed {freed} < {wanted} bytes with purgeable ranges left")
        if not found.taken:
            return
        # Least recently marked first: whatever is older than the newest range taken must be
        # gone whole (pieces of one range share its stamp; their order is free).
        newest = max(r.stamp for r, _first in found.taken)
        skipped = [r for r in left if r.stamp < newest]
        if skipped:
            raise MismatchError(
                f"purge took a range marked at #{newest} but left older ones: "
                + ", ".join(f"[{r.start},{r.end}) #{r.stamp}" for r in skipped)
            )

    def apply_purge(self, found: PurgeFindings) -> None:
        """Bring the model up to what the purge did."""
        model = self.model
        for volatile_range, first in found.taken:
            if first > volatile_range.start and volatile_range.partial:
                head = ModelRange(
                    volatile_range.start,
                    first,
                    True,
                    volatile_range.purged,
                    True,
                    volatile_range.stamp,
                )
                model.ranges.append(head)
                volatile_range.start = first
            volatile_range.purged = True
            # Repopulated pages make the range purgeable again.
            volatile_range.tracked = bool(found.survivors & set(volatile_range.pages()))
            model.dirty -= set(volatile_range.pages())
        model.ranges.sort(key=lambda r: r.start)
        for page in found.written_back:
            model.rewritten(page, page + 1)
        model.lose(found.newly)

    def op_probe(self) -> None:
        if not self.model.lost:
            self.note("probe: no purged page")
            return
        page = self.random.choice(sorted(self.model.lost))
        fd = self.fd
        # Python's mmap refuses a mapping past EOF, even within the last page.
        length = min(PAGE, self.model.size - page * PAGE)

        def touch() -> bytes:
            with mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ, offset=page * PAGE) as view:
                return view[:1]

        got, status = self.in_child(touch)
        self.note(f"probe page {page} -> {self._show(got, status)}")
        if self.settings.purged_zero:
            if got != b"\0":
                raise MismatchError(
                    f"purged page {page} through mmap with purged=zero: {self._show(got, status)}",
                    page * PAGE,
                    b"\0",
                    got or b"",
                )
            self.counts["probe zeros"] += 1
            return
        if not (os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGBUS):
            raise MismatchError(
                f"touching purged page {page} through mmap: {self._status(status)}, "
                "expected SIGBUS",
                page * PAGE,
                b"<SIGBUS>",
                got or b"",
            )
        self.counts["probe SIGBUS"] += 1

    def op_reopen(self) -> None:
        self.close()
        self.note("reopen: closed every descriptor")
        if not self.settings.plain and self.model.ranges:
            # RELEASE reaches the daemon after close(2) returns: wait for the last close.
            directory = self.settings.path.parent
            deadline = time.monotonic() + 10
            while statistics(directory)["ranges"]:
                if time.monotonic() > deadline:
                    raise MismatchError("volatile ranges survived the last close")
                time.sleep(0.001)
        self.model.close_all()
        self.model.dirty.clear()  # close flushes dirty pages
        path = self.settings.path
        self.fd = os.open(path, os.O_RDWR)
        self.fd2 = os.open(path, os.O_RDWR)
        self.reader = os.open(path, os.O_RDONLY)

    def op_reopen1(self) -> None:
        os.close(self.fd2)
        self.model.dirty.clear()  # close flushes the file's dirty pages
        self.fd2 = os.open(self.settings.path, os.O_RDWR)
        self.note("reopen1: volatility stays with the other descriptors")

    def op_verify(self) -> None:
        self.verify()

    def verify(self) -> None:
        """Read the whole file, run by run of intact pages; purged pages must fail with EIO."""
        self.stat_size()
        size = self.model.size
        failing = self.failing()
        page = 0
        while page * PAGE < size:
            if page in failing:
                try:
                    got = os.pread(self.reader, PAGE, page * PAGE)
                except OSError as error:
                    if error.errno != errno.EIO:
                        raise
                else:
                    raise MismatchError(
                        f"read of purged page {page} succeeded", page * PAGE, b"<EIO>", got[:64]
                    )
                page += 1
                continue
            end = page
            while end * PAGE < size and end not in failing:
                end += 1
            offset = page * PAGE
            length = min(end * PAGE, size) - offset
            got = os.pread(self.reader, length, offset)
            if len(got) != length:
                raise MismatchError(f"verify: read {len(got)} of {length} bytes at {offset}")
            self.expect_bytes(offset, got, "verify")
            page = end
        if not self.settings.plain:
            self.check_status_total()
        self.note(f"verify {size} bytes")

    # -- the run ---------------------------------------------------------------------------

    def corrupt(self) -> None:
        """Change a byte behind the model's back, then verify (--corrupt-at, a self-test)."""
        if not self.settings.plain and self.model.ranges:
            self.model.mark_nonvolatile(0, 1 << 62)
            fvrange(self.fd, 0, 0, VRANGE_NONVOLATILE)
        if not self.model.size:
            self.model.write(0, b"\0")
            os.pwrite(self.fd, b"\0", 0)
        offset = self.random.randrange(self.model.size)
        os.pwrite(self.fd, bytes([self.model.data[offset] ^ 0xFF]), offset)
        self.note(f"CORRUPT byte {offset} behind the model's back")
        self.verify()

    def run(self) -> None:
        """Run until --ops operations or --duration seconds, then verify everything."""
        deadline = time.monotonic() + self.settings.duration if self.settings.duration else None
        for step in itertools.count(1):
            if self.settings.ops is not None and step > self.settings.ops:
                break
            if deadline is not None and time.monotonic() > deadline:
                break
            self.step = step
            name = self.random.choices(self._names, self._weights)[0]
            if step == self.settings.corrupt_at:
                self.corrupt()
            getattr(self, f"op_{name}")()
            self.counts[name] += 1
            self.stat_size()
        self.verify()
        if not self.settings.plain and self.model.ranges:
            # Unmarking everything must report exactly the purges the model knows of.
            expected = (self.model.eof_pages * PAGE, self.model.mark_nonvolatile(0, 1 << 62))
            result = fvrange(self.fd, 0, 0, VRANGE_NONVOLATILE)
            self.note(f"nonvolatile everything -> {result}")
            if result != expected:
                raise MismatchError(
                    f"final NON_VOLATILE returned {result}, the model says {expected}"
                )
            self.verify()

    @staticmethod
    def _status(status: int) -> str:
        if os.WIFSIGNALED(status):
            return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
        return f"exit status {os.waitstatus_to_exitcode(status)}"

    def _show(self, result: bytes | OSError | None, status: int = 0) -> str:
        if isinstance(result, OSError):
            return errno_name(result)
        if result is None:
            return self._status(status)
        return "ok" if result == b"ok" else f"{len(result)} bytes"


# -- reporting and mounting -------------------------------------------------------------------


def report_mismatch(exerciser: Exerciser, mismatch: MismatchError) -> str:
    """The failure report: what went wrong, where, and the operations that led there."""
    settings = exerciser.settings
    lines = [
        f"fsx: MISMATCH at operation {exerciser.step} (seed {settings.seed}): {mismatch}",
    ]
    if mismatch.offset is not None:
        page = mismatch.offset // PAGE
        lines.append(
            f"first difference at offset {mismatch.offset} (page {page}, "
            f"{'volatile' if exerciser.model.is_volatile(page) else 'non-volatile'}"
            f"{', purged' if page in exerciser.model.lost else ''})"
        )
        lines.append(f"  expected: {mismatch.expected[:32].hex(' ')}")
        lines.append(f"  got:      {mismatch.got[:32].hex(' ')}")
    lines.append(f"model: {exerciser.model.describe()}")
    lines.append(f"last {len(exerciser.log)} operations:")
    lines.extend(f"  {line}" for line in exerciser.log)
    lines.append(
        f"reproduce: {sys.executable} {sys.argv[0]} --seed {settings.seed} "
        f"--ops {exerciser.step} --max-size {settings.max_size}"
        f"{' --plain' if settings.plain else ''}{' --purged-zero' if settings.purged_zero else ''}"
    )
    return "\n".join(lines)


@contextlib.contextmanager
def own_mount(options: str) -> Iterator[tuple[Path, dict[str, object]]]:
    """Mount a volfs for the run in a temporary directory; report how its daemon ended."""
    with tempfile.TemporaryDirectory(prefix="fsx-") as workdir:
        mountpoint = Path(workdir) / "mnt"
        mountpoint.mkdir()
        outcome: dict[str, object] = {}
        with volfs_mounts.mounted(
            volfs_mounts.volfs_command(mountpoint, options),
            mountpoint,
            Path(workdir) / "volfs.log",
            outcome=outcome,
        ):
            yield mountpoint, outcome


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    """The command line."""
    parser = argparse.ArgumentParser(
        description="Random operations on one volfs file, checked against a model.",
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument("--ops", type=int, default=None, help="stop after this many operations")
    parser.add_argument("--duration", type=float, default=None, help="stop after this many s")
    parser.add_argument(
        "--max-size", type=int, default=256 * 1024, help="largest file size (default 256 KiB)"
    )
    parser.add_argument("--file", type=Path, help="file to use (default: on a volfs of its own)")
    parser.add_argument(
        "--mount-options",
        default="size=64M,pressure=off",
        help="options of the volfs fsx mounts (default: size=64M,pressure=off)",
    )
    parser.add_argument(
        "--plain", action="store_true", help="only what any filesystem does: no volfs ioctls"
    )
    parser.add_argument(
        "--purged-zero",
        action="store_true",
        help="purged pages read as zeros (the mount has, or fsx mounts with, purged=zero)",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument("--corrupt-at", type=int, help=argparse.SUPPRESS)  # self-test
    arguments = parser.parse_args(argv)
    if arguments.ops is None and arguments.duration is None:
        arguments.ops = 10000
    if arguments.max_size < PAGE:
        parser.error(f"--max-size must be at least {PAGE}")
    if arguments.plain and arguments.file is None:
        parser.error("--plain needs --file")
    if arguments.purged_zero and arguments.file is None:
        arguments.mount_options += ",purged=zero"
    if arguments.seed is None:
        arguments.seed = random.SystemRandom().randrange(1 << 32)
    return arguments


def run(arguments: argparse.Namespace, path: Path) -> tuple[Exerciser, str | None]:
    """One run on ``path``; returns the exerciser and a failure report, if any."""
    settings = Settings(
        path=path,
        seed=arguments.seed,
        ops=arguments.ops,
        duration=arguments.duration,
        max_size=arguments.max_size,
        plain=arguments.plain,
        purged_zero=arguments.purged_zero,
        corrupt_at=arguments.corrupt_at,
    )
    exerciser = Exerciser(settings)
    failure = None
    try:
        exerciser.run()
    except MismatchError as mismatch:
        failure = report_mismatch(exerciser, mismatch)
    except OSError as error:
        failure = report_mismatch(exerciser, MismatchError(f"unexpected error: {error!r}"))
    finally:
        exerciser.close()
    return exerciser, failure


def main(argv: list[str] | None = None) -> int:
    """Run fsx; see the module docstring."""
    arguments = parse_arguments(argv)
    started = time.monotonic()
    daemon: dict[str, object] = {}
    with contextlib.ExitStack() as stack:
        if arguments.file is None:
            mountpoint, daemon = stack.enter_context(own_mount(arguments.mount_options))
            path = mountpoint / "fsx.bin"
        else:
            path = arguments.file
        exerciser, failure = run(arguments, path)
    if daemon and (daemon["exit_status"] != 0 or daemon["logged_exception"]):
        failure = (failure or "") + f"\nfsx: the volfs daemon failed: {daemon}"
    summary = {
        "seed": arguments.seed,
        "operations": exerciser.step,
        "seconds": round(time.monotonic() - started, 1),
        "counts": dict(sorted(exerciser.counts.items())),
        "ok": failure is None,
        "failure": failure,
    }
    if daemon:
        summary["daemon"] = daemon
    if arguments.json:
        print(json.dumps(summary, indent=2))
    else:
        counts = " ".join(f"{name}={count}" for name, count in summary["counts"].items())
        print(f"fsx: seed {arguments.seed}: {exerciser.step} operations in {summary['seconds']} s")
        print(f"fsx: {counts}")
    if failure is not None:
        print(failure, file=sys.stderr)
        return 1
    if not arguments.json:
        print("fsx: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
