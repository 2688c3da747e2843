"""Volatile ranges without FUSE: InodeRanges and the Purger against a plain per-page model.

The model keeps, for every page of every inode, the range object covering it (its identity is
what the merge rule needs), whether the page is lost, and whether the store holds it. A range
of the model carries what the semantics attach to a whole range: FULL or PARTIAL, the purged
flag (shared by a merged range, kept by both pieces of a split), its LRU stamp and whether it
is in the LRU at all.
"""

from __future__ import annotations

import errno
import itertools
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from volfs.abi import NO_PAGE, PAGE_SHIFT, PAGE_SIZE
from volfs.core.purge import Invalidation, Purger, PurgeSource
from volfs.core.ranges import InodeRanges, RecordLimits
from volfs.core.store import FileContents, Store

STORE_PAGES = 256


@dataclass
class Purged:
    """What a whole purge did, its budgets added up."""

    freed_bytes: int
    ranges: int
    invalidations: list[Invalidation]


@dataclass(eq=False)
class ModelRange:
    """A volatile range of the model; the pages pointing at it are its extent."""

    partial: bool
    purged: bool
    stamp: int
    tracked: bool


class InodeModel:
    """The expected state of one inode, page by page."""

    def __init__(self, ino: int, pages: int) -> None:
        self.ino = ino
        self.pages = pages
        self.owner: list[ModelRange | None] = [None] * pages
        self.lost = [False] * pages
        #: Held page -> the byte it is filled with.
        self.data: dict[int, int] = {}
        self.size_pages = 0

    def runs(self) -> list[tuple[int, int, ModelRange]]:
        """The ranges as ``(start, end, range)`` in page order."""
        found = []
        page = 0
        while page < self.pages:
            current = self.owner[page]
            if current is None:
                page += 1
                continue
            start = page
            while page < self.pages and self.owner[page] is current:
                page += 1
            found.append((start, page, current))
        return found

    def lost_runs(self) -> list[tuple[int, int]]:
        """Maximal runs of lost pages."""
        found = []
        page = 0
        while page < self.pages:
            if not self.lost[page]:
                page += 1
                continue
            start = page
            while page < self.pages and self.lost[page]:
                page += 1
            found.append((start, page))
        return found

    def extent(self, volatile_range: ModelRange) -> tuple[int, int]:
        """The pages ``[start, end)`` of a range."""
        pages = [page for page in range(self.pages) if self.owner[page] is volatile_range]
        return pages[0], pages[-1] + 1

    def overlapped(self, first: int, end: int) -> list[ModelRange]:
        """The distinct ranges owning a page of [first, end), in page order."""
        found = (self.owner[page] for page in range(first, min(end, self.pages)))
        return list(dict.fromkeys(r for r in found if r is not None))

    def status(self, first: int, end: int) -> tuple[int, int]:
        """Volatile and lost pages in [first, end)."""
        span = range(first, min(end, self.pages))
        return (
            sum(self.owner[page] is not None for page in span),
            sum(self.lost[page] for page in span),
        )

    def assign(self, first: int, end: int, volatile_range: ModelRange | None) -> None:
        """Make pages [first, end) belong to ``volatile_range`` (None: to no range)."""
        for page in range(first, end):
            self.owner[page] = volatile_range

    def tail_start(self, first: int, end: int, wanted: int) -> int:
        """Where a PARTIAL purge needing ``wanted`` pages starts in [first, end)."""
        held = 0
        for page in reversed(range(first, end)):
            if page in self.data:
                held += 1
                if held == wanted:
                    return page
        return first

    def release(self, first: int, end: int) -> int:
        """Drop the held pages of [first, end); return how many there were."""
        freed = [page for page in range(first, end) if page in self.data]
        for page in freed:
            del self.data[page]
        return len(freed)

    def contents_bytes(self) -> bytes:
        """What the whole file should read as."""
        return b"".join(
            bytes([self.data[page]]) * PAGE_SIZE if page in self.data else bytes(PAGE_SIZE)
            for page in range(self.size_pages)
        )


