#!/usr/bin/env python3
"""Soak volfs under purges and a tight size cap: nothing non-volatile may ever be lost.

Mounts a volfs of its own (``<python> -m volfs -f -o size=SIZE,pressure_batch=BATCH,
pressure_watermark=0 MOUNTPOINT`` with ``MEMORY_PRESSURE_WATCH`` naming a FIFO), then for
``--duration`` seconds runs ``--workers`` processes. Each works on files of its own and on its
own slice of one file that all of them keep open, and picks at random:

  write        pwrite of random bytes at any offset and length, growing own files
  fill         a large write, to run into the size cap
  volatile     mark a page span volatile, FULL or PARTIAL
  nonvolatile  mark a span non-volatile; purged=0: the span must hold exactly what was written
               (read back at once); purged=1: each page holds what was written or zeros, and
               the span is usually rewritten, as an application regenerating a cache would
  read         pread of non-volatile pages (exact), or of spans holding volatile pages (the
               right bytes, EIO, or a read cut short at a volatile page: never other bytes)
  status       VRANGE_STATUS agrees with the worker's record of its volatile pages
  mmap         MAP_SHARED read and write of non-volatile pages, with or without msync
  probe        a child process reads a volatile page through mmap, preferably one the status
               reports purged: SIGBUS or the right bytes
  truncate     shrink or grow an own file
  cycle        make a whole own file non-volatile and verify every byte; then close it and
               reopen it, reopen it with O_TRUNC or replace it, or unlink it and go on using
               it through its descriptor
  fsync        fsync a file
Meanwhile a thread of this process, in storms separated by calms (in which volatile data piles
up until the size cap purges it), writes to the FIFO (each write makes the daemon purge one
batch, as memory pressure does) and calls VOLFS_IOC_PURGE for random amounts or for all.
A write that hits the cap must succeed by purging volatile data, or fail with ENOSPC only once
no volatile data is left: after each ENOSPC the worker checks that all of its own volatile
ranges are purged. At the end every file is made non-volatile and every byte verified.

The model: for each page a worker keeps the contents it may hold if no purge took it during
its current volatile period (one, once known) and those it may hold if one did and writes
followed (a write into a purged page repopulates it with zeros around the written bytes).
Reading a page narrows what it may hold; a non-volatile page whose contents later change to
one of the ruled-out candidates without a write is reported as ``unstable`` (stale page
cache), any other unexpected bytes as ``lost`` (zeros) or ``corrupt``.

The segments phase (``--segment-seconds``): ``--workers`` processes share one file cut into
segments, each pinning one of its segments at a time, checking it, writing it (pwrite or
through MAP_SHARED) and unpinning it, while a thread purges (VOLFS_IOC_PURGE of random
amounts, pressure events) and the size cap purges too. A pin reporting purged=0 must find
exactly what was written while pinned; purged=1 pages hold zeros or, where a dirty mapped page
was written back, what was written; an unpinned segment reads what was written or fails with
EIO, never anything else.

Then the race phase: ``--race-iterations`` times, a fresh pattern is written and marked
volatile (FULL or PARTIAL), and a purge and a NON_VOLATILE of the range (whole, or its head
first) are issued at the same moment from two threads. The outcome must be all or nothing: a
purge that came first leaves zeros (the whole FULL range, the tail of a PARTIAL one) and
purged=1; one that came second finds nothing and the data is intact with purged=0. Zeros with
purged=0, or old data with purged=1, are violations.

The report counts operations and their outcomes (purged=0 and purged=1 answers, EIO and cut
reads, SIGBUS in probes, ENOSPC), the purges of the pressure thread and the daemon's own
counters (VOLFS_IOC_STATS: purges by ioctl, size cap and pressure).

Exit status: 0 when no violation was found and the daemon exited 0 without logging an
exception; 1 otherwise (each violation is reported with its file, offset, expected and got
bytes and the worker's last operations); 2 for usage errors.

Needs fusermount3 and /dev/fuse.

Usage:
  python scripts/soak.py --duration 300
  python scripts/soak.py --duration 60 --workers 4 --size 4M --seed 7 --json > soak.json
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import json
import logging
import mmap
import multiprocessing
import os
import random
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

import volfs_mounts

from volfs.abi import SEGMENT_PINNED
from volfs.client import (
    PAGE_SIZE,
    VRANGE_FULL,
    VRANGE_NONVOLATILE,
    VRANGE_PARTIAL,
    VRANGE_VOLATILE,
    Segment,
    SegmentTable,
    fvrange,
    purge,
    statistics,
    vrange_status,
)
from volfs.sizes import size_argument

log = logging.getLogger("soak")

PAGE = PAGE_SIZE
ZERO_PAGE = bytes(PAGE)
#: Operations of a worker and their weights.
OPERATIONS: dict[str, int] = {
    "write": 22,
    "fill": 2,
    "volatile": 14,
    "nonvolatile": 14,
    "read_nonvolatile": 10,
    "read_volatile": 10,
    "status": 6,
    "mmap": 5,
    "probe": 2,
    "truncate": 3,
    "cycle": 2,
    "fsync": 1,
}
#: Violations of each kind kept in full per worker (all are counted).
MAX_REPORTED = 25
#: Operations of a worker kept for the report of a violation.
HISTORY = 24
#: The smallest --file-pages: a fill writes a quarter of a file, at least one page.
MIN_FILE_PAGES = 4
#: The pressure thread gives up after this many failed purges.
MAX_PRESSURE_ERRORS = 20
#: How a probe's child reports bytes that are neither the data nor zeros, and its own failure.
PROBE_WRONG_BYTES = 3
PROBE_FAILED = 4

# The odds of the random choices within operations, each the chance of the case it names.
#: A write is of up to 3 pages anywhere, of 1 to 16 whole pages, or of 16 to 64 whole pages
#: (cumulative chances, as random.choices takes them).
WRITE_ODDS = {"bytes": 0.55, "pages": 0.9, "many pages": 1.0}
#: A range is marked PARTIAL (else FULL).
PARTIAL_CHANCE = 0.4
#: NON_VOLATILE takes a run of volatile pages (else any span).
UNMARK_VOLATILE_RUN_CHANCE = 0.8
#: Data reported purged is written anew (else read, to see the zeros).
REWRITE_CHANCE = 0.7
#: A write through a mapping is msync'ed (else left for munmap or a later fsync).
MSYNC_CHANCE = 0.6
#: The mapped span is read back with pread afterwards.
PREAD_AFTER_MMAP_CHANCE = 0.5
#: A truncation cuts at a page boundary.
TRUNCATE_TO_PAGE_CHANCE = 0.5
#: A close-and-reopen cycle unlinks the file and keeps it open instead.
ORPHAN_CHANCE = 0.2
#: A cycle reopens the file, reopens it with O_TRUNC, or replaces it (cumulative).
REOPEN_ODDS = {"reopen": 0.5, "truncate": 0.75, "replace": 1.0}
#: A pressure phase is a calm (no purges) rather than a storm.
CALM_CHANCE = 0.4
#: In a storm, an event is a byte to the pressure FIFO (else a VOLFS_IOC_PURGE).
FIFO_EVENT_CHANCE = 0.3
#: A VOLFS_IOC_PURGE asks for everything (else for 1 to 64 pages).
PURGE_ALL_CHANCE = 0.15
#: A race marks its range FULL (else PARTIAL).
RACE_FULL_CHANCE = 0.6
#: A race has an older volatile decoy file that a small purge takes first.
RACE_DECOY_CHANCE = 0.3
#: The racing purge asks for everything (else for a few pages).
RACE_PURGE_ALL_CHANCE = 0.6
#: The racing NON_VOLATILE takes the whole range at once (else its head first).
RACE_WHOLE_UNMARK_CHANCE = 0.6


# -- settings ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What to run; see ``--help``."""

    duration: float
    workers: int
    size: str
    files: int
    file_pages: int
    slice_pages: int
    pressure_batch: str
    pressure_interval: float
    race_iterations: int
    seed: int
    segment_seconds: float = 0.0


def positive_size(text: str) -> str:
    """``text`` as given (it goes into the mount options), once known to be a size above 0."""
    if size_argument(text) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0")
    return text


# -- the model of a file -----------------------------------------------------------------------


def pick(rng: random.Random, odds: dict[str, float]) -> str:
    """One case of ``odds`` (cumulative chances), drawn with one ``rng.random()``."""
    return rng.choices(tuple(odds), cum_weights=tuple(odds.values()))[0]


def unique(items: Iterable[bytes]) -> list[bytes]:
    """The distinct items, in their first order."""
    return list(dict.fromkeys(items))


