"""Segments without FUSE: a file's users pin and unpin through the shared table while the
daemon purges, against a per-page model. Nothing pinned is ever lost.

A Hypothesis state machine drives a :class:`Namespace` directly. Its client steps are what a
program does with its descriptors and its own mapping of each file's table: register and
release segments (the ioctls), pin and unpin them (``volfs._segments``, volfs.h's functions),
write, read, ask VRANGE_STATUS, close the last handle and open again. Its daemon steps are
purges of every size and budget whose claims stay unpublished until a step of their own
publishes them, as the reclaimer does once the kernel's cache is dropped; a pin meeting a
claim in progress (PURGING) waits, modelled as a pin that resumes once the word changes.

The model keeps, per file, the bytes each page must read, the pages the store holds, and the
pages lost and not yet reported; per segment, its span and state word. Purges are observed
rather than predicted (which segments the claims name, which pages the invalidations name) and
checked against the policy: only unpinned segments are claimed (and purged ones holding pages
again), the unpinned oldest first; FULL ones go whole, PARTIAL ones from their end, those past
EOF as a unit; a complete purge leaves no unpinned segment and no purged one holding a page.

After every step, without side effects: the state words, every byte of every file, the held
pages, the lost pages the daemon keeps, the mount's segment count and volatile bytes, and the
store's accounting. Reads, status and pins are checked where they happen, since they change
what the daemon knows (a read or a status learns of the pins that reported purges).

:class:`ScribbledSegmentsMachine` also writes garbage into the tables, as a hostile client
could: the daemon must go on raising nothing but OSError and must never touch data outside the
scribbled table's segments; the other tables keep the whole model.
"""

from __future__ import annotations

import errno
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from volfs import _segments
from volfs.abi import (
    PAGE_SHIFT,
    PAGE_SIZE,
    SEGMENT_FREE,
    SEGMENT_PINNED,
    SEGMENT_PURGED,
    SEGMENT_PURGING,
    SEGMENT_SLOT,
    SEGMENT_STALE,
    SEGMENT_STAMP_OFFSET,
    SEGMENT_UNPINNED,
    VRANGE_PARTIAL,
    VRANGE_VOLATILE,
    pages_for,
    segment_slot_offset,
)
from volfs.core import purge
from volfs.core.inode import Inode
from volfs.core.namespace import ROOT_INODE, Namespace
from volfs.core.purge import PurgePass
from volfs.core.segments import SEGMENT_RECORD_BYTES, Segment, SegmentTable
from volfs.core.store import Store

T = TypeVar("T")

STORE_PAGES = 64
#: Files start with this many pages or a little less, and grow by writes up to MAX_PAGES.
FILE_PAGES = 6
MAX_PAGES = 9
#: Slots of the tables asked for (an existing table keeps its own).
CAPACITIES = (1, 2, 3, 3, 4, 4)
#: A pin's daemon pid: a pin never waits here (it is deferred instead), so any live pid.
DAEMON_PID = os.getpid()