class Model:
    """The expected state of every inode and of the LRU."""

    def __init__(self, inodes: int, pages: int) -> None:
        self.inodes = {ino: InodeModel(ino, pages) for ino in range(1, inodes + 1)}
        self._stamps = itertools.count()
        self.purged_pages = 0

    def tracked(self) -> list[ModelRange]:
        """The ranges a purge may take."""
        return [
            volatile_range
            for inode in self.inodes.values()
            for _start, _end, volatile_range in inode.runs()
            if volatile_range.tracked
        ]

    def mark_volatile(self, ino: int, first: int, end: int, partial: bool) -> None:
        inode = self.inodes[ino]
        overlapped = inode.overlapped(first, end)
        start, stop = first, end
        for volatile_range in overlapped:
            lo, hi = inode.extent(volatile_range)
            start, stop = min(start, lo), max(stop, hi)
        merged = ModelRange(
            partial=partial and all(r.partial for r in overlapped),
            purged=any(r.purged for r in overlapped) or any(inode.lost[start:stop]),
            stamp=next(self._stamps),
            tracked=True,
        )
        inode.assign(start, stop, merged)

    def mark_nonvolatile(self, ino: int, first: int, end: int) -> bool:
        inode = self.inodes[ino]
        end = min(end, inode.pages)
        overlapped = inode.overlapped(first, end)
        for volatile_range in overlapped:
            lo, hi = inode.extent(volatile_range)
            if lo < first:
                inode.assign(lo, first, replace(volatile_range))
            if hi > end:
                inode.assign(end, hi, replace(volatile_range))
        inode.assign(first, end, None)
        lost = any(inode.lost[first:end])
        for page in range(first, end):
            inode.lost[page] = False
        return lost or any(r.purged for r in overlapped)

    def write(self, ino: int, first: int, end: int, fill: int) -> None:
        inode = self.inodes[ino]
        for page in range(first, end):
            inode.data[page] = fill
            inode.lost[page] = False
        inode.size_pages = max(inode.size_pages, end)
        for volatile_range in inode.overlapped(first, end):
            volatile_range.tracked = True

    def truncate(self, ino: int, end_page: int) -> None:
        inode = self.inodes[ino]
        self.mark_nonvolatile(ino, end_page, inode.pages)
        inode.release(end_page, inode.pages)
        inode.size_pages = end_page

    def end_volatility(self, ino: int) -> None:
        """The last close: the ranges go, lost pages stay lost."""
        inode = self.inodes[ino]
        inode.assign(0, inode.pages, None)

    def purge(self, wanted_bytes: int, result: Purged) -> None:
        """Check a purge's result step by step against the LRU, and apply it.

        Pieces of one marking share a stamp and may go in any order among themselves, so the
        victims are taken from the result; each must be a tracked range with the oldest stamp,
        purged from the right page.
        """
        wanted = -(-wanted_bytes // PAGE_SIZE) if wanted_bytes else None
        freed = 0
        for ino, offset, length in result.invalidations:
            assert wanted is None or freed < wanted, "purged more than needed"
            assert offset % PAGE_SIZE == 0 and length % PAGE_SIZE == 0 and length > 0
            inode = self.inodes[ino]
            first, end = offset >> PAGE_SHIFT, (offset + length) >> PAGE_SHIFT
            victim = inode.owner[end - 1]
            assert victim is not None, f"purged pages [{first}, {end}) of {ino}: no range"
            assert victim.tracked, f"purged [{first}, {end}) of {ino}: not in the LRU"
            start, stop = inode.extent(victim)
            assert stop == end, "a purge must take the tail of a range"
            assert victim.stamp == min(r.stamp for r in self.tracked()), "not the oldest"
            if victim.partial and wanted is not None:
                assert first == inode.tail_start(start, stop, wanted - freed)
            else:
                assert first == start, "a FULL range (or a purge of all) goes whole"
            freed += inode.release(first, stop)
            if first > start:
                inode.assign(start, first, replace(victim))
            inode.assign(first, stop, replace(victim, purged=True, tracked=False))
            for page in range(first, stop):
                inode.lost[page] = True
        if wanted is None or freed < wanted:
            assert not self.tracked(), "the purge stopped early"
        assert result.freed_bytes == freed << PAGE_SHIFT
        assert result.ranges == len(result.invalidations)
        self.purged_pages += freed


class Harness:
    """Inodes sharing one Purger and one Store, driven in step with a :class:`Model`."""

    def __init__(self, inodes: int = 3, pages: int = 40) -> None:
        self.pages = pages
        self.store = Store(STORE_PAGES * PAGE_SIZE)
        self.files: dict[int, FileContents] = {}
        self.purger = Purger(self.files.__getitem__)
        self.model = Model(inodes, pages)
        self.sets: dict[int, InodeRanges] = {}
        for ino in self.model.inodes:
            self.files[ino] = self.store.new_file()
            self.sets[ino] = InodeRanges(self.purger, ino)
        self.purges = 0

    def close(self) -> None:
        self.store.close()

    def mark_volatile(self, ino: int, first: int, end: int, partial: bool) -> None:
        self.sets[ino].mark_volatile(first, end, partial=partial)
        self.model.mark_volatile(ino, first, end, partial)

    def mark_nonvolatile(self, ino: int, first: int, end: int) -> bool:
        purged = self.sets[ino].mark_nonvolatile(first, end)
        assert purged == self.model.mark_nonvolatile(ino, first, end), (ino, first, end)
        return purged

    def write(self, ino: int, first: int, end: int, fill: int) -> None:
        data = bytes([fill]) * ((end - first) << PAGE_SHIFT)
        assert self.files[ino].write(first << PAGE_SHIFT, data) == len(data)
        self.sets[ino].rewritten(first, end)
        self.model.write(ino, first, end, fill)

    def purge(self, wanted_bytes: int, budget: int = 1000) -> Purged:
        """Purge as the daemon does: ``budget`` ranges at a time until complete."""
        self.purger.count_purge(PurgeSource.IOCTL)
        invalidations: list[Invalidation] = []
        freed = ranges = 0
        while True:
            result = self.purger.purge(
                wanted_bytes - freed if wanted_bytes else 0, invalidations, budget=budget
            )
            freed += result.freed_bytes
            ranges += result.ranges
            if result.complete:
                break
            assert wanted_bytes == 0 or freed < wanted_bytes
        purged = Purged(freed, ranges, invalidations)
        self.purges += 1
        self.model.purge(wanted_bytes, purged)
        return purged

    def truncate(self, ino: int, end_page: int) -> None:
        self.files[ino].truncate(end_page << PAGE_SHIFT)
        self.sets[ino].mark_nonvolatile(end_page, NO_PAGE, admit=False)
        self.model.truncate(ino, end_page)

    def end_volatility(self, ino: int, budget: int = 3, purge_meanwhile: bool = False) -> None:
        """The last close: volatility ends at once, its ranges are discarded in budgets."""
        ended = self.sets[ino]
        survivor = ended.end_volatility()
        self.sets[ino] = survivor or InodeRanges(self.purger, ino)
        self.model.end_volatility(ino)
        if purge_meanwhile:
            # The ended ranges still wait in the LRU: a purge must pass them over.
            self.purge(0)
            self.check()
        while not ended.discard(budget):
            pass
        assert not ended.range_count

    def check_query(self, ino: int, first: int, end: int) -> None:
        ranges, inode = self.sets[ino], self.model.inodes[ino]
        assert ranges.status(first, end) == inode.status(first, end), (ino, first, end)
        assert ranges.is_lost(first, end) == any(inode.lost[first:end]), (ino, first, end)
        # The range VOLFS_IOC_VRANGE_NEXT answers: the model's first run ending after ``first``.
        found = ranges.next_range(first)
        expected = next(((lo, hi) for lo, hi, _r in inode.runs() if hi > first), None)
        assert (found and (found.start, found.end)) == expected, (ino, first)

    def check_data(self) -> None:
        for ino, inode in self.model.inodes.items():
            contents = self.files[ino]
            assert contents.size == inode.size_pages << PAGE_SHIFT
            assert bytes(contents.read(0, contents.size)) == inode.contents_bytes()

    def check(self) -> None:
        """Compare everything the code keeps with the model, and run every ``_check``."""
        stamps: set[tuple[int, int]] = set()
        for ino, inode in self.model.inodes.items():
            ranges, contents = self.sets[ino], self.files[ino]
            ranges._check()
            contents._check()
            actual = [(r.start, r.end, r.partial, r.purged, r.tracked) for r in ranges.ranges()]
            expected = [(lo, hi, r.partial, r.purged, r.tracked) for lo, hi, r in inode.runs()]
            assert actual == expected, f"ranges of inode {ino}"
            assert list(ranges._lost.items()) == inode.lost_runs(), f"lost pages of inode {ino}"
            assert bool(ranges) == bool(expected or any(inode.lost))
            holes = {
                page
                for start, count in contents.holes(0, self.pages)
                for page in range(start, start + count)
            }
            assert set(range(self.pages)) - holes == set(inode.data), f"held pages of inode {ino}"
            assert contents.pages == len(inode.data)
            stamps.update(
                (model_range.stamp, code_range.stamp)
                for code_range, (_lo, _hi, model_range) in zip(
                    ranges.ranges(), inode.runs(), strict=True
                )
            )
        # The code's stamps must order the ranges exactly as the model's do.
        by_model = sorted(stamps)
        assert len({model for model, _code in stamps}) == len(stamps), "a stamp split in two"
        assert len({code for _model, code in stamps}) == len(stamps), "two markings merged"
        assert [code for _model, code in by_model] == sorted(code for _model, code in by_model)
        self.purger._check()
        self.store.arena._check()
        assert len(self.purger) == len(self.model.tracked()), "ranges in the LRU"
        statistics = self.purger.statistics()
        runs = [run for inode in self.model.inodes.values() for run in inode.runs()]
        assert statistics.ranges == len(runs)
        assert statistics.volatile_bytes == sum(hi - lo for lo, hi, _r in runs) << PAGE_SHIFT
        assert statistics.purgeable_ranges == len(self.purger)
        assert statistics.purged_bytes == self.model.purged_pages << PAGE_SHIFT
        assert sum(statistics.purges.values()) == self.purges
        assert self.store.arena.used_pages == sum(
            len(inode.data) for inode in self.model.inodes.values()
        )


def random_span(rng: random.Random, pages: int) -> tuple[int, int]:
    first = rng.randrange(pages)
    length = rng.choice([1, 1, 2, 2, 3, 4, 5, 8, 12, 20, pages])
    return first, min(pages, first + length)


def random_wanted(rng: random.Random) -> int:
    if rng.random() < 0.25:
        return 0
    return rng.randrange(1, rng.choice([2, 4, 10, 30]) * PAGE_SIZE)


def random_mark_volatile(harness: Harness, rng: random.Random, ino: int) -> None:
    """Mark a random span volatile, FULL or PARTIAL."""
    harness.mark_volatile(ino, *random_span(rng, harness.pages), rng.random() < 0.5)


def random_mark_nonvolatile(harness: Harness, rng: random.Random, ino: int) -> None:
    """Unmark a random span."""
    harness.mark_nonvolatile(ino, *random_span(rng, harness.pages))


def random_write(harness: Harness, rng: random.Random, ino: int) -> None:
    """Fill a random span with a random byte."""
    harness.write(ino, *random_span(rng, harness.pages), rng.randrange(1, 256))


def random_purge(harness: Harness, rng: random.Random, _ino: int) -> None:
    """Purge a random amount (or everything) in steps of a random budget."""
    harness.purge(random_wanted(rng), budget=rng.choice([1, 2, 1000]))


def random_shrink_a_little(harness: Harness, rng: random.Random, ino: int) -> None:
    """Truncate to a random page in the upper half of the file."""
    harness.truncate(ino, rng.randrange(harness.pages // 2, harness.pages + 1))


def random_truncate(harness: Harness, rng: random.Random, ino: int) -> None:
    """Truncate to any size, empty included."""
    harness.truncate(ino, rng.randrange(harness.pages + 1))


def random_end_volatility(harness: Harness, rng: random.Random, ino: int) -> None:
    """Drop every range of the inode, maybe with purges in between."""
    harness.end_volatility(ino, purge_meanwhile=rng.random() < 0.5)


Operation = Callable[[Harness, random.Random, int], None]

#: Each operation with the upper end of its share of a uniform draw in [0, 1).
OPERATIONS: tuple[tuple[float, Operation], ...] = (
    (0.32, random_mark_volatile),
    (0.52, random_mark_nonvolatile),
    (0.76, random_write),
    (0.9, random_purge),
    (0.96, random_shrink_a_little),
    (0.98, random_truncate),
    (1.0, random_end_volatility),
)


def random_operation(rng: random.Random) -> Operation:
    """One of ``OPERATIONS``, chosen by a single draw from ``rng``."""
    draw = rng.random()
    return next(operation for limit, operation in OPERATIONS if draw < limit)


@pytest.mark.parametrize("seed", range(6))
def test_random_operations_match_the_page_model(seed: int) -> None:
    rng = random.Random(seed)
    harness = Harness(inodes=3, pages=40)
    inodes = list(harness.model.inodes)
    try:
        for step in range(3000):
            ino = rng.choice(inodes)
            random_operation(rng)(harness, rng, ino)
            harness.check()
            for _query in range(3):
                harness.check_query(rng.choice(inodes), *random_span(rng, harness.pages + 4))
            if step % 100 == 0:
                harness.check_data()
        harness.check_data()
        harness.purge(0)
        harness.check()
        for ino in inodes:
            harness.end_volatility(ino)
        harness.check()
        assert len(harness.purger) == 0
    finally:
        harness.close()


class RangesMachine(RuleBasedStateMachine):
    """The same operations as the random test, chosen and shrunk by Hypothesis."""

    PAGES = 16

    def __init__(self) -> None:
        super().__init__()
        self.harness = Harness(inodes=2, pages=self.PAGES)

    inodes = st.sampled_from([1, 2])
    spans = st.tuples(st.integers(0, PAGES - 1), st.integers(1, PAGES)).map(
        lambda span: (span[0], min(span[0] + span[1], RangesMachine.PAGES))
    )

    @rule(ino=inodes, span=spans, partial=st.booleans())
    def mark_volatile(self, ino: int, span: tuple[int, int], partial: bool) -> None:
        self.harness.mark_volatile(ino, *span, partial)

    @rule(ino=inodes, span=spans)
    def mark_nonvolatile(self, ino: int, span: tuple[int, int]) -> None:
        self.harness.mark_nonvolatile(ino, *span)

    @rule(ino=inodes, span=spans, fill=st.integers(1, 255))
    def write(self, ino: int, span: tuple[int, int], fill: int) -> None:
        self.harness.write(ino, *span, fill)

    @rule(
        wanted=st.one_of(st.just(0), st.integers(1, 12 * PAGE_SIZE)),
        budget=st.sampled_from([1, 1000]),
    )
    def purge(self, wanted: int, budget: int) -> None:
        self.harness.purge(wanted, budget)

    @rule(ino=inodes, end_page=st.integers(0, PAGES))
    def truncate(self, ino: int, end_page: int) -> None:
        self.harness.truncate(ino, end_page)

    @rule(ino=inodes, purge_meanwhile=st.booleans())
    def end_volatility(self, ino: int, purge_meanwhile: bool) -> None:
        self.harness.end_volatility(ino, purge_meanwhile=purge_meanwhile)

    @rule(ino=inodes, span=spans)
    def query(self, ino: int, span: tuple[int, int]) -> None:
        self.harness.check_query(ino, *span)

    @invariant()
    def matches_the_model(self) -> None:
        self.harness.check()

    def teardown(self) -> None:
        try:
            self.harness.check_data()
        finally:
            self.harness.close()


RangesMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=30, deadline=None, database=None
)
TestRangesMachine = RangesMachine.TestCase


# -- explicit cases ----------------------------------------------------------------------------


@pytest.fixture
def harness() -> Iterator[Harness]:
    harness = Harness(inodes=2, pages=64)
    yield harness
    harness.close()


def page_bytes(harness: Harness, ino: int, first: int, end: int) -> bytes:
    return bytes(harness.files[ino].read(first << PAGE_SHIFT, (end - first) << PAGE_SHIFT))


def test_adjacent_ranges_stay_apart(harness: Harness) -> None:
    ranges = harness.sets[1]
    harness.write(1, 0, 8, 7)
    harness.mark_volatile(1, 0, 4, False)
    harness.mark_volatile(1, 4, 8, False)
    harness.check()
    assert [(r.start, r.end) for r in ranges.ranges()] == [(0, 4), (4, 8)]
    assert ranges.status(0, 8) == (8, 0)
    result = harness.purge(1)
    assert result.freed_bytes == 4 * PAGE_SIZE
    assert result.invalidations == [(1, 0, 4 * PAGE_SIZE)]
    assert ranges.status(0, 8) == (8, 4)
    assert ranges.status(4, 8) == (4, 0)
    assert not ranges.is_lost(4, 8)
    assert page_bytes(harness, 1, 4, 8) == b"\x07" * (4 * PAGE_SIZE)
    assert harness.mark_nonvolatile(1, 4, 8) is False
    assert harness.mark_nonvolatile(1, 0, 4) is True
    harness.check()
    harness.mark_volatile(1, 10, 12, True)
    harness.mark_volatile(1, 8, 10, True)
    harness.mark_volatile(1, 12, 14, True)
    assert [(r.start, r.end) for r in ranges.ranges()] == [(8, 10), (10, 12), (12, 14)]
    harness.mark_volatile(1, 9, 13, True)
    assert [(r.start, r.end, r.partial) for r in ranges.ranges()] == [(8, 14, True)]
    harness.check()
    harness.check_data()


def test_merging_a_purged_range_with_a_fresh_one_reports_the_purge(harness: Harness) -> None:
    ranges = harness.sets[1]
    harness.write(1, 0, 8, 1)
    harness.mark_volatile(1, 0, 4, False)
    assert harness.purge(0).freed_bytes == 4 * PAGE_SIZE
    harness.mark_volatile(1, 2, 8, True)
    harness.check()
    assert [(r.start, r.end, r.partial, r.purged) for r in ranges.ranges()] == [(0, 8, False, True)]
    assert ranges.status(0, 8) == (8, 4)
    assert harness.mark_nonvolatile(1, 6, 8) is True
    assert ranges.is_lost(0, 4) and not ranges.is_lost(4, 6)
    assert harness.mark_nonvolatile(1, 0, 6) is True
    assert ranges.status(0, 8) == (0, 0) and not ranges
    assert harness.mark_nonvolatile(1, 0, 8) is False
    assert page_bytes(harness, 1, 0, 8) == bytes(4 * PAGE_SIZE) + b"\x01" * (4 * PAGE_SIZE)
    harness.check()
    harness.check_data()


def test_partial_purge_loses_only_the_tail(harness: Harness) -> None:
    ranges = harness.sets[1]
    harness.write(1, 0, 10, 5)
    harness.mark_volatile(1, 0, 10, True)
    result = harness.purge(3 * PAGE_SIZE - 100)
    assert result.freed_bytes == 3 * PAGE_SIZE
    assert result.invalidations == [(1, 7 * PAGE_SIZE, 3 * PAGE_SIZE)]
    assert ranges.status(0, 10) == (10, 3)
    assert not ranges.is_lost(0, 7) and ranges.is_lost(6, 8)
    assert page_bytes(harness, 1, 0, 10) == b"\x05" * (7 * PAGE_SIZE) + bytes(3 * PAGE_SIZE)
    assert len(harness.purger) == 1
    assert harness.purge(1).invalidations == [(1, 6 * PAGE_SIZE, PAGE_SIZE)]
    assert ranges.status(0, 10) == (10, 4)
    assert harness.store.used_bytes == 6 * PAGE_SIZE
    assert harness.mark_nonvolatile(1, 0, 10) is True
    harness.check()
    harness.check_data()


def test_partial_purge_counts_only_held_pages(harness: Harness) -> None:
    ranges = harness.sets[2]
    for page in (20, 21, 22, 25):
        harness.write(2, page, page + 1, page)
    harness.mark_volatile(2, 20, 30, True)
    result = harness.purge(2 * PAGE_SIZE)
    assert result.freed_bytes == 2 * PAGE_SIZE
    assert result.invalidations == [(2, 22 * PAGE_SIZE, 8 * PAGE_SIZE)]
    assert ranges.status(20, 30) == (10, 8)
    assert harness.store.used_bytes == 2 * PAGE_SIZE
    result = harness.purge(10 * PAGE_SIZE)
    assert result.freed_bytes == 2 * PAGE_SIZE
    assert result.invalidations == [(2, 20 * PAGE_SIZE, 2 * PAGE_SIZE)]
    assert ranges.status(0, 64) == (10, 10)
    assert harness.purge(0) == Purged(0, 0, [])
    harness.check()
    harness.check_data()


def test_lru_order_across_inodes(harness: Harness) -> None:
    harness.write(1, 0, 8, 1)
    harness.write(2, 0, 8, 2)
    harness.mark_volatile(1, 0, 4, False)
    harness.mark_volatile(2, 0, 4, False)
    assert harness.purge(1).invalidations == [(1, 0, 4 * PAGE_SIZE)]
    assert harness.sets[2].status(0, 4) == (4, 0)
    assert harness.purge(1).invalidations == [(2, 0, 4 * PAGE_SIZE)]
    assert harness.mark_nonvolatile(1, 0, 4) and harness.mark_nonvolatile(2, 0, 4)
    harness.write(1, 0, 4, 3)
    harness.write(2, 0, 4, 4)
    harness.mark_volatile(1, 0, 2, False)
    harness.mark_volatile(2, 0, 2, False)
    harness.mark_volatile(1, 1, 3, False)
    assert harness.purge(1).invalidations == [(2, 0, 2 * PAGE_SIZE)]
    assert harness.purge(1).invalidations == [(1, 0, 3 * PAGE_SIZE)]
    harness.mark_nonvolatile(1, 0, 8)
    harness.mark_nonvolatile(2, 0, 8)
    harness.write(1, 0, 8, 5)
    harness.write(2, 0, 8, 6)
    harness.mark_volatile(1, 0, 8, False)
    harness.mark_volatile(2, 0, 8, False)
    assert harness.mark_nonvolatile(1, 3, 5) is False
    result = harness.purge(1)
    assert result.invalidations in (
        [(1, 0, 3 * PAGE_SIZE)],
        [(1, 5 * PAGE_SIZE, 3 * PAGE_SIZE)],
    )
    assert harness.sets[2].status(0, 8) == (8, 0)
    other = {(1, 0, 3 * PAGE_SIZE), (1, 5 * PAGE_SIZE, 3 * PAGE_SIZE)} - set(result.invalidations)
    assert harness.purge(3 * PAGE_SIZE).invalidations == list(other)
    assert harness.sets[2].status(0, 8) == (8, 0)
    assert harness.purge(1).invalidations == [(2, 0, 8 * PAGE_SIZE)]
    harness.check()
    harness.check_data()


def test_rewritten_pages_are_no_longer_lost_and_purgeable_again(harness: Harness) -> None:
    ranges = harness.sets[1]
    harness.write(1, 0, 6, 8)
    harness.mark_volatile(1, 0, 6, False)
    assert harness.purge(0).freed_bytes == 6 * PAGE_SIZE
    assert len(harness.purger) == 0 and harness.store.used_bytes == 0
    assert harness.purge(0) == Purged(0, 0, [])
    harness.write(1, 2, 3, 9)
    assert not ranges.is_lost(2, 3) and ranges.is_lost(0, 2) and ranges.is_lost(3, 6)
    assert ranges.status(0, 6) == (6, 5)
    assert len(harness.purger) == 1
    assert page_bytes(harness, 1, 2, 3) == b"\x09" * PAGE_SIZE
    result = harness.purge(PAGE_SIZE)
    assert result.freed_bytes == PAGE_SIZE
    assert result.invalidations == [(1, 0, 6 * PAGE_SIZE)]
    assert ranges.status(0, 6) == (6, 6) and len(harness.purger) == 0
    harness.write(1, 0, 6, 10)
    assert ranges.status(0, 6) == (6, 0)
    assert page_bytes(harness, 1, 0, 6) == b"\x0a" * (6 * PAGE_SIZE)
    assert harness.purge(PAGE_SIZE).freed_bytes == 6 * PAGE_SIZE
    assert harness.mark_nonvolatile(1, 0, 6) is True
    assert ranges.status(0, 6) == (0, 0)
    assert page_bytes(harness, 1, 0, 6) == bytes(6 * PAGE_SIZE)
    harness.check()
    harness.check_data()


def test_splitting_a_purged_range_leaves_it_out_of_the_lru(harness: Harness) -> None:
    harness.write(1, 0, 8, 1)
    harness.mark_volatile(1, 0, 8, False)
    harness.purge(0)
    assert len(harness.purger) == 0
    assert harness.mark_nonvolatile(1, 3, 5) is True
    assert harness.sets[1].status(0, 8) == (6, 6)
    assert len(harness.purger) == 0, "pieces of a purged range came back into the LRU"
    assert harness.purge(0) == Purged(0, 0, [])
    harness.check()
    harness.check_data()


def test_truncating_a_purged_range_leaves_it_out_of_the_lru(harness: Harness) -> None:
    harness.write(1, 0, 8, 1)
    harness.mark_volatile(1, 0, 8, False)
    harness.purge(0)
    harness.truncate(1, 4)
    assert harness.sets[1].status(0, 8) == (4, 4)
    assert len(harness.purger) == 0, "the head of a purged range came back into the LRU"
    assert harness.purge(0) == Purged(0, 0, [])
    harness.check()
    harness.check_data()


def test_many_disjoint_ranges() -> None:
    count = 10_000
    store = Store(STORE_PAGES * PAGE_SIZE)
    contents = store.new_file()
    purger = Purger({1: contents}.__getitem__)
    ranges = InodeRanges(purger, 1)
    try:
        for i in range(count):
            ranges.mark_volatile(2 * i, 2 * i + 1, partial=bool(i % 2))
        assert len(purger) == count
        assert ranges.status(0, 2 * count) == (count, 0)
        for i in range(count):
            ranges.mark_volatile(2 * i + 1, 2 * i + 2, partial=False)
        ranges._check()
        purger._check()
        assert len(purger) == len(list(ranges.ranges())) == 2 * count
        # Walking with next_range meets every range once, in order, touching ones apart.
        walked, page = [], 0
        while (found := ranges.next_range(page)) is not None:
            walked.append((found.start, found.end, found.partial))
            page = found.end
        assert walked == [(page, page + 1, page % 4 == 2) for page in range(2 * count)]
        assert ranges.status(1, 2 * count - 1) == (2 * count - 2, 0)
        for i in range(0, count, 2):
            assert ranges.mark_nonvolatile(2 * i, 2 * i + 2) is False
        assert len(purger) == count
        assert ranges.status(0, 2 * count) == (count, 0)
        assert ranges.status(2, 4) == (2, 0) and ranges.status(0, 2) == (0, 0)
        invalidations: list[Invalidation] = []
        # 10,000 ranges in budgets of 1,000: each call stops short and says so.
        results = [purger.purge(0, invalidations, budget=1000) for _ in range(count // 1000)]
        assert [r.complete for r in results] == [False] * (count // 1000 - 1) + [True]
        assert sum(r.ranges for r in results) == count == len(invalidations)
        assert sum(r.freed_bytes for r in results) == 0
        assert len(purger) == 0
        ranges._check()
        assert ranges.status(0, 2 * count) == (count, count)
        for i in range(1, count, 2):
            assert ranges.mark_nonvolatile(2 * i, 2 * i + 1) is True
        ranges._check()
        assert ranges.status(0, 2 * count) == (count // 2, count // 2)
        ranges.mark_volatile(0, 2 * count, partial=True)
        assert [(r.start, r.end, r.partial, r.purged) for r in ranges.ranges()] == [
            (0, 2 * count, False, True)
        ]
        assert len(purger) == 1
        assert ranges.status(0, 2 * count) == (2 * count, count // 2)
        assert ranges.mark_nonvolatile(0, 2 * count) is True
        assert not ranges and len(purger) == 0
        ranges._check()
        purger._check()
    finally:
        store.close()


def test_records_are_bounded_per_inode_and_per_mount() -> None:
    store = Store(STORE_PAGES * PAGE_SIZE)
    limits = RecordLimits(per_inode=4, per_mount=6)
    first, second = store.new_file(), store.new_file()
    purger = Purger({1: first, 2: second}.__getitem__, limits)
    a, b = InodeRanges(purger, 1), InodeRanges(purger, 2)
    try:
        for i in range(4):
            a.mark_volatile(2 * i, 2 * i + 1, partial=False)
        with pytest.raises(OSError) as refused:
            a.mark_volatile(20, 21, partial=False)
        assert refused.value.errno == errno.ENOSPC
        # Merging needs no new record, and unmarking whole ranges frees them.
        a.mark_volatile(0, 3, partial=False)
        assert a.records == 3 == limits.records
        a.mark_volatile(20, 21, partial=False)
        b.mark_volatile(0, 30, partial=True)
        b.mark_volatile(40, 50, partial=False)
        assert limits.records == 6
        with pytest.raises(OSError) as refused:
            b.mark_volatile(60, 61, partial=False)
        assert refused.value.errno == errno.ENOSPC
        # An unmark that would split a range past the mount's bound changes nothing.
        before = [(r.start, r.end) for r in b.ranges()]
        with pytest.raises(OSError) as refused:
            b.mark_nonvolatile(10, 11)
        assert refused.value.errno == errno.ENOSPC
        assert [(r.start, r.end) for r in b.ranges()] == before
        # One that only trims is always possible.
        assert b.mark_nonvolatile(0, 1) is False
        assert [(r.start, r.end) for r in b.ranges()] == [(1, 30), (40, 50)]
        # At the bound, a purge takes a PARTIAL range whole instead of splitting it.
        assert second.write(20 * PAGE_SIZE, bytes(PAGE_SIZE)) == PAGE_SIZE
        b.rewritten(20, 21)
        a.clear()
        limits.per_mount = limits.records
        invalidations: list[Invalidation] = []
        purger.purge(PAGE_SIZE, invalidations)
        assert invalidations == [(2, PAGE_SIZE, 29 * PAGE_SIZE)]
        a._check()
        b._check()
        purger._check()
    finally:
        store.close()


@pytest.mark.parametrize(("count", "partial"), [(100, False), (100, True), (99, True)])
def test_purges_keep_records_within_twice_the_bound(count: int, partial: bool) -> None:
    bound = 100
    store = Store(4 * bound * PAGE_SIZE)
    limits = RecordLimits(per_inode=bound, per_mount=bound)
    contents = store.new_file()
    purger = Purger({1: contents}.__getitem__, limits)
    ranges = InodeRanges(purger, 1)
    try:
        assert contents.write(0, bytes(4 * count * PAGE_SIZE)) == 4 * count * PAGE_SIZE
        for index in range(count):
            ranges.mark_volatile(4 * index, 4 * index + 3, partial=partial)
        # A page at a time: a PARTIAL range loses only its tail, split off, if the bound
        # leaves room for both the head and the tail's lost run; else it goes whole.
        while not purger.purge(PAGE_SIZE, []).complete or len(purger):
            assert ranges.records == limits.records <= 2 * bound
        # Each range purged whole, and its lost run.
        assert ranges.records == limits.records == 2 * count
        ranges._check()
        purger._check()
    finally:
        store.close()


def test_lost_pages_outlive_the_end_of_volatility() -> None:
    store = Store(STORE_PAGES * PAGE_SIZE)
    contents = store.new_file()
    purger = Purger({1: contents}.__getitem__)
    ranges = InodeRanges(purger, 1)
    try:
        assert contents.write(0, b"x" * 8 * PAGE_SIZE) == 8 * PAGE_SIZE
        ranges.mark_volatile(0, 8, partial=False)
        purger.purge(0, [])
        survivor = ranges.end_volatility()
        assert survivor is not None and ranges.discard(10)
        assert purger.statistics().ranges == 0 and len(purger) == 0
        assert survivor.is_lost(0, 8) and survivor.status(0, 8) == (0, 8)
        # A write takes its pages out; an unmark over the rest reports the purge once.
        survivor.rewritten(0, 2)
        assert not survivor.is_lost(0, 2) and survivor.is_lost(2, 8)
        assert survivor.mark_nonvolatile(0, 8) is True
        assert not survivor and survivor.mark_nonvolatile(0, 8) is False
        survivor._check()
    finally:
        store.close()


def test_a_range_whose_file_is_gone_is_dropped_and_the_purge_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Should a file's pages ever vanish under its ranges (a bug), the purge must not stop at
    the head of the order for good: the range goes, logged, and the others are purged."""
    store = Store(STORE_PAGES * PAGE_SIZE)
    files = {ino: store.new_file() for ino in (1, 2)}
    purger = Purger(files.__getitem__)
    try:
        for ino, contents in files.items():
            assert contents.write(0, b"x" * 4 * PAGE_SIZE) == 4 * PAGE_SIZE
            InodeRanges(purger, ino).mark_volatile(0, 4, partial=False)
        del files[1]  # the older range's file
        invalidations: list[Invalidation] = []
        result = purger.purge(0, invalidations)
        assert (result.ranges, result.freed_bytes) == (1, 4 * PAGE_SIZE)
        assert invalidations == [(2, 0, 4 * PAGE_SIZE)]
        assert len(purger) == 0
        assert "inode 1 has ranges but no contents" in caplog.text
    finally:
        store.close()