@dataclass(slots=True)
class PageModel:
    """What one page of a file may hold."""

    #: Contents if no purge took the page during its current volatile period; for a
    #: non-volatile page, what it holds (one entry once known).
    kept: list[bytes]
    #: Contents if a purge took the page during its current volatile period and writes
    #: followed (only while volatile).
    hit: list[bytes] = field(default_factory=list)
    #: Candidates a read ruled out: seeing one later, without a write, means the page changed.
    dropped: list[bytes] = field(default_factory=list)
    volatile: bool = False

    def candidates(self) -> list[bytes]:
        """Every content a read may return."""
        return self.kept + self.hit if self.volatile else self.kept

    def write(self, start: int, data: bytes) -> None:
        """Bytes ``data`` were written at ``start`` in the page."""
        end = start + len(data)

        def put(content: bytes) -> bytes:
            return content[:start] + data + content[end:]

        self.kept = unique(put(content) for content in self.kept)
        hit = [put(content) for content in self.hit]
        if self.volatile:
            # A purge may have come before the write: it repopulated a page of zeros.
            hit.append(put(ZERO_PAGE))
        self.hit = unique(hit)
        self.dropped = [d for d in unique(put(c) for c in self.dropped) if d not in self.kept]

    def clear_from(self, start: int) -> None:
        """The file was truncated inside this page: bytes from ``start`` on read as zeros."""
        tail = bytes(PAGE - start)
        self.kept = unique(content[:start] + tail for content in self.kept)
        self.hit = unique(content[:start] + tail for content in self.hit)
        self.dropped = [
            d for d in unique(c[:start] + tail for c in self.dropped) if d not in self.kept
        ]

    def unmark(self, purged: bool) -> None:
        """NON_VOLATILE answered ``purged`` for a span holding this page."""
        if not self.volatile:
            return
        if purged:
            self.kept = unique([*self.kept, *self.hit, ZERO_PAGE])
        self.hit = []
        self.volatile = False

    def narrow(self, start: int, end: int, seen: bytes) -> None:
        """A read of a non-volatile page returned ``seen`` for bytes [start, end)."""
        matching = [content for content in self.kept if content[start:end] == seen]
        if matching and len(matching) < len(self.kept):
            self.dropped = unique([*self.dropped, *(c for c in self.kept if c not in matching)])
            self.kept = matching

    def resync(self, start: int, end: int, seen: bytes) -> None:
        """After a violation, take what was read as the truth so it is reported once.

        What the page was expected to hold joins the ruled-out candidates: reading it, or the
        rest of a candidate ruled out before, is then reported as ``unstable`` again.
        """
        expected = self.kept
        self.kept = unique(content[:start] + seen + content[end:] for content in expected[:1])
        self.dropped = [d for d in unique([*self.dropped, *expected]) if d not in self.kept]


class FileModel:
    """The expected contents of one file: its size and a :class:`PageModel` per page."""

    def __init__(self, size: int = 0) -> None:
        self.size = 0
        self.pages: list[PageModel] = []
        self.truncate(size)

    @property
    def npages(self) -> int:
        """Pages up to the page-rounded end of the file."""
        return len(self.pages)

    def write(self, offset: int, data: bytes) -> None:
        """``data`` was written at ``offset``."""
        end = offset + len(data)
        if end > self.size:
            self.truncate(end)
        position = offset
        while position < end:
            index = position // PAGE
            start = position - index * PAGE
            stop = min(PAGE, end - index * PAGE)
            self.pages[index].write(
                start, data[position - offset : position - offset + stop - start]
            )
            position = index * PAGE + stop

    def truncate(self, size: int) -> None:
        """The file was truncated (or extended) to ``size``."""
        needed = (size + PAGE - 1) // PAGE
        if size >= self.size:
            # Bytes past the old end read as zeros: the model's pages already hold zeros there.
            self.pages.extend(PageModel([ZERO_PAGE]) for _ in range(needed - len(self.pages)))
        else:
            del self.pages[needed:]
            if size % PAGE:
                self.pages[-1].clear_from(size % PAGE)
        self.size = size

    def mark_volatile(self, first: int, end: int) -> None:
        """Pages [first, end) were marked volatile."""
        for page in self.pages[first:end]:
            page.volatile = True

    def unmark(self, first: int, end: int, purged: bool) -> None:
        """Pages [first, end) were marked non-volatile; NON_VOLATILE answered ``purged``."""
        for page in self.pages[first:end]:
            page.unmark(purged)

    def volatile_count(self, first: int, end: int) -> int:
        """Volatile pages in [first, end)."""
        return sum(page.volatile for page in self.pages[first:end])

    def volatile_spans(self, first: int, end: int) -> list[tuple[int, int]]:
        """Maximal runs of volatile pages in [first, end)."""
        spans: list[tuple[int, int]] = []
        start: int | None = None
        for index in range(first, min(end, self.npages)):
            if self.pages[index].volatile:
                if start is None:
                    start = index
            elif start is not None:
                spans.append((start, index))
                start = None
        if start is not None:
            spans.append((start, min(end, self.npages)))
        return spans


# -- one worker --------------------------------------------------------------------------------


@dataclass
class TrackedFile:
    """A file a worker has open, the pages of it the worker owns, and their model."""

    name: str
    path: Path
    fd: int
    model: FileModel
    #: Pages [first_page, end_page) belong to this worker (all of an own file).
    first_page: int
    end_page: int
    shared: bool
    #: Dirty mmap pages may still be on their way to the daemon (no msync or fsync since).
    unsynced: bool = False
    #: Unlinked while open: still used through its descriptor, replaced at its next cycle.
    orphaned: bool = False

    @property
    def owned_end(self) -> int:
        """End of the worker's pages that exist now."""
        return min(self.end_page, self.model.npages)