#: The pattern data is cut from: no zero byte, so a purged page never passes for data.
PATTERN = bytes(range(1, 252)) * ((MAX_PAGES + 2) * PAGE_SIZE // 251 + 2)

files = st.integers(0, 1)
#: A segment to register: first page, pages, PARTIAL, unpinned at once.
NewSegment = tuple[int, int, bool, bool]
new_segments = st.lists(
    st.tuples(st.integers(0, FILE_PAGES - 1), st.integers(1, 3), st.booleans(), st.booleans()),
    max_size=3,
)
#: A slot: mostly one holding a segment, sometimes any (a free one, or one past the table).
slots = st.tuples(st.sampled_from((True, True, True, False)), st.integers(0, 7))


def pattern(seed: int, length: int) -> bytes:
    """``length`` nonzero bytes, different for each seed."""
    start = seed % 251
    return PATTERN[start : start + length]


@dataclass(eq=False)
class SegmentModel:
    """What a segment must be: its daemon record (identity), its span, its state word."""

    segment: Segment
    first: int
    end: int
    partial: bool
    state: int = SEGMENT_PINNED


@dataclass(eq=False)
class TableModel:
    """One table of a file: the daemon's object, the client's own mapping, its segments."""

    table: SegmentTable
    view: mmap.mmap
    segments: dict[int, SegmentModel] = field(default_factory=dict)
    #: The file's last close ended it: every word STALE.
    ended: bool = False
    #: Garbage was written into it: its state words and stamps mean nothing any more.
    scribbled: bool = False


@dataclass(eq=False)
class FileModel:
    """One regular file: the bytes it must read, the pages it holds, the pages it lost."""

    name: bytes
    inode: Inode
    content: bytearray
    held: set[int]
    #: Pages purged and not reported, rewritten or truncated: True if they must fail reads
    #: with EIO, False if they may (a scribbled table may have made the daemon take garbage
    #: for a pin that reported them, or for no pin after one that did).
    lost: dict[int, bool] = field(default_factory=dict)
    #: Pages a pin reported purged (zeros since), which the daemon keeps lost until it looks
    #: at the pin's word: a scribble before then may hide the pin from it for good.
    reported: set[int] = field(default_factory=set)
    opens: int = 0
    table: TableModel | None = None
    #: Tables ended by a last close, whose mappings the client still has.
    old_tables: list[TableModel] = field(default_factory=list)

    @property
    def eof_page(self) -> int:
        return pages_for(len(self.content))


def outcome(call: Callable[[], T]) -> tuple[T | None, int | None]:
    """Run a daemon-side or client call: its result, or the errno of the OSError it raised.

    Anything but OSError escapes: the daemon must never fail otherwise, whatever the table
    holds.
    """
    try:
        return call(), None
    except OSError as error:
        assert error.errno is not None
        return None, error.errno


def name_of(number: int | None) -> str:
    return "success" if number is None else errno.errorcode.get(number, str(number))


class SegmentsMachine(RuleBasedStateMachine):
    """Clients and the daemon taking turns on the segments of one or two files."""

    def __init__(self) -> None:
        super().__init__()
        self.store = Store(STORE_PAGES * PAGE_SIZE)
        self.namespace = Namespace(
            self.store, max_inodes=0, root_mode=0o755, root_uid=0, root_gid=0
        )
        self.files: list[FileModel] = []
        #: Claims of purges not published yet, oldest first.
        self.pending: list[Segment] = []
        #: Pins that met a PURGING word and wait for it to change: (table, slot).
        self.waiting: list[tuple[TableModel, int]] = []

    # -- helpers ----------------------------------------------------------------------------

    def _file(self, pick: int) -> FileModel:
        return self.files[pick % len(self.files)]

    def _tables(self) -> list[TableModel]:
        return [f.table for f in self.files if f.table is not None]

    def _owner(self, segment: Segment) -> tuple[FileModel, TableModel, SegmentModel] | None:
        """The file, live table and model of a registered segment, if it still is."""
        for f in self.files:
            table = f.table
            if table is not None and table.table is segment.table:
                model = table.segments.get(segment.index)
                if model is not None and model.segment is segment:
                    return f, table, model
        return None

    @staticmethod
    def _slot(table: TableModel, pick: tuple[bool, int]) -> int:
        usual, index = pick
        if usual and table.segments:
            return sorted(table.segments)[index % len(table.segments)]
        return index % (table.table.capacity + 1)

    @staticmethod
    def _word(table: TableModel, index: int) -> int:
        return _segments.state(table.view, index)

    def _lose(self, f: FileModel, first: int, end: int, *, certain: bool) -> int:
        """Pages [first, end) of ``f`` were purged: released, zeros, lost. Returns the pages
        that were held."""
        freed = 0
        for page in range(first, end):
            if page in f.held:
                f.held.discard(page)
                freed += 1
            f.lost[page] = certain
        low, high = first << PAGE_SHIFT, min(end << PAGE_SHIFT, len(f.content))
        if low < high:
            f.content[low:high] = bytes(high - low)
        return freed

    def _pin(self, table: TableModel, index: int) -> None:
        """A client pins slot ``index``; it waits (is deferred) while the word is PURGING."""
        if self._word(table, index) == SEGMENT_PURGING:
            # The real pin sleeps on the word until the daemon publishes; never call it here.
            if not table.scribbled:
                model = table.segments.get(index)
                assert model is not None and model.state == SEGMENT_PURGING, (index, model)
            self.waiting.append((table, index))
            return
        purged, error = outcome(lambda: _segments.pin(table.view, index, DAEMON_PID))
        if table.scribbled and not table.ended:
            assert error in (None, errno.EINVAL, errno.ESTALE), name_of(error)
            return
        model = table.segments.get(index)
        if table.ended:
            expected: int | None = errno.ESTALE
        elif model is None:
            expected = errno.EINVAL
        else:
            expected = None
        assert error == expected, f"pin: {name_of(error)}, not {name_of(expected)}"
        if model is None or table.ended:
            return
        # Purged exactly when a purge took some of it since the last pin that returned.
        assert purged == (model.state == SEGMENT_PURGED), (purged, model.state)
        model.state = SEGMENT_PINNED
        if purged:
            owner = self._owner(model.segment)
            assert owner is not None
            f = owner[0]
            for page in range(model.first, model.end):
                if f.lost.pop(page, None) is not None:  # reported: zeros from now on
                    f.reported.add(page)

    def _resume_pins(self) -> None:
        """Pins waiting on a word that is no longer PURGING go on."""
        for waiting in list(self.waiting):
            table, index = waiting
            if self._word(table, index) != SEGMENT_PURGING:
                self.waiting.remove(waiting)
                self._pin(table, index)

    # -- setup ------------------------------------------------------------------------------

    @initialize(
        sizes=st.lists(
            st.integers((FILE_PAGES - 1) * PAGE_SIZE + 1, FILE_PAGES * PAGE_SIZE),
            min_size=1,
            max_size=2,
        ),
        seed=st.integers(0, 250),
        capacities=st.tuples(st.sampled_from(CAPACITIES), st.sampled_from(CAPACITIES)),
        segments=st.tuples(new_segments, new_segments),
    )
    def create_files(
        self,
        sizes: list[int],
        seed: int,
        capacities: tuple[int, int],
        segments: tuple[list[NewSegment], list[NewSegment]],
    ) -> None:
        for number, size in enumerate(sizes):
            name = b"f%d" % number
            inode = self.namespace.mknod(ROOT_INODE, name, 0o644, 0, 0)
            data = pattern(seed + number, size)
            assert self.namespace.write(inode, 0, data) == size
            self.files.append(FileModel(name, inode, bytearray(data), set(range(pages_for(size)))))
            # Whichever rules a run leaves out, the others get a table and segments.
            self.open_file(number, capacities[number], segments[number])

    # -- client steps -----------------------------------------------------------------------

    @rule(pick=files, capacity=st.sampled_from(CAPACITIES), segments=new_segments)
    def open_file(self, pick: int, capacity: int, segments: list[NewSegment]) -> None:
        """A program opens the file (twice, when it was closed: a close is not always the
        last), asks for its table and registers its segments."""
        f = self._file(pick)
        if f.opens >= 3:
            return
        for _new in range(2 if f.opens == 0 else 1):
            self.namespace.open(f.inode)
            f.opens += 1
        self.get_table(pick, capacity)
        for first, pages, partial, unpinned in segments:
            self.register(pick, first, pages, partial, unpinned)

    @rule(pick=files)
    def close_file(self, pick: int) -> None:
        f = self._file(pick)
        if not f.opens:
            return
        self.namespace.close(f.inode)
        self.namespace.discard_ended()
        f.opens -= 1
        table = f.table
        if f.opens or table is None:
            return
        # The last close: the table ends, pins and unpins fail from now on; what a pin
        # reported is zeros, what nobody was told of stays lost.
        table.ended = True
        f.table = None
        f.old_tables.append(table)
        self._resume_pins()

    def get_table(self, pick: int, capacity: int) -> None:
        """VOLFS_IOC_SEGMENTS and the handover: the file's table, mapped by the client."""
        f = self._file(pick)
        if not f.opens:
            return  # VOLFS_IOC_SEGMENTS needs a descriptor
        table = self.namespace.volatility.segment_table(f.inode, capacity)
        if f.table is not None:
            assert table is f.table.table, "a file has one table while it is open"
            return
        assert table.capacity == capacity
        # The client's own mapping, as it gets it through the memfd: it outlives the daemon's.
        view = mmap.mmap(table.memfd, table.size)
        f.table = TableModel(table, view)

    @rule(
        pick=files,
        first=st.integers(0, FILE_PAGES),
        pages=st.sampled_from((1, 1, 2, 2, 3, 0)),
        partial=st.booleans(),
        unpinned=st.booleans(),
    )
    def register(
        self, pick: int, first: int, pages: int, partial: bool, unpinned: bool = False
    ) -> None:
        """Register a segment (it starts pinned); ``unpinned`` unpins it at once, as a cache
        that fills its segment before registering it would."""
        f = self._file(pick)
        if not f.opens:
            return
        end = first + pages
        flags = VRANGE_PARTIAL if partial else 0
        segment, error = outcome(
            lambda: self.namespace.volatility.register(
                f.inode, first << PAGE_SHIFT, pages << PAGE_SHIFT, flags
            )
        )
        table = f.table
        lost = [f.lost[page] for page in range(first, end) if page in f.lost]
        expected: set[int | None]
        if table is None:
            expected = {errno.ENOENT}
        elif pages == 0 or end > f.eof_page:
            expected = {errno.EINVAL}
        elif any(lost) or any(s.first < end and first < s.end for s in table.segments.values()):
            expected = {errno.EBUSY}
        else:
            fits = None if len(table.segments) < table.table.capacity else errno.ENOSPC
            # Pages a scribbled table may have made the daemon forget: lost or not.
            expected = {errno.EBUSY, fits} if lost else {fits}
        assert error in expected, f"register: {name_of(error)}, not {expected}"
        if segment is None:
            return
        assert table is not None
        assert segment.index not in table.segments and segment.index < table.table.capacity
        assert (segment.first, segment.end, segment.partial) == (first, end, partial)
        for page in range(first, end):
            f.lost.pop(page, None)  # the daemon had none lost there
        table.segments[segment.index] = SegmentModel(segment, first, end, partial)
        self._resume_pins()
        if unpinned:
            self.unpin(pick, (False, segment.index))

    @rule(pick=files, slot=slots)
    def release(self, pick: int, slot: tuple[bool, int]) -> None:
        f = self._file(pick)
        if not f.opens:
            return
        table = f.table
        index = slot[1] if table is None else self._slot(table, slot)
        segment, error = outcome(lambda: self.namespace.volatility.release(f.inode, index))
        if table is None:
            expected: int | None = errno.ENOENT
        elif index not in table.segments:
            expected = errno.EINVAL
        else:
            expected = None
        assert error == expected, f"release: {name_of(error)}, not {name_of(expected)}"
        if table is None or segment is None:
            return
        model = table.segments.pop(index)
        assert segment is model.segment
        # Its pages are no longer volatile; what it lost and nobody was told of stays lost.
        self._resume_pins()

    @rule(pick=files, slot=slots)
    def pin(self, pick: int, slot: tuple[bool, int]) -> None:
        table = self._file(pick).table
        if table is None:
            return
        self._pin(table, self._slot(table, slot))
        self._resume_pins()

    @rule(pick=files, slot=slots)
    def unpin(self, pick: int, slot: tuple[bool, int]) -> None:
        table = self._file(pick).table
        if table is None:
            return
        index = self._slot(table, slot)
        _none, error = outcome(lambda: _segments.unpin(table.view, index))
        if table.scribbled:
            assert error in (None, errno.EINVAL, errno.ESTALE), name_of(error)
            return
        model = table.segments.get(index)
        expected = errno.EINVAL if model is None else None
        assert error == expected, f"unpin: {name_of(error)}, not {name_of(expected)}"
        if model is None:
            return
        # Unpinning a volatile segment only renews its stamp.
        if model.state == SEGMENT_PINNED:
            model.state = SEGMENT_UNPINNED

    @rule(pick=files, old=st.integers(0, 7), slot=slots, pin=st.booleans())
    def use_an_ended_table(self, pick: int, old: int, slot: tuple[bool, int], pin: bool) -> None:
        tables = self._file(pick).old_tables
        if not tables:
            return
        table = tables[old % len(tables)]
        index = self._slot(table, slot)
        if pin:
            _purged, error = outcome(lambda: _segments.pin(table.view, index, DAEMON_PID))
        else:
            _none, error = outcome(lambda: _segments.unpin(table.view, index))
        assert error == errno.ESTALE, f"{name_of(error)} from an ended table"

    @rule(
        pick=files,
        page=st.integers(0, MAX_PAGES - 1),
        within=st.sampled_from((0, 0, 1, 100, PAGE_SIZE - 1)),
        length=st.sampled_from((1, 10, PAGE_SIZE, PAGE_SIZE + 1, 2 * PAGE_SIZE)),
        seed=st.integers(0, 250),
    )
    def write(self, pick: int, page: int, within: int, length: int, seed: int) -> None:
        f = self._file(pick)
        if not f.opens:
            return
        offset = (page << PAGE_SHIFT) + within
        length = min(length, (MAX_PAGES << PAGE_SHIFT) - offset)
        if length <= 0:
            return
        data = pattern(seed, length)
        assert self.namespace.write(f.inode, offset, data) == length
        end = offset + length
        if end > len(f.content):
            f.content.extend(bytes(end - len(f.content)))
        f.content[offset:end] = data
        first, end_page = offset >> PAGE_SHIFT, pages_for(end)
        for written in range(first, end_page):
            f.held.add(written)
            f.lost.pop(written, None)  # rewritten: data again
            f.reported.discard(written)

    @rule(
        pick=files,
        pages=st.integers(FILE_PAGES - 3, MAX_PAGES),
        less=st.sampled_from((0, 0, 1, PAGE_SIZE - 1)),
    )
    def truncate(self, pick: int, pages: int, less: int) -> None:
        f = self._file(pick)
        size = max(0, (pages << PAGE_SHIFT) - less)
        self.namespace.truncate(f.inode, size)
        if size < len(f.content):
            del f.content[size:]
            keep = pages_for(size)
            f.held = {page for page in f.held if page < keep}
            f.lost = {page: sure for page, sure in f.lost.items() if page < keep}
            f.reported = {page for page in f.reported if page < keep}
        else:
            f.content.extend(bytes(size - len(f.content)))

    @rule(
        pick=files,
        page=st.integers(0, MAX_PAGES),
        within=st.sampled_from((0, 0, 7, PAGE_SIZE - 1)),
        length=st.sampled_from((1, 100, PAGE_SIZE, 2 * PAGE_SIZE, 3 * PAGE_SIZE)),
    )
    def read(self, pick: int, page: int, within: int, length: int) -> None:
        f = self._file(pick)
        offset = (page << PAGE_SHIFT) + within
        data, error = outcome(lambda: bytes(self.namespace.read(f.inode, offset, length)))
        if offset >= len(f.content):
            assert (data, error) == (b"", None)  # at or past EOF: nothing, lost pages or not
            return
        end = min(offset + length, len(f.content))
        spanned = [f.lost[p] for p in range(offset >> PAGE_SHIFT, pages_for(end)) if p in f.lost]
        if any(spanned):
            assert error == errno.EIO, f"read of lost pages: {name_of(error)}, not EIO"
            return
        if spanned:
            assert error in (None, errno.EIO), name_of(error)
        else:
            assert error is None, f"read: {name_of(error)}"
        if error is None:
            assert data == bytes(f.content[offset:end]), f"bytes {offset}..{end} read wrong"
            for p in range(offset >> PAGE_SHIFT, pages_for(end)):
                f.lost.pop(p, None)  # the daemon no longer has them lost

    @rule(pick=files, first=st.integers(0, MAX_PAGES), pages=st.integers(0, 4))
    def status(self, pick: int, first: int, pages: int) -> None:
        f = self._file(pick)
        first = min(first, f.eof_page)
        pages = min(pages, f.eof_page - first)
        result, error = outcome(
            lambda: self.namespace.volatility.status(
                f.inode, first << PAGE_SHIFT, pages << PAGE_SHIFT
            )
        )
        assert error is None, f"status: {name_of(error)}"
        assert result is not None
        volatile, purged = result
        end = f.eof_page if pages == 0 else first + pages
        table = f.table
        segments = [] if table is None else list(table.segments.values())
        spans = [max(0, min(s.end, end) - max(s.first, first)) for s in segments]
        if table is not None and table.scribbled:
            assert 0 <= volatile <= sum(spans) << PAGE_SHIFT
        else:
            unpinned = sum(
                span for span, s in zip(spans, segments, strict=True) if s.state != SEGMENT_PINNED
            )
            assert volatile == unpinned << PAGE_SHIFT, (volatile, unpinned)
        lost = [f.lost[p] for p in range(first, end) if p in f.lost]
        assert sum(lost) << PAGE_SHIFT <= purged <= len(lost) << PAGE_SHIFT, (purged, lost)

    # -- daemon steps -----------------------------------------------------------------------

    def _purged(
        self, segment: Segment, wanted: int, dropped: Iterator[tuple[int, int, int]]
    ) -> int:
        """A purge claimed ``segment``: check it against the model, and apply the cache drop
        it asked for, if any. Returns the pages it freed."""
        owner = self._owner(segment)
        assert owner is not None, "a purge claimed a segment no longer registered"
        f, table, model = owner
        assert not table.ended
        if not table.scribbled:
            # The property: nothing pinned is purged (nor what a purge holds already).
            assert model.state in (SEGMENT_UNPINNED, SEGMENT_PURGED), model.state
        model.state = SEGMENT_PURGING
        if model.first >= f.eof_page:
            return 0  # wholly past EOF: purged as a unit, holding nothing to drop
        ino, offset, length = next(dropped)
        assert ino == f.inode.ino
        assert offset % PAGE_SIZE == 0 and length % PAGE_SIZE == 0 and length > 0
        first, end = offset >> PAGE_SHIFT, (offset + length) >> PAGE_SHIFT
        # FULL segments go whole, PARTIAL ones from their end; nothing past EOF.
        assert end == min(model.end, f.eof_page), (first, end, model)
        assert model.first <= first
        if not model.partial or wanted == 0:
            assert first == model.first, (first, end, model)
        return self._lose(f, first, end, certain=not table.scribbled)

    def _check_all_purged(self) -> None:
        """After a purge of all volatile data, no purged segment holds a page (the rest of a
        PARTIAL one, or pages written since): they are volatile too."""
        for f in self.files:
            if f.table is not None and not f.table.scribbled:
                for model in f.table.segments.values():
                    held = f.held.intersection(range(model.first, model.end))
                    assert model.state != SEGMENT_PURGED or not held, (f.name, model, held)

    @rule(budget=st.sampled_from((1, 2, 16, 16)))
    def purge_all(self, budget: int) -> None:
        """VOLFS_IOC_PURGE with bytes = 0, or what a budget of it takes."""
        self.purge(0, budget)

    @rule(wanted=st.integers(1, 5), budget=st.sampled_from((1, 2, 16, 16)))
    def purge(self, wanted: int, budget: int) -> None:
        """Purge ``wanted`` pages (0: all), looking at ``budget`` ranges and segments."""
        # The clean tables' unpinned segments and their stamps, as the purge finds them.
        unpinned = {
            model.segment: _segments.stamp(table.view, index)
            for table in self._tables()
            if not table.scribbled
            for index, model in table.segments.items()
            if model.state == SEGMENT_UNPINNED
        }
        invalidations: list[tuple[int, int, int]] = []
        purge_pass = PurgePass()
        claims = purge_pass.claims
        try:
            result = self.namespace.purger.purge(
                wanted << PAGE_SHIFT, invalidations, purge_pass, budget=budget
            )
        finally:
            self.pending.extend(claims)  # published whatever happens, or pins would wait
        assert len(claims) == result.ranges
        dropped = iter(invalidations)
        freed = sum(self._purged(segment, wanted, dropped) for segment in claims)
        assert next(dropped, None) is None, "a cache drop for no claim"
        assert result.freed_bytes == freed << PAGE_SHIFT, (result, freed)
        # Oldest first: whatever was claimed was unpinned before whatever is left unpinned.
        claimed = [unpinned[s] for s in claims if s in unpinned]
        assert claimed == sorted(claimed), "claims out of LRU order"
        left = [stamp for s, stamp in unpinned.items() if s not in claims]
        if claimed and left:
            assert max(claimed) <= min(left), "a newer segment went before an older one"
        if result.complete and (wanted == 0 or freed < wanted):
            assert not left, "a complete purge left unpinned segments"
            self._check_all_purged()
        self._resume_pins()

    @rule(pick=st.integers(0, 7))
    def publish(self, pick: int) -> None:
        if not self.pending:
            return
        segment = self.pending.pop(pick % len(self.pending))
        segment.table.publish(segment)
        owner = self._owner(segment)
        if owner is not None:
            _f, table, model = owner
            if not table.scribbled:
                assert model.state == SEGMENT_PURGING, model.state
            model.state = SEGMENT_PURGED
        self._resume_pins()

    # -- invariants -------------------------------------------------------------------------

    @invariant()
    def words_match(self) -> None:
        for f in self.files:
            table = f.table
            if table is None or table.scribbled:
                continue
            for index in range(table.table.capacity):
                model = table.segments.get(index)
                expected = SEGMENT_FREE if model is None else model.state
                assert self._word(table, index) == expected, (f.name, index)
            for old in f.old_tables:
                for index in range(old.table.capacity):
                    assert self._word(old, index) == SEGMENT_STALE, (f.name, index)

    @invariant()
    def data_match(self) -> None:
        for f in self.files:
            contents = f.inode.contents
            assert contents is not None
            assert contents.size == len(f.content)
            # No side effect, unlike a read: every byte, lost pages included (zeros).
            assert bytes(contents.read(0, contents.size)) == f.content, f.name
            holes = {
                page
                for start, count in contents.holes(0, MAX_PAGES + 1)
                for page in range(start, start + count)
            }
            assert set(range(MAX_PAGES + 1)) - holes == f.held, f.name
            assert contents.pages == len(f.held)

    @invariant()
    def lost_pages_match(self) -> None:
        for f in self.files:
            ranges = f.inode.vranges
            if ranges is not None:
                ranges._check()
            kept: set[int] = set()
            if ranges is not None:
                kept = {p for p in range(MAX_PAGES + 1) if ranges.is_lost(p, p + 1)}
            certain = {page for page, sure in f.lost.items() if sure}
            # Every page nobody was told of is still lost to the daemon: never served.
            assert certain <= kept, (f.name, certain, kept)
            # And the daemon keeps no other, except those a pin reported that it has not
            # looked at yet, all in segments.
            table = f.table
            in_segments: set[int] = set()
            if table is not None:
                for s in table.segments.values():
                    in_segments.update(range(s.first, s.end))
            assert kept <= set(f.lost) | in_segments, (f.name, kept, f.lost)
        self.namespace.purger._check()

    @invariant()
    def accounting_matches(self) -> None:
        tables = self._tables()
        registered = sum(len(table.segments) for table in tables)
        statistics = self.namespace.statistics()
        assert statistics.segments == registered
        unpinned = sum(
            s.end - s.first
            for table in tables
            if not table.scribbled
            for s in table.segments.values()
            if s.state != SEGMENT_PINNED
        )
        scribbled = sum(
            s.end - s.first for table in tables if table.scribbled for s in table.segments.values()
        )
        volatile = statistics.volatile_bytes >> PAGE_SHIFT
        assert unpinned <= volatile <= unpinned + scribbled, (volatile, unpinned, scribbled)
        charged = sum(table.table.charge_bytes for table in tables)
        charged += SEGMENT_RECORD_BYTES * registered
        assert self.store.charged_bytes == charged
        held = sum(len(f.held) for f in self.files)
        assert self.store.used_bytes == (held + pages_for(charged)) << PAGE_SHIFT

    # -- the end ----------------------------------------------------------------------------

    def teardown(self) -> None:
        try:
            while self.pending:
                self.publish(0)
            for f in self.files:
                table = f.table
                if table is not None:
                    while table.segments:
                        self.release(self.files.index(f), (True, 0))
                while f.opens:
                    self.close_file(self.files.index(f))
            assert not self.waiting, "a pin still waits on an ended table"
            # Everything released and closed: the tables' charges are back.
            assert self.namespace.statistics().segments == 0
            assert self.store.charged_bytes == 0
            for f in self.files:
                self.namespace.unlink(ROOT_INODE, f.name)
                # As the kernel does once a file without names is not in use.
                self.namespace.forget(f.inode.ino, f.inode.lookups)
            assert self.store.used_bytes == 0
            assert self.namespace.purger.limits.records == 0
        finally:
            for f in self.files:
                for table in [f.table, *f.old_tables]:
                    if table is not None:
                        table.view.close()
            self.store.close()


class ScribbledSegmentsMachine(SegmentsMachine):
    """The same, with garbage written into the tables between steps."""

    @rule(
        pick=files,
        where=st.sampled_from(("state", "state", "stamp", "bytes")),
        slot=st.one_of(slots, st.tuples(st.just(False), st.integers(0, 1 << 16))),
        value=st.sampled_from(
            (
                SEGMENT_FREE,
                SEGMENT_PINNED,
                SEGMENT_UNPINNED,
                SEGMENT_UNPINNED,
                SEGMENT_PURGING,
                SEGMENT_PURGED,
                SEGMENT_STALE,
                6,
                0xFFFFFFFF,
            )
        ),
        junk=st.binary(min_size=1, max_size=64),
    )
    def scribble(
        self, pick: int, where: str, slot: tuple[bool, int], value: int, junk: bytes
    ) -> None:
        """A client writes garbage into its table: a state word, a stamp, or any bytes, mostly
        over its segments, anywhere in the mapping (header, free slots, the page's tail)."""
        f = self._file(pick)
        table = f.table
        if table is None:
            return
        usual, anywhere = slot
        in_view = (len(table.view) - segment_slot_offset(0)) // SEGMENT_SLOT.size
        index = self._slot(table, slot) if usual else anywhere % in_view
        if where == "state":
            struct.pack_into("=I", table.view, segment_slot_offset(index), value)
        elif where == "stamp":
            stamp = int.from_bytes(junk[:8], "little")
            struct.pack_into(
                "=Q", table.view, segment_slot_offset(index) + SEGMENT_STAMP_OFFSET, stamp
            )
        else:
            offset = anywhere % (len(table.view) - len(junk) + 1)
            table.view[offset : offset + len(junk)] = junk
        if not table.scribbled:
            table.scribbled = True
            # Lost pages of its segments: the daemon may take garbage for a reporting pin.
            # Pages a pin reported that the daemon has not looked at yet (it still keeps them
            # lost): it may take garbage (PURGING, PURGED) for no pin, and keep them lost.
            ranges = f.inode.vranges
            unseen = {p for p in f.reported if ranges is not None and ranges.is_lost(p, p + 1)}
            for s in table.segments.values():
                for page in range(s.first, s.end):
                    if page in f.lost or page in unseen:
                        f.lost[page] = False
        self._resume_pins()


SegmentsMachine.TestCase.settings = settings(
    max_examples=600, stateful_step_count=50, deadline=None, database=None
)
TestSegmentsMachine = SegmentsMachine.TestCase

ScribbledSegmentsMachine.TestCase.settings = settings(
    max_examples=400, stateful_step_count=50, deadline=None, database=None
)
TestScribbledSegmentsMachine = ScribbledSegmentsMachine.TestCase


# -- explicit cases ----------------------------------------------------------------------------


@dataclass
class Client:
    """One open file of a namespace with its table, mapped as a client maps it."""

    namespace: Namespace
    inode: Inode
    table: SegmentTable
    view: mmap.mmap

    def segment(
        self, first: int, pages: int, *, unpinned: bool = True, partial: bool = False
    ) -> Segment:
        segment = self.namespace.volatility.register(
            self.inode, first << PAGE_SHIFT, pages << PAGE_SHIFT, VRANGE_PARTIAL if partial else 0
        )
        if unpinned:
            _segments.unpin(self.view, segment.index)
        return segment

    def read(self, first: int, pages: int) -> bytes:
        return bytes(self.namespace.read(self.inode, first << PAGE_SHIFT, pages << PAGE_SHIFT))

    def purge(self, wanted_pages: int = 0) -> list[Segment]:
        purge_pass = PurgePass()
        self.namespace.purger.purge(wanted_pages << PAGE_SHIFT, [], purge_pass)
        return purge_pass.claims


@pytest.fixture
def client(namespace: Namespace) -> Iterator[Client]:
    inode = namespace.mknod(ROOT_INODE, b"f", 0o644, 0, 0)
    namespace.open(inode)
    namespace.write(inode, 0, pattern(0, 8 * PAGE_SIZE))
    table = namespace.volatility.segment_table(inode, 4)
    view = mmap.mmap(table.memfd, table.size)
    try:
        yield Client(namespace, inode, table, view)
    finally:
        view.close()


def pin_in_a_thread(client: Client, segment: Segment) -> tuple[threading.Thread, list[object]]:
    """Start a pin of a segment being purged; return once it sleeps on the word."""
    outcomes: list[object] = []

    def pin() -> None:
        try:
            outcomes.append(_segments.pin(client.view, segment.index, DAEMON_PID))
        except OSError as error:
            outcomes.append(error.errno)

    thread = threading.Thread(target=pin, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    wchan = Path(f"/proc/self/task/{thread.native_id}/wchan")
    while "futex" not in wchan.read_text() and not outcomes:
        assert time.monotonic() < deadline, "the pin never waited"
        time.sleep(0.001)
    assert not outcomes, "a pin returned while its segment was being purged"
    return thread, outcomes


def test_a_pin_waits_for_the_purge_it_meets_and_reports_it(client: Client) -> None:
    pinned = client.segment(0, 2, unpinned=False)
    unpinned = client.segment(2, 2)
    [claimed] = client.purge()
    assert claimed is unpinned
    thread, outcomes = pin_in_a_thread(client, unpinned)
    try:
        with pytest.raises(OSError) as caught:
            client.read(2, 1)  # nobody was told yet
        assert caught.value.errno == errno.EIO
        client.table.publish(claimed)
        thread.join(10)
        assert outcomes == [True]
    finally:
        client.namespace.volatility.end_segments(client.inode)  # frees a pin still waiting
        thread.join(10)
    assert client.read(0, 2) == pattern(0, 2 * PAGE_SIZE)
    assert client.read(2, 2) == bytes(2 * PAGE_SIZE)
    assert _segments.state(client.view, pinned.index) == SEGMENT_STALE


def test_a_pin_waiting_on_a_purge_fails_with_estale_at_the_last_close(client: Client) -> None:
    segment = client.segment(0, 1)
    [claimed] = client.purge()
    thread, outcomes = pin_in_a_thread(client, segment)
    client.namespace.close(client.inode)
    thread.join(10)
    assert outcomes == [errno.ESTALE]
    client.table.publish(claimed)  # too late: the table is dead, and stays so
    assert _segments.state(client.view, segment.index) == SEGMENT_STALE
    with pytest.raises(OSError) as caught:
        client.read(0, 1)  # purged, and nobody was told
    assert caught.value.errno == errno.EIO


def test_pages_written_during_a_purge_are_purged_by_the_next(client: Client) -> None:
    segment = client.segment(0, 2)
    [claimed] = client.purge()
    client.namespace.write(client.inode, 0, b"new")
    client.table.publish(claimed)
    assert client.inode.contents is not None and client.inode.contents.pages == 7
    # A purge of all volatile data takes the page written meanwhile: the segment is volatile.
    [again] = client.purge()
    assert again is segment
    assert client.inode.contents.pages == 6
    client.table.publish(again)
    assert _segments.pin(client.view, segment.index, DAEMON_PID) is True
    assert client.read(0, 2) == bytes(2 * PAGE_SIZE)


def test_a_segment_purged_again_keeps_what_nobody_was_told_of(client: Client) -> None:
    segment = client.segment(0, 4, partial=True)
    [claimed] = client.purge(2)  # pages 2 and 3
    client.table.publish(claimed)
    client.namespace.write(client.inode, 3 << PAGE_SHIFT, b"new")
    [again] = client.purge(1)  # page 3 again, being the last page it holds
    assert again is segment
    client.table.publish(again)
    for page in (2, 3):
        with pytest.raises(OSError) as caught:
            client.read(page, 1)  # purged, and still nobody was told
        assert caught.value.errno == errno.EIO
    assert _segments.pin(client.view, segment.index, DAEMON_PID) is True
    assert client.read(0, 4) == pattern(0, 2 * PAGE_SIZE) + bytes(2 * PAGE_SIZE)


def test_words_turned_back_to_unpinned_keep_no_purge_from_older_data(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Scans that find only the first two segments: turned back to UNPINNED as soon as they
    # are claimed, they would be found, and won, by every scan of the pass.
    monkeypatch.setattr(purge, "SEGMENT_SCAN", 2)
    turned_back = [client.segment(page, 1) for page in (0, 1)]
    behind = [client.segment(2, 2), client.segment(4, 4)]
    purge_pass = PurgePass()
    freed = 0
    for _call in range(50):
        result = client.namespace.purger.purge(0, [], purge_pass, budget=1)
        freed += result.freed_bytes
        for segment in turned_back:
            _segments.set(client.view, segment.index, SEGMENT_UNPINNED)
        if result.complete:
            break
    assert result.complete, "words turned back kept the purge going"
    assert purge_pass.claims == turned_back + behind
    assert freed == 8 * PAGE_SIZE
    for segment in behind:
        client.table.publish(segment)
        assert _segments.pin(client.view, segment.index, DAEMON_PID) is True


def test_slots_nobody_registered_are_never_offered_to_a_purge(client: Client) -> None:
    registered = client.segment(0, 2)
    for index in range(1, client.table.capacity):  # a client's words on free slots
        _segments.set(client.view, index, SEGMENT_UNPINNED)
    assert client.purge() == [registered]


def test_a_pass_whose_scan_another_purge_took_scans_again(client: Client) -> None:
    client.namespace.volatility.vrange(
        client.inode, 7 * PAGE_SIZE, PAGE_SIZE, VRANGE_VOLATILE, 0
    )  # older than the segments: the first pass purges it first
    taken = [client.segment(0, 1), client.segment(1, 1)]
    first = PurgePass()
    purger = client.namespace.purger
    result = purger.purge(0, [], first, budget=1)  # scans the two, purges the range
    assert not result.complete
    second = PurgePass()
    assert purger.purge(0, [], second).complete
    assert second.claims == taken
    unpinned_since = client.segment(2, 1)
    # Both segments of its scan are gone to the other purge: it looks again, and finds the
    # one unpinned since.
    assert purger.purge(0, [], first).complete
    assert first.claims == [unpinned_since]