class Worker:
    """One worker process: random operations on its files, each checked against the model."""

    def __init__(
        self,
        index: int,
        settings: Settings,
        mountpoint: Path,
        shared: Path,
        deadline: float,
    ) -> None:
        self.index = index
        self.settings = settings
        self.mountpoint = mountpoint
        self.deadline = deadline
        self.rng = random.Random(f"{settings.seed}/{index}")
        self.counters: collections.Counter[str] = collections.Counter()
        self.violations: list[dict[str, Any]] = []
        self.history: collections.deque[str] = collections.deque(maxlen=HISTORY)
        #: A page-aligned buffer for O_DIRECT reads.
        self.aligned = mmap.mmap(-1, PAGE)
        self.files: list[TrackedFile] = []
        for number in range(settings.files):
            self.files.append(self._create(f"w{index}-f{number}"))
        fd = os.open(shared, os.O_RDWR)
        first = index * settings.slice_pages
        self.files.append(
            TrackedFile(
                name=shared.name,
                path=shared,
                fd=fd,
                model=FileModel(os.fstat(fd).st_size),
                first_page=first,
                end_page=first + settings.slice_pages,
                shared=True,
            )
        )

    def _create(self, name: str) -> TrackedFile:
        path = self.mountpoint / name
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        return TrackedFile(name, path, fd, FileModel(), 0, self.settings.file_pages, False)

    @property
    def own_files(self) -> list[TrackedFile]:
        """The files only this worker uses."""
        return [tracked for tracked in self.files if not tracked.shared]

    # -- reporting ------------------------------------------------------------------------

    def note(self, text: str) -> None:
        """Remember an operation for the report of a later violation."""
        self.history.append(f"{time.monotonic():.4f} {text}")

    def violation(self, kind: str, tracked: TrackedFile, offset: int, **details: Any) -> None:
        """Record a broken promise of volfs."""
        self.counters[f"violations_{kind}"] += 1
        self.counters["violations"] += 1
        if self.counters[f"violations_{kind}"] <= MAX_REPORTED:
            record = {
                "kind": kind,
                "worker": self.index,
                "file": str(tracked.path),
                "offset": offset,
                "page": offset // PAGE,
                **details,
                "history": list(self.history),
            }
            self.violations.append(record)
        log.error(
            "worker %d: %s in %s at offset %d: %s", self.index, kind, tracked.name, offset, details
        )

    def mismatch(
        self,
        tracked: TrackedFile,
        index: int,
        start: int,
        seen: bytes,
        page: PageModel,
        op: str,
    ) -> None:
        """Bytes read at page ``index`` (from ``start``) are none of the page's candidates."""
        end = start + len(seen)
        if any(content[start:end] == seen for content in page.dropped):
            kind = "unstable"  # it held other bytes before, and nothing wrote since
        elif page.volatile:
            kind = "volatile-wrong-bytes"
        else:
            kind = ""
        best = min(
            page.candidates(),
            key=lambda content: sum(a != b for a, b in zip(content[start:end], seen, strict=True)),
        )
        expected = best[start:end]
        differing = [i for i, (a, b) in enumerate(zip(expected, seen, strict=True)) if a != b]
        first = differing[0]
        zeros = all(seen[i] == 0 for i in differing)
        if not kind:
            kind = "lost" if zeros else "corrupt"
        self.counters[f"{kind}_bytes"] += len(differing)
        self.violation(
            kind,
            tracked,
            index * PAGE + start + first,
            op=op,
            differing_bytes=len(differing),
            span=[index * PAGE + start + differing[0], index * PAGE + start + differing[-1] + 1],
            expected=expected[first : first + 16].hex(),
            got=seen[first : first + 16].hex(),
            page_volatile=page.volatile,
            candidates=len(page.candidates()),
        )
        if not page.volatile:
            page.resync(start, end, seen)

    def report(self) -> dict[str, Any]:
        """Counters and violations, for the parent."""
        return {"counters": dict(self.counters), "violations": self.violations}

    # -- checked primitives ---------------------------------------------------------------

    def verify(self, tracked: TrackedFile, offset: int, got: bytes, op: str) -> None:
        """Compare bytes read at ``offset`` with the model, page by page."""
        end = offset + len(got)
        position = offset
        pages = tracked.model.pages
        while position < end:
            index = position // PAGE
            start = position - index * PAGE
            stop = min(PAGE, end - index * PAGE)
            seen = got[position - offset : position - offset + stop - start]
            page = pages[index]
            if any(content[start:stop] == seen for content in page.candidates()):
                if not page.volatile and len(page.kept) > 1:
                    self.narrow(tracked, index, start, seen, op)
            else:
                self.mismatch(tracked, index, start, seen, page, op)
            position = index * PAGE + stop
        self.counters["verified_bytes"] += len(got)

    def narrow(self, tracked: TrackedFile, index: int, start: int, seen: bytes, op: str) -> None:
        """A page that may hold several contents read ``seen``: check it against volfs itself.

        Such a page was reported purged and not rewritten since: it holds either what was
        written or zeros. An O_DIRECT read bypasses the kernel's page cache; if it disagrees,
        the cache still serves bytes volfs has purged.
        """
        page = tracked.model.pages[index]
        end = start + len(seen)
        direct = os.open(f"/proc/self/fd/{tracked.fd}", os.O_RDONLY | os.O_DIRECT)
        try:
            got = os.preadv(direct, [self.aligned], index * PAGE)
        finally:
            os.close(direct)
        self.counters["direct_reads"] += 1
        truth = self.aligned[start:end] if got >= end else None
        if truth == seen:
            page.narrow(start, end, seen)
            return
        self.violation(
            "stale",
            tracked,
            index * PAGE + start,
            op=op,
            error="a page reported purged read its old bytes through the page cache, "
            "while volfs holds zeros"
            if truth == bytes(len(seen))
            else "the page cache and volfs disagree",
            cached=seen[:16].hex(),
            volfs=None if truth is None else truth[:16].hex(),
        )

    def read(self, tracked: TrackedFile, offset: int, length: int, op: str) -> int:
        """pread and check: the right bytes, or EIO or a cut at a volatile page.

        Returns:
            The bytes read, -1 for EIO.
        """
        model = tracked.model
        self.counters["reads"] += 1
        try:
            got = os.pread(tracked.fd, length, offset)
        except OSError as error:
            if error.errno == errno.EIO and offset < model.size:
                if model.pages[offset // PAGE].volatile:
                    self.counters["eio_reads"] += 1
                    self.note(f"{op} {tracked.name} @{offset}+{length}: EIO")
                    return -1
                self.violation(
                    "lost", tracked, offset, op=op, error="EIO reading a non-volatile page"
                )
                return -1
            self.violation("errno", tracked, offset, op=op, error=str(error))
            return -1
        wanted = max(0, min(length, model.size - offset))
        self.note(f"{op} {tracked.name} @{offset}+{length}: {len(got)} bytes")
        if len(got) > wanted:
            self.violation(
                "corrupt", tracked, offset + wanted, op=op, error=f"read {len(got)} past EOF"
            )
            got = got[:wanted]
        elif len(got) < wanted:
            cut = offset + len(got)
            if cut % PAGE == 0 and model.pages[cut // PAGE].volatile:
                self.counters["short_reads"] += 1
            else:
                self.counters["lost_bytes"] += wanted - len(got)
                self.violation(
                    "lost",
                    tracked,
                    cut,
                    op=op,
                    error=f"short read: {len(got)} of {wanted} bytes, cut at a non-volatile page",
                )
        self.verify(tracked, offset, got, op)
        return len(got)

    def write(self, tracked: TrackedFile, offset: int, data: bytes, op: str) -> int:
        """pwrite and update the model; ENOSPC is allowed only once no volatile data is left."""
        try:
            written = os.pwrite(tracked.fd, data, offset)
        except OSError as error:
            if error.errno == errno.ENOSPC:
                self.counters["enospc_writes"] += 1
                self.note(f"{op} {tracked.name} @{offset}+{len(data)}: ENOSPC")
                self.check_nothing_volatile_left(op)
                return 0
            self.violation("errno", tracked, offset, op=op, error=str(error))
            return 0
        self.note(f"{op} {tracked.name} @{offset}+{len(data)}: {written}")
        self.counters["writes"] += 1
        self.counters["bytes_written"] += written
        if written:
            tracked.model.write(offset, data[:written])
        if written < len(data):
            # The cap cut the write (a later part of it failed with ENOSPC).
            self.counters["short_writes"] += 1
            self.check_nothing_volatile_left(
                op, (tracked, offset // PAGE, (offset + written + PAGE - 1) // PAGE)
            )
        return written

    def check_nothing_volatile_left(
        self, op: str, written: tuple[TrackedFile, int, int] | None = None
    ) -> None:
        """After ENOSPC every volatile range of the mount must have been purged.

        Only this worker's own ranges are checked: no other process changes them, and only
        writes un-purge pages (``written``: the pages a short write did write).
        """
        self.counters["enospc_checks"] += 1
        for tracked in self.files:
            if tracked.unsynced:
                continue  # a dirty mmap page written back would repopulate a purged page
            for first, end in tracked.model.volatile_spans(tracked.first_page, tracked.end_page):
                spans = [(first, end)]
                if written is not None and written[0] is tracked:
                    spans = [
                        (lo, hi)
                        for lo, hi in ((first, min(end, written[1])), (max(first, written[2]), end))
                        if lo < hi
                    ]
                for lo, hi in spans:
                    volatile, lost = vrange_status(tracked.fd, lo * PAGE, (hi - lo) * PAGE)
                    if volatile != (hi - lo) * PAGE:
                        self.violation(
                            "status",
                            tracked,
                            lo * PAGE,
                            op=op,
                            error=f"{volatile} volatile bytes, expected {(hi - lo) * PAGE}",
                        )
                    elif lost != volatile:
                        self.violation(
                            "enospc-with-volatile-data",
                            tracked,
                            lo * PAGE,
                            op=op,
                            error=f"ENOSPC while {volatile - lost} bytes of volatile data in "
                            f"pages [{lo}, {hi}) were not purged",
                        )

    def mark(self, tracked: TrackedFile, first: int, end: int, mode: int, flags: int) -> bool:
        """VOLFS_IOC_VRANGE on pages [first, end); return ``purged``, update the model."""
        name = "VOLATILE" if mode == VRANGE_VOLATILE else "NON_VOLATILE"
        length = (end - first) * PAGE
        try:
            marked, purged = fvrange(tracked.fd, first * PAGE, length, mode, flags)
        except OSError as error:
            self.violation("errno", tracked, first * PAGE, op=name, error=str(error))
            return False
        self.note(f"{name} {tracked.name} [{first}, {end}) flags={flags}: purged={int(purged)}")
        if marked != length:
            self.violation("ioctl", tracked, first * PAGE, op=name, error=f"marked {marked}")
        if mode == VRANGE_VOLATILE:
            if purged:
                self.violation("ioctl", tracked, first * PAGE, op=name, error="purged=1 reported")
            tracked.model.mark_volatile(first, end)
            return False
        if purged and not tracked.model.volatile_count(first, end):
            self.violation(
                "ioctl", tracked, first * PAGE, op=name, error="purged=1 for a span never volatile"
            )
        tracked.model.unmark(first, end, purged)
        return purged

    def status_is(self, tracked: TrackedFile, first: int, end: int, op: str) -> None:
        """VRANGE_STATUS of pages [first, end) agrees with the model's volatile pages."""
        volatile, lost = vrange_status(tracked.fd, first * PAGE, (end - first) * PAGE)
        expected = tracked.model.volatile_count(first, end) * PAGE
        self.counters["status_checks"] += 1
        if volatile != expected or lost > volatile:
            self.violation(
                "status",
                tracked,
                first * PAGE,
                op=op,
                error=f"pages [{first}, {end}): volatile={volatile} purged={lost}, "
                f"expected volatile={expected}",
            )

    def finish_file(self, tracked: TrackedFile, op: str) -> None:
        """Make the worker's pages of a file non-volatile and verify every byte of them."""
        end = tracked.owned_end
        if end > tracked.first_page:
            self.mark(tracked, tracked.first_page, end, VRANGE_NONVOLATILE, 0)
            self.status_is(tracked, tracked.first_page, end, op)
            offset = tracked.first_page * PAGE
            stop = min(end * PAGE, tracked.model.size)
            while offset < stop:
                length = min(stop - offset, 64 * PAGE)
                self.read(tracked, offset, length, op)
                offset += length
        if not tracked.shared:
            size = os.fstat(tracked.fd).st_size
            if size != tracked.model.size:
                self.violation(
                    "corrupt",
                    tracked,
                    size,
                    op=op,
                    error=f"size {size}, expected {tracked.model.size}",
                )

    # -- choosing -------------------------------------------------------------------------

    def span(self, tracked: TrackedFile, most: int = 32) -> tuple[int, int] | None:
        """A random span of the worker's existing pages of a file, at most ``most`` pages."""
        end = tracked.owned_end
        if end <= tracked.first_page:
            return None
        first = self.rng.randrange(tracked.first_page, end)
        return first, min(end, first + self.rng.randint(1, most))

    def run_of(
        self, tracked: TrackedFile, volatile: bool, most: int = 32
    ) -> tuple[int, int] | None:
        """A span starting at a page that is (or is not) volatile, or None if there is none."""
        pages = tracked.model.pages
        candidates = [
            index
            for index in range(tracked.first_page, tracked.owned_end)
            if pages[index].volatile == volatile
        ]
        if not candidates:
            return None
        first = self.rng.choice(candidates)
        end = first + 1
        limit = min(tracked.owned_end, first + most)
        while end < limit and (volatile or not pages[end].volatile):
            end += 1
        return first, end

    # -- operations -----------------------------------------------------------------------

    def op_write(self) -> None:
        tracked = self.rng.choice(self.files)
        rng = self.rng
        lo, hi = tracked.first_page * PAGE, tracked.end_page * PAGE
        if tracked.shared:
            hi = min(hi, tracked.model.size)
        size = pick(rng, WRITE_ODDS)
        if size == "bytes":
            offset = rng.randrange(lo, hi)
            length = rng.randint(1, 3 * PAGE)
        elif size == "pages":
            offset = rng.randrange(lo, hi, PAGE)
            length = rng.randint(1, 16) * PAGE
        else:
            offset = rng.randrange(lo, hi, PAGE)
            length = rng.randint(16, 64) * PAGE
        length = min(length, hi - offset)
        self.write(tracked, offset, rng.randbytes(length), "write")

    def op_fill(self) -> None:
        tracked = self.rng.choice(self.own_files)
        pages = self.rng.randint(self.settings.file_pages // 4, self.settings.file_pages)
        first = self.rng.randrange(0, self.settings.file_pages - pages + 1)
        self.write(tracked, first * PAGE, self.rng.randbytes(pages * PAGE), "fill")

    def op_volatile(self) -> None:
        tracked = self.rng.choice(self.files)
        span = self.span(tracked)
        if span is None:
            return
        partial = self.rng.random() < PARTIAL_CHANCE
        self.mark(tracked, *span, VRANGE_VOLATILE, VRANGE_PARTIAL if partial else VRANGE_FULL)
        self.counters["marks_volatile_partial" if partial else "marks_volatile_full"] += 1

    def op_nonvolatile(self) -> None:
        tracked = self.rng.choice(self.files)
        span = (
            self.run_of(tracked, volatile=True)
            if self.rng.random() < UNMARK_VOLATILE_RUN_CHANCE
            else self.span(tracked)
        )
        if span is None:
            return
        first, end = span
        purged = self.mark(tracked, first, end, VRANGE_NONVOLATILE, 0)
        self.counters["marks_nonvolatile"] += 1
        self.status_is(tracked, first, end, "nonvolatile")
        if not purged:
            self.counters["purged_0_reports"] += 1
            self.read(tracked, first * PAGE, (end - first) * PAGE, "nonvolatile(purged=0)")
            return
        self.counters["purged_1_reports"] += 1
        if self.rng.random() < REWRITE_CHANCE:
            self.counters["rewrites"] += 1
            offset = first * PAGE
            length = (end - first) * PAGE
            if tracked.shared:
                length = min(length, tracked.model.size - offset)
            self.write(tracked, offset, self.rng.randbytes(length), "rewrite")
        else:
            self.read(tracked, first * PAGE, (end - first) * PAGE, "nonvolatile(purged=1)")

    def op_read_nonvolatile(self) -> None:
        tracked = self.rng.choice(self.files)
        span = self.run_of(tracked, volatile=False)
        if span is None:
            return
        first, end = span
        offset = first * PAGE + self.rng.randrange(PAGE)
        stop = end * PAGE - self.rng.randrange(PAGE)
        if stop > offset:
            self.read(tracked, offset, stop - offset, "read_nonvolatile")

    def op_read_volatile(self) -> None:
        tracked = self.rng.choice(self.files)
        span = self.run_of(tracked, volatile=True)
        if span is None:
            return
        first, end = span
        end = min(tracked.owned_end, end + self.rng.randint(0, 4))
        offset = first * PAGE + self.rng.choice([0, 0, self.rng.randrange(PAGE)])
        purged = vrange_status(tracked.fd, first * PAGE, PAGE)[1] > 0 and not tracked.unsynced
        if self.read(tracked, offset, end * PAGE - offset, "read_volatile") > 0 and purged:
            # Allowed (the bytes were right), but the page had been purged: the kernel's
            # cache still held it.
            self.counters["stale_reads_of_purged_pages"] += 1

    def op_status(self) -> None:
        tracked = self.rng.choice(self.files)
        span = self.span(tracked, most=64)
        if span is not None:
            self.status_is(tracked, *span, "status")
        if not tracked.shared and tracked.model.npages:
            self.status_is(tracked, 0, tracked.model.npages, "status")

    def op_mmap(self) -> None:
        tracked = self.rng.choice(self.files)
        model = tracked.model
        whole_pages = min(tracked.end_page, model.size // PAGE)
        span = self.run_of(tracked, volatile=False, most=16)
        if span is None:
            return
        first, end = span[0], min(span[1], whole_pages)
        if end <= first:
            return
        length = (end - first) * PAGE
        # Written first so the pages are held: a write-back into a hole could meet the cap.
        if self.write(tracked, first * PAGE, self.rng.randbytes(length), "mmap-prepare") < length:
            return
        self.counters["mmap_ops"] += 1
        try:
            view = mmap.mmap(tracked.fd, length, mmap.MAP_SHARED, offset=first * PAGE)
        except OSError as error:
            self.violation("errno", tracked, first * PAGE, op="mmap", error=str(error))
            return
        with view:
            self.verify(tracked, first * PAGE, view[:], "mmap-read")
            for _ in range(self.rng.randint(1, 8)):
                start = self.rng.randrange(length)
                data = self.rng.randbytes(min(self.rng.randint(1, 2 * PAGE), length - start))
                view[start : start + len(data)] = data
                model.write(first * PAGE + start, data)
            self.verify(tracked, first * PAGE, view[:], "mmap-reread")
            self.note(f"mmap {tracked.name} [{first}, {end}) written")
            if self.rng.random() < MSYNC_CHANCE:
                try:
                    view.flush()
                    self.counters["msyncs"] += 1
                except OSError as error:
                    self.violation("errno", tracked, first * PAGE, op="msync", error=str(error))
            else:
                tracked.unsynced = True
        if self.rng.random() < PREAD_AFTER_MMAP_CHANCE:
            self.read(tracked, first * PAGE, length, "mmap-pread")

    def op_probe(self) -> None:
        """A child reads a volatile page through mmap: SIGBUS if purged, else the right bytes."""
        tracked = self.rng.choice(self.files)
        whole_pages = min(tracked.end_page, tracked.model.size // PAGE)
        pages = [
            index
            for index in range(tracked.first_page, whole_pages)
            if tracked.model.pages[index].volatile
        ]
        if not pages:
            return
        chosen = self.rng.sample(pages, min(len(pages), 8))
        lost = False
        page_index = chosen[0]
        for index in chosen:
            if vrange_status(tracked.fd, index * PAGE, PAGE)[1]:
                page_index, lost = index, True
                break
        candidates = tracked.model.pages[page_index].candidates()
        self.counters["probes"] += 1
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = PROBE_FAILED
            try:
                resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
                view = mmap.mmap(
                    tracked.fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ, offset=page_index * PAGE
                )
                code = 0 if view[:] in candidates else PROBE_WRONG_BYTES
            finally:
                os._exit(code)
        _pid, status = os.waitpid(pid, 0)
        self.note(f"probe {tracked.name} page {page_index} lost={lost}: status {status:#x}")
        if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGBUS:
            self.counters["sigbus"] += 1
        elif os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            self.counters["probe_data"] += 1
            if lost:
                self.counters["probe_data_after_purge"] += 1
        else:
            self.violation(
                "volatile-wrong-bytes"
                if os.WIFEXITED(status) and os.WEXITSTATUS(status) == PROBE_WRONG_BYTES
                else "probe",
                tracked,
                page_index * PAGE,
                op="probe",
                error=f"mmap reader child ended with wait status {status:#x}",
            )

    def op_truncate(self) -> None:
        tracked = self.rng.choice(self.own_files)
        size = self.rng.randrange(0, self.settings.file_pages * PAGE + 1)
        if self.rng.random() < TRUNCATE_TO_PAGE_CHANCE:
            size -= size % PAGE
        try:
            os.ftruncate(tracked.fd, size)
        except OSError as error:
            self.violation("errno", tracked, size, op="truncate", error=str(error))
            return
        self.note(f"truncate {tracked.name} {tracked.model.size} -> {size}")
        self.counters["truncates"] += 1
        tracked.model.truncate(size)
        if tracked.model.npages:
            self.status_is(tracked, 0, tracked.model.npages, "truncate")

    def op_cycle(self) -> None:
        tracked = self.rng.choice(self.own_files)
        self.finish_file(tracked, "cycle")
        self.counters["cycles"] += 1
        if not tracked.orphaned and self.rng.random() < ORPHAN_CHANCE:
            # Unlinked files live, volatile ranges and all, until their last close.
            os.unlink(tracked.path)
            tracked.orphaned = True
            self.counters["orphans"] += 1
            self.note(f"unlink {tracked.name}, kept open")
            return
        os.close(tracked.fd)
        how = pick(self.rng, REOPEN_ODDS)
        if tracked.orphaned:
            tracked.fd = os.open(tracked.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            tracked.model = FileModel()
            tracked.orphaned = False
            self.note(f"closed the unlinked {tracked.name}, created it anew")
        elif how == "reopen":
            tracked.fd = os.open(tracked.path, os.O_RDWR)
            self.note(f"reopen {tracked.name}")
        elif how == "truncate":
            tracked.fd = os.open(tracked.path, os.O_RDWR | os.O_TRUNC)
            tracked.model = FileModel()
            self.note(f"reopen {tracked.name} O_TRUNC")
        else:
            os.unlink(tracked.path)
            tracked.fd = os.open(tracked.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            tracked.model = FileModel()
            self.note(f"replace {tracked.name}")
        tracked.unsynced = False
        if tracked.model.npages:
            self.status_is(tracked, 0, tracked.model.npages, "reopen")
        size = os.fstat(tracked.fd).st_size
        if size != tracked.model.size:
            self.violation(
                "corrupt",
                tracked,
                size,
                op="reopen",
                error=f"size {size}, not {tracked.model.size}",
            )

    def op_fsync(self) -> None:
        tracked = self.rng.choice(self.files)
        try:
            os.fsync(tracked.fd)
        except OSError as error:
            self.violation("errno", tracked, 0, op="fsync", error=str(error))
            return
        tracked.unsynced = False

    # -- the loop -------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Operate until the deadline, then verify and close everything."""
        names = list(OPERATIONS)
        weights = list(OPERATIONS.values())
        while time.monotonic() < self.deadline:
            name = self.rng.choices(names, weights)[0]
            self.counters["ops"] += 1
            self.counters[f"op_{name}"] += 1
            getattr(self, f"op_{name}")()
        for tracked in self.files:
            self.finish_file(tracked, "final")
            os.close(tracked.fd)
        return self.report()


def _worker_process(
    index: int,
    settings: Settings,
    mountpoint: Path,
    shared: Path,
    deadline: float,
    connection: Connection,
) -> None:
    """Entry of a worker process: run, send the report, exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the run
    try:
        result = Worker(index, settings, mountpoint, shared, deadline).run()
    except BaseException:
        result = {"counters": {}, "violations": [], "crash": traceback.format_exc()}
    connection.send(result)
    connection.close()


# -- pressure ----------------------------------------------------------------------------------


class Pressure(threading.Thread):
    """Purges at random moments: pressure events through the FIFO, and VOLFS_IOC_PURGE."""

    def __init__(self, mountpoint: Path, fifo: Path, interval: float, seed: int) -> None:
        super().__init__(name="pressure", daemon=True)
        self.mountpoint = mountpoint
        self.fifo = fifo
        self.interval = interval
        self.rng = random.Random(f"{seed}/pressure")
        self.stopping = threading.Event()
        self.counters: collections.Counter[str] = collections.Counter()
        self.errors: list[str] = []

    def _open_fifo(self) -> int | None:
        # The daemon opens its end as it starts up: it gets as long as a mount does.
        deadline = time.monotonic() + volfs_mounts.MOUNT_TIMEOUT
        while True:
            try:
                return os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as error:
                # ENXIO: the daemon has not opened its end yet.
                if error.errno != errno.ENXIO or time.monotonic() > deadline:
                    self.errors.append(f"cannot open the pressure FIFO: {error}")
                    return None
            if self.stopping.wait(0.05):
                return None

    def run(self) -> None:
        directory = os.open(self.mountpoint, os.O_RDONLY)
        fifo = self._open_fifo()
        phase_end = 0.0
        try:
            while not self.stopping.wait(self.rng.expovariate(1 / self.interval)):
                now = time.monotonic()
                if now >= phase_end:
                    # Storms of purges, and calms in which volatile data piles up until the
                    # size cap has to purge it.
                    phase_end = now + self.rng.uniform(0.2, 2.0)
                    if self.rng.random() < CALM_CHANCE:
                        self.counters["calms"] += 1
                        if self.stopping.wait(phase_end - now):
                            return
                        continue
                    self.counters["storms"] += 1
                if fifo is not None and self.rng.random() < FIFO_EVENT_CHANCE:
                    try:
                        os.write(fifo, b"!")
                        self.counters["fifo_events"] += 1
                    except BlockingIOError:
                        self.counters["fifo_full"] += 1
                    continue
                nbytes = (
                    0 if self.rng.random() < PURGE_ALL_CHANCE else self.rng.randint(1, 64) * PAGE
                )
                try:
                    freed = purge(directory, nbytes)
                except OSError as error:
                    self.errors.append(f"VOLFS_IOC_PURGE({nbytes}): {error}")
                    if len(self.errors) > MAX_PRESSURE_ERRORS:
                        return
                    continue
                self.counters["purge_calls"] += 1
                self.counters["purge_all_calls" if nbytes == 0 else "purge_some_calls"] += 1
                self.counters["purge_ioctl_bytes"] += freed
        finally:
            if fifo is not None:
                os.close(fifo)
            os.close(directory)


# -- the soak ----------------------------------------------------------------------------------


def run_soak(mountpoint: Path, fifo: Path, settings: Settings) -> dict[str, Any]:
    """Run the workers and the pressure thread against a mounted volfs; return the report."""
    shared = mountpoint / "shared.bin"
    with open(shared, "wb") as file:
        file.truncate(settings.workers * settings.slice_pages * PAGE)
    context = multiprocessing.get_context("fork")
    started = time.monotonic()
    deadline = started + settings.duration
    workers: list[tuple[BaseProcess, Connection]] = []
    for index in range(settings.workers):
        receiver, sender = context.Pipe(duplex=False)
        process: BaseProcess = context.Process(
            target=_worker_process,
            args=(index, settings, mountpoint, shared, deadline, sender),
            name=f"soak-worker-{index}",
            daemon=True,
        )
        process.start()
        sender.close()
        workers.append((process, receiver))
    pressure = Pressure(mountpoint, fifo, settings.pressure_interval, settings.seed)
    pressure.start()
    counters: collections.Counter[str] = collections.Counter()
    violations: list[dict[str, Any]] = []
    errors: list[str] = []
    # Final verification takes a while after the deadline; a hung daemon takes forever.
    grace = 120.0 + settings.duration
    try:
        for index, (process, receiver) in enumerate(workers):
            remaining = deadline + grace - time.monotonic()
            if not receiver.poll(max(remaining, 0.0)):
                errors.append(f"worker {index} did not finish within {grace:.0f} s of the end")
                continue
            try:
                result = receiver.recv()
            except EOFError:
                errors.append(f"worker {index} died (exit code {process.exitcode})")
                continue
            counters.update(result["counters"])
            violations.extend(result["violations"])
            if "crash" in result:
                errors.append(f"worker {index} crashed:\n{result['crash']}")
    finally:
        pressure.stopping.set()
        pressure.join(timeout=60)
        for process, receiver in workers:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
            receiver.close()
        with contextlib.suppress(OSError):
            shared.unlink()
    errors.extend(pressure.errors)
    return {
        "elapsed_s": round(time.monotonic() - started, 1),
        "counters": dict(sorted(counters.items())),
        "pressure": dict(sorted(pressure.counters.items())),
        "violation_count": counters["violations"],
        "lost_bytes": counters["lost_bytes"],
        "corrupt_bytes": counters["corrupt_bytes"],
        "violations": violations,
        "errors": errors,
    }


# -- segments ----------------------------------------------------------------------------------

#: Pages of one segment of the segments phase.
SEGMENT_PAGES = 8
#: Segments of the shared file per worker.
SEGMENTS_PER_WORKER = 8
#: A segment is registered PARTIAL (else FULL).
SEGMENT_PARTIAL_CHANCE = 0.3
#: A pinned segment is written through a shared mapping (else with pwrite).
SEGMENT_MMAP_CHANCE = 0.3
#: An unpinned segment is read (it must hold the data or fail with EIO).
SEGMENT_READ_UNPINNED_CHANCE = 0.2


def _segment_violation(
    kind: str, segment: Segment, expected: bytes | None, got: bytes | None
) -> dict[str, Any]:
    wrong = [
        index // PAGE
        for index in range(0, len(got or b""), PAGE)
        if expected is None or (got or b"")[index : index + PAGE] != expected[index : index + PAGE]
    ]
    return {"kind": kind, "segment": segment.index, "offset": segment.offset, "pages": wrong}


def _pages_zero_or_expected(got: bytes, expected: bytes | None) -> bool:
    return all(
        got[index : index + PAGE] in (ZERO_PAGE, (expected or b"")[index : index + PAGE])
        for index in range(0, len(got), PAGE)
    )


class _SegmentWorker:
    """One worker of the segments phase: its segments of the shared file and its record of
    what each holds."""

    def __init__(self, path: str, first: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.size = SEGMENT_PAGES * PAGE
        self.counters: collections.Counter[str] = collections.Counter()
        self.violations: list[dict[str, Any]] = []
        self.fd = os.open(path, os.O_RDWR)
        self.table = SegmentTable(self.fd)
        self.mapping = mmap.mmap(self.fd, os.fstat(self.fd).st_size)
        self.segments = [
            self.table.register(
                index * self.size, self.size, partial=self.rng.random() < SEGMENT_PARTIAL_CHANCE
            )
            for index in range(first, first + SEGMENTS_PER_WORKER)
        ]
        self.written: dict[int, bytes] = {}

    def close(self) -> None:
        self.mapping.close()
        self.table.close()
        os.close(self.fd)

    def cycle(self) -> None:
        """Maybe read a segment while unpinned; pin, check, write and unpin it."""
        segment = self.rng.choice(self.segments)
        if self.rng.random() < SEGMENT_READ_UNPINNED_CHANCE and segment.state != SEGMENT_PINNED:
            self.read_unpinned(segment)
        self.check_pinned(segment, segment.pin())
        self.write_pinned(segment)
        segment.unpin()

    def read_unpinned(self, segment: Segment) -> None:
        """An unpinned segment reads as written, or fails with EIO (or a read stops at the
        first purged page), never anything else."""
        expected = self.written.get(segment.index)
        try:
            got = os.pread(self.fd, self.size, segment.offset)
        except OSError as error:
            self.counters["unpinned_eio" if error.errno == errno.EIO else "errors"] += 1
            return
        self.counters["unpinned_reads"] += 1
        if len(got) < self.size:
            self.counters["unpinned_cut_reads"] += 1
        if expected is not None and not expected.startswith(got):
            self.violations.append(_segment_violation("unpinned", segment, expected, got))

    def check_pinned(self, segment: Segment, purged: bool) -> None:
        """What a pin found: exactly what was written, or (purged) zeros where it was lost."""
        self.counters["pins"] += 1
        expected = self.written.get(segment.index)
        got = os.pread(self.fd, self.size, segment.offset)
        if purged:
            self.counters["purged_pins"] += 1
            if not _pages_zero_or_expected(got, expected):
                self.violations.append(_segment_violation("corrupt", segment, expected, got))
        elif expected is not None and got != expected:
            kind = "lost" if not any(got) else "corrupt"
            self.violations.append(_segment_violation(kind, segment, expected, got))

    def write_pinned(self, segment: Segment) -> None:
        """Fresh bytes, through the mapping or pwrite; ENOSPC changes nothing."""
        data = self.rng.randbytes(self.size)
        try:
            if self.rng.random() < SEGMENT_MMAP_CHANCE:
                self.mapping[segment.offset : segment.offset + self.size] = data
                self.counters["mmap_writes"] += 1
            else:
                os.pwrite(self.fd, data, segment.offset)
                self.counters["writes"] += 1
            self.written[segment.index] = data
        except OSError as error:
            if error.errno != errno.ENOSPC:
                raise
            self.counters["enospc"] += 1


def _segment_worker(path: str, first: int, seconds: float, seed: int) -> dict[str, Any]:
    """Cycle segments ``[first, first + SEGMENTS_PER_WORKER)`` of ``path`` for ``seconds``;
    return the counters and violations."""
    worker = _SegmentWorker(path, first, seed)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            worker.cycle()
    finally:
        worker.close()
    worker.counters["violations"] = len(worker.violations)
    return {"counters": dict(worker.counters), "violations": worker.violations[:MAX_REPORTED]}


def run_segments(mountpoint: Path, seconds: float, workers: int, seed: int) -> dict[str, Any]:
    """Workers pin, check, write and unpin segments of one shared file while a thread purges;
    return the counters, the violations and the errors."""
    path = mountpoint / "segments.bin"
    path.write_bytes(bytes(workers * SEGMENTS_PER_WORKER * SEGMENT_PAGES * PAGE))
    keeper = os.open(path, os.O_RDWR)  # the table lives while any worker comes and goes
    rng = random.Random(seed)
    stopping = threading.Event()
    purges = collections.Counter[str]()
    errors: list[str] = []

    def purge_now_and_then() -> None:
        while not stopping.wait(rng.uniform(0, 0.01)):
            try:
                purge(
                    mountpoint,
                    0 if rng.random() < PURGE_ALL_CHANCE else rng.randrange(1, 64) * PAGE,
                )
                purges["ioctl"] += 1
            except OSError as error:
                errors.append(f"purge failed: {error}")
                return

    purger = threading.Thread(target=purge_now_and_then, name="segment-purges")
    purger.start()
    counters: collections.Counter[str] = collections.Counter()
    violations: list[dict[str, Any]] = []
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            results = pool.starmap(
                _segment_worker,
                [
                    (str(path), index * SEGMENTS_PER_WORKER, seconds, seed + index)
                    for index in range(workers)
                ],
            )
        for result in results:
            counters.update(result["counters"])
            violations.extend(result["violations"])
    except Exception:
        errors.append(traceback.format_exc())
    finally:
        stopping.set()
        purger.join()
        os.close(keeper)
        with contextlib.suppress(OSError):
            path.unlink()
    return {
        "counters": dict(sorted(counters.items())),
        "purges": dict(purges),
        "violation_count": counters["violations"],
        "violations": violations,
        "errors": errors,
    }


# -- the race ----------------------------------------------------------------------------------


def _delay(microseconds: int) -> None:
    """Shift one side of the race a little; sleeping leaves the GIL to the other side."""
    if microseconds:
        time.sleep(microseconds / 1e6)


@dataclass
class _PurgeShot:
    """The purging side of one race iteration."""

    directory: int
    nbytes: int
    delay_us: int
    barrier: threading.Barrier
    freed: int = -1
    error: str = ""

    def __call__(self) -> None:
        try:
            self.barrier.wait()
            _delay(self.delay_us)
            self.freed = purge(self.directory, self.nbytes)
        except (OSError, threading.BrokenBarrierError) as error:
            self.error = str(error)


def _page_states(pattern: bytes, content: bytes) -> list[str]:
    """Per page: ``intact``, ``zero`` or ``other``."""
    states = []
    for index in range(len(pattern) // PAGE):
        page = content[index * PAGE : (index + 1) * PAGE]
        if page == pattern[index * PAGE : (index + 1) * PAGE]:
            states.append("intact")
        elif page == ZERO_PAGE:
            states.append("zero")
        else:
            states.append("other")
    return states


def _race_problem(
    states: list[str], full: bool, head: int, purged_head: bool, purged_tail: bool
) -> tuple[str, str] | None:
    """What is wrong with one race outcome, as ``(kind, explanation)``, or None.

    ``states`` are the pages as read right after each NON_VOLATILE (head, then the tail).
    """
    pages = len(states)
    if "other" in states:
        return "corrupt", "a page read neither the pattern nor zeros"
    zeros = [index for index, state in enumerate(states) if state == "zero"]
    # Purged pages are the whole range (FULL), a tail of it (PARTIAL), or the tail piece
    # left volatile after the head was unmarked.
    if zeros and zeros != list(range(zeros[0], pages)):
        return "half", "zero pages are not a tail of the range"
    cut = zeros[0] if zeros else pages
    if full and 0 < cut < head:
        return "half", "part of a FULL range was purged"
    for name, first, end, purged in (
        ("head", 0, head, purged_head),
        ("tail", head, pages, purged_tail),
    ):
        if first == end or purged == (cut < end):
            continue
        if purged:
            return "stale", f"purged=1 for the {name}, yet it read the old data"
        return "half", f"purged=0 for the {name}, yet some of it read zeros"
    return None


def run_race(
    mountpoint: Path, iterations: int, seed: int, pages: int = 16, decoy_pages: int = 8
) -> dict[str, Any]:
    """Race a purge against NON_VOLATILE of the same range; check all or nothing.

    Each iteration writes a fresh pattern of ``pages`` pages, reads it (so the kernel caches
    it), marks it volatile (FULL or PARTIAL), sometimes behind an older volatile decoy file a
    small purge takes first, then releases two threads at once: one purges (all volatile data,
    or a few pages), the other marks the range non-volatile, whole or its head first, and
    reads it back at once. Whatever the order, the outcome must be one of:

    - the purge came second: purged=0 and every page intact;
    - the purge came first: purged=1, and the purged pages read as zeros: the whole range for
      FULL, a tail of it for PARTIAL; a head unmarked before the purge stays intact and
      reports purged=0 while the tail reports purged=1.

    Read again after the purge has returned, the range must read the same.

    Returns:
        ``{"iterations", "outcomes", "violation_count", "violation_kinds", "violations",
        "errors"}``: violations are ``half`` (zeros with purged=0, or part of a FULL range
        purged), ``stale`` (purged=1, yet the old data read back), ``unstable`` (the range read
        differently once the purge had returned), ``corrupt`` and ``status``.
    """
    race = _Race(mountpoint, seed, pages, decoy_pages)
    try:
        for iteration in range(iterations):
            if not race.run_once(iteration):
                break
    finally:
        race.close()
    return race.report()


@dataclass
class _Round:
    """One race iteration: what was chosen, and what came back."""

    pattern: bytes
    full: bool
    with_decoy: bool
    #: What the purge asked for (0: everything) and how many pages were unmarked first.
    nbytes: int = 0
    head: int = 0
    freed: int = -1
    purged_head: bool = False
    purged_tail: bool = False
    #: The range read right after unmarking, and again once the purge had returned.
    first_read: bytes = b""
    second_read: bytes = b""
    #: VRANGE_STATUS of the race file once all of it was unmarked.
    leftover: tuple[int, int] = (0, 0)


class _Race:
    """The race file, its decoy and the tallies of :func:`run_race`."""

    def __init__(self, mountpoint: Path, seed: int, pages: int, decoy_pages: int) -> None:
        self.rng = random.Random(f"{seed}/race")
        self.pages, self.decoy_pages = pages, decoy_pages
        self.span = pages * PAGE
        self.path = mountpoint / "race.bin"
        self.decoy_path = mountpoint / "race-decoy.bin"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.decoy = os.open(self.decoy_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        self.directory = os.open(mountpoint, os.O_RDONLY)
        self.outcomes: collections.Counter[str] = collections.Counter()
        self.kinds: collections.Counter[str] = collections.Counter()
        self.violations: list[dict[str, Any]] = []
        self.errors: list[str] = []

    def fail(self, kind: str, iteration: int, **details: Any) -> None:
        """Count a violation; keep the first few of each kind in full."""
        self.outcomes["violations"] += 1
        self.kinds[kind] += 1
        if self.kinds[kind] <= MAX_REPORTED:
            self.violations.append(
                {"kind": kind, "iteration": iteration, "file": str(self.path), **details}
            )
        log.error("race %d: %s: %s", iteration, kind, details)

    def run_once(self, iteration: int) -> bool:
        """One iteration; False if the purge itself failed, which ends the race."""
        self.outcomes["iterations"] += 1
        rng = self.rng
        full = rng.random() < RACE_FULL_CHANCE
        pattern = rng.randbytes(self.span)
        if (
            os.pwrite(self.fd, pattern, 0) != self.span
            or os.pread(self.fd, self.span, 0) != pattern
        ):
            self.fail("corrupt", iteration, error="the pattern did not read back before the race")
            return True
        one = _Round(pattern, full, with_decoy=rng.random() < RACE_DECOY_CHANCE)
        if one.with_decoy:
            os.pwrite(self.decoy, rng.randbytes(self.decoy_pages * PAGE), 0)
            fvrange(self.decoy, 0, self.decoy_pages * PAGE, VRANGE_VOLATILE)
        fvrange(self.fd, 0, self.span, VRANGE_VOLATILE, VRANGE_FULL if full else VRANGE_PARTIAL)
        error = self.race(one)
        if error:
            self.errors.append(f"race {iteration}: purge failed: {error}")
            return False
        self.unmark_the_rest(one)
        self.judge(iteration, one)
        return True

    def race(self, one: _Round) -> str:
        """Release a purge and a NON_VOLATILE of the head at once; the purge's error, if any."""
        rng = self.rng
        pages = self.pages
        if rng.random() < RACE_PURGE_ALL_CHANCE:
            one.nbytes = 0
        else:
            one.nbytes = rng.randint(1, self.decoy_pages + pages) * PAGE
        one.head = pages if rng.random() < RACE_WHOLE_UNMARK_CHANCE else rng.randint(1, pages - 1)
        barrier = threading.Barrier(2)
        purge_delay = rng.choice([0, 0, rng.randrange(300)])
        shot = _PurgeShot(self.directory, one.nbytes, purge_delay, barrier)
        thread = threading.Thread(target=shot, name="race-purge")
        thread.start()
        own_delay = rng.choice([0, 0, rng.randrange(300)])
        barrier.wait()
        _delay(own_delay)
        _marked, one.purged_head = fvrange(self.fd, 0, one.head * PAGE, VRANGE_NONVOLATILE)
        one.first_read = os.pread(self.fd, one.head * PAGE, 0)
        thread.join()
        one.freed = shot.freed
        return shot.error

    def unmark_the_rest(self, one: _Round) -> None:
        """Unmark the tail (and the decoy) once the purge has returned; read the range again."""
        start = one.head * PAGE
        if one.head < self.pages:
            _marked, one.purged_tail = fvrange(
                self.fd, start, self.span - start, VRANGE_NONVOLATILE
            )
            one.first_read += os.pread(self.fd, self.span - start, start)
        one.second_read = os.pread(self.fd, self.span, 0)
        if one.with_decoy:
            fvrange(self.decoy, 0, self.decoy_pages * PAGE, VRANGE_NONVOLATILE)
        one.leftover = vrange_status(self.fd)

    def judge(self, iteration: int, one: _Round) -> None:
        """Count the outcome of one iteration, or the violation it shows."""
        details: dict[str, Any] = {
            "flags": "FULL" if one.full else "PARTIAL",
            "head_pages": one.head,
            "pages": self.pages,
            "purge_bytes": one.nbytes,
            "purge_freed": one.freed,
            "purged_head": int(one.purged_head),
            "purged_tail": int(one.purged_tail),
        }
        states = _page_states(one.pattern, one.first_read)
        details["pages_read"] = "".join(state[0] for state in states)
        stable = one.second_read == one.first_read
        if not stable:
            later = _page_states(one.pattern, one.second_read)
            details["pages_read_after_purge"] = "".join(state[0] for state in later)
        if one.leftover != (0, 0):
            self.fail(
                "status", iteration, error=f"status after unmarking: {one.leftover}", **details
            )
        problem = _race_problem(states, one.full, one.head, one.purged_head, one.purged_tail)
        if problem is None and not stable:
            problem = "unstable", "the range changed once the purge had returned"
        if problem is not None:
            self.fail(problem[0], iteration, error=problem[1], **details)
            return
        self.outcomes[self.outcome(one, states)] += 1

    def outcome(self, one: _Round, states: list[str]) -> str:
        """Which of the allowed outcomes one iteration had."""
        cut = states.index("zero") if "zero" in states else self.pages
        if cut == self.pages:
            # With nothing else volatile, a purge of everything came second.
            return "intact_purge_all" if one.nbytes == 0 and not one.with_decoy else "intact"
        if cut < one.head:
            return "purged"
        return "split"  # the head was unmarked, then the tail purged

    def close(self) -> None:
        """Close and remove the race files."""
        os.close(self.directory)
        os.close(self.decoy)
        os.close(self.fd)
        for name in (self.path, self.decoy_path):
            with contextlib.suppress(OSError):
                name.unlink()

    def report(self) -> dict[str, Any]:
        """The result :func:`run_race` returns."""
        return {
            "iterations": self.outcomes["iterations"],
            "outcomes": {
                key: self.outcomes[key] for key in ("purged", "intact_purge_all", "intact", "split")
            },
            "violation_count": self.outcomes["violations"],
            "violation_kinds": dict(self.kinds),
            "violations": self.violations,
            "errors": self.errors,
        }


# -- reporting ---------------------------------------------------------------------------------


def render(report: dict[str, Any]) -> str:
    """The report as text."""
    lines = [f"volfs soak: {'PASS' if report['ok'] else 'FAIL'}", ""]
    settings = report["settings"]
    lines.append("settings: " + ", ".join(f"{key}={value}" for key, value in settings.items()))
    soak = report.get("soak")
    if soak:
        lines.append(f"soak: {soak['elapsed_s']} s")
        width = max(len(key) for key in [*soak["counters"], *soak["pressure"], "x"])
        lines.append("  workers:")
        lines.extend(f"    {key:<{width}} {value}" for key, value in soak["counters"].items())
        lines.append("  pressure thread:")
        lines.extend(f"    {key:<{width}} {value}" for key, value in soak["pressure"].items())
        lines.append(
            f"  violations: {soak['violation_count']} (lost bytes {soak['lost_bytes']}, "
            f"corrupted bytes {soak['corrupt_bytes']})"
        )
    segments = report.get("segments")
    if segments:
        counters = ", ".join(f"{key}={value}" for key, value in segments["counters"].items())
        lines.append(f"segments: {counters}; {segments['violation_count']} violations")
    race = report.get("race")
    if race:
        outcomes = ", ".join(f"{key}={value}" for key, value in race["outcomes"].items())
        kinds = ", ".join(f"{key}={value}" for key, value in race["violation_kinds"].items())
        lines.append(
            f"race: {race['iterations']} iterations ({outcomes}), "
            f"{race['violation_count']} violations ({kinds or 'none'})"
        )
    if report.get("statistics"):
        lines.append(
            "daemon counters: "
            + ", ".join(f"{key}={value}" for key, value in report["statistics"].items())
        )
    lines.append(
        f"daemon: exit status {report['daemon']['exit_status']}, "
        f"logged an exception: {report['daemon']['logged_exception']}"
    )
    for violation in [
        *(soak or {}).get("violations", []),
        *(segments or {}).get("violations", []),
        *(race or {}).get("violations", []),
    ]:
        lines.append("")
        history = violation.pop("history", [])
        lines.append("VIOLATION " + json.dumps(violation))
        lines.extend(f"    {entry}" for entry in history)
    for error in report["errors"]:
        lines.append(f"ERROR {error}")
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        description="Soak volfs: random I/O, volatile ranges, purges and a tight size cap, "
        "with every byte checked against a model.",
    )
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of soak (60)")
    parser.add_argument("--workers", type=int, default=4, help="worker processes (4)")
    parser.add_argument(
        "--size", type=positive_size, default="4M", help="the mount's size= cap (4M)"
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: time)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--files", type=int, default=2, help="own files per worker (2)")
    parser.add_argument(
        "--file-pages", type=int, default=256, help="largest own file, in pages (256)"
    )
    parser.add_argument(
        "--slice-pages", type=int, default=64, help="pages of the shared file per worker (64)"
    )
    parser.add_argument(
        "--pressure-batch",
        type=positive_size,
        default="256k",
        help="bytes purged per pressure event (256k)",
    )
    parser.add_argument(
        "--pressure-interval",
        type=float,
        default=0.01,
        help="mean seconds between two purges of the pressure thread (0.01)",
    )
    parser.add_argument(
        "--segment-seconds", type=float, default=20.0, help="seconds of the segments phase (20)"
    )
    parser.add_argument(
        "--race-iterations", type=int, default=300, help="iterations of the race phase (300)"
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="where to make the mountpoint (a temp dir)"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    return parser


def settings_from(arguments: argparse.Namespace, parser: argparse.ArgumentParser) -> Settings:
    """The settings the command line gives; a usage error (exit 2) if they make no sense."""
    if arguments.workers < 1 or arguments.files < 1 or arguments.file_pages < MIN_FILE_PAGES:
        parser.error(
            f"--workers and --files must be at least 1, --file-pages at least {MIN_FILE_PAGES}"
        )
    if arguments.slice_pages < 1 or arguments.duration < 0 or arguments.pressure_interval <= 0:
        parser.error("--slice-pages must be at least 1, the duration and interval positive")
    if shutil.which("fusermount3") is None:
        parser.error("fusermount3 is not installed")
    return Settings(
        duration=arguments.duration,
        workers=arguments.workers,
        size=arguments.size,
        files=arguments.files,
        file_pages=arguments.file_pages,
        slice_pages=arguments.slice_pages,
        pressure_batch=arguments.pressure_batch,
        pressure_interval=arguments.pressure_interval,
        race_iterations=arguments.race_iterations,
        segment_seconds=arguments.segment_seconds,
        seed=arguments.seed if arguments.seed is not None else time.time_ns() % 1_000_000_007,
    )


def run_on_own_mount(settings: Settings, report: dict[str, Any], workdir: Path | None) -> None:
    """Mount a volfs in a temporary directory, soak and race it, and record how it went."""
    options = f"size={settings.size},pressure_batch={settings.pressure_batch},pressure_watermark=0"
    with tempfile.TemporaryDirectory(prefix="volfs-soak-", dir=workdir) as temporary:
        fifo, mountpoint = Path(temporary) / "pressure", Path(temporary) / "mnt"
        os.mkfifo(fifo)
        mountpoint.mkdir()
        daemon_outcome: dict[str, object] = {}
        try:
            with volfs_mounts.mounted(
                volfs_mounts.volfs_command(mountpoint, options),
                mountpoint,
                Path(temporary) / "volfs.log",
                env={"MEMORY_PRESSURE_WATCH": str(fifo)},
                outcome=daemon_outcome,
            ):
                if settings.duration > 0:
                    report["soak"] = run_soak(mountpoint, fifo, settings)
                if settings.segment_seconds > 0:
                    report["segments"] = run_segments(
                        mountpoint, settings.segment_seconds, settings.workers, settings.seed
                    )
                if settings.race_iterations > 0:
                    report["race"] = run_race(mountpoint, settings.race_iterations, settings.seed)
                report["statistics"] = statistics(mountpoint)
        except volfs_mounts.MountError as error:
            report["errors"].append(str(error))
        except OSError as error:
            report["errors"].append(f"{error} (the daemon may have died)")
        except KeyboardInterrupt:
            report["errors"].append("interrupted")
        if daemon_outcome:
            report["daemon"] = {
                key: daemon_outcome[key] for key in ("exit_status", "logged_exception")
            }
            if "log" in daemon_outcome:
                report["errors"].append(f"daemon log:\n{str(daemon_outcome['log'])[-20_000:]}")


def judge_report(report: dict[str, Any]) -> None:
    """Gather the phases' errors and set ``ok``: no error, no violation, a clean daemon exit."""
    for phase in ("soak", "segments", "race"):
        if report[phase]:
            report["errors"].extend(report[phase]["errors"])
    report["ok"] = (
        not report["errors"]
        and report["daemon"]["exit_status"] == 0
        and not report["daemon"]["logged_exception"]
        and all(
            not report[phase] or not report[phase]["violation_count"]
            for phase in ("soak", "segments", "race")
        )
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the soak and the race on a volfs of its own; 0 if nothing was lost, 1 otherwise."""
    parser = build_parser()
    arguments = parser.parse_args(argv)
    settings = settings_from(arguments, parser)
    logging.basicConfig(
        level=logging.INFO if arguments.verbose else logging.WARNING,
        format="%(asctime)s soak: %(message)s",
    )
    report: dict[str, Any] = {
        "ok": False,
        "settings": asdict(settings),
        "soak": None,
        "segments": None,
        "race": None,
        "statistics": None,
        "daemon": {"exit_status": None, "logged_exception": False},
        "errors": [],
    }
    run_on_own_mount(settings, report, arguments.workdir)
    judge_report(report)
    if arguments.json:
        print(json.dumps(report, indent=1))
    else:
        print(render(report))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
