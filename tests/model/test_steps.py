"""Long operations of the namespace taken in bounded steps, without a mount.

A mark or unmark over many ranges, and the end of a file's volatility, are done a bounded
amount at a time so that the daemon serves other requests between steps. These tests check
that the steps add up to exactly what one go does, that everything that can fail fails before
the first step, and that a purge between steps never takes what it must not.
"""

from __future__ import annotations

import errno
import itertools
from collections.abc import Iterator

import pytest

from volfs.abi import PAGE_SIZE, VRANGE_NONVOLATILE, VRANGE_PARTIAL, VRANGE_VOLATILE
from volfs.core.inode import Inode
from volfs.core.namespace import DISCARD_BUDGET, ROOT_INODE, Namespace
from volfs.core.purge import Invalidation
from volfs.core.ranges import RecordLimits
from volfs.core.store import Store
from volfs.core.volatility import VRANGE_STEP

RANGES = 3 * VRANGE_STEP + 17


@pytest.fixture
def namespace() -> Iterator[Namespace]:
    store = Store(64 << 20)
    try:
        yield Namespace(
            store,
            limits=RecordLimits(per_inode=10 * RANGES, per_mount=10 * RANGES),
            max_inodes=0,
            root_mode=0o755,
            root_uid=0,
            root_gid=0,
        )
    finally:
        store.close()


def sparse_file(namespace: Namespace, name: bytes, pages: int) -> Inode:
    inode = namespace.mknod(ROOT_INODE, name, 0o644, 0, 0)
    assert inode.contents is not None
    namespace.open(inode)
    namespace.truncate(inode, pages * PAGE_SIZE)
    return inode


def every_other_page(namespace: Namespace, inode: Inode, count: int) -> None:
    for index in range(count):
        flags = VRANGE_PARTIAL if index % 3 else 0
        namespace.volatility.vrange(inode, 2 * index * PAGE_SIZE, PAGE_SIZE, VRANGE_VOLATILE, flags)


def shape(inode: Inode) -> list[tuple[int, int, bool, bool]]:
    assert inode.vranges is not None
    return [(r.start, r.end, r.partial, r.purged) for r in inode.vranges.ranges()]


def purge_all(namespace: Namespace) -> list[Invalidation]:
    """Purge everything, budget after budget, as the daemon does."""
    invalidations: list[Invalidation] = []
    while not namespace.purger.purge(0, invalidations).complete:
        pass
    return invalidations


def run(steps: Iterator[None]) -> tuple[int, int]:
    """Drive a step generator to its end; return (steps taken, pages marked)."""
    taken = 0
    while True:
        try:
            next(steps)
        except StopIteration as done:
            marked, _purged = done.value
            return taken, marked
        taken += 1


@pytest.mark.parametrize("mode", [VRANGE_VOLATILE, VRANGE_NONVOLATILE])
def test_a_span_over_many_ranges_takes_several_steps_adding_up_to_one_go(
    namespace: Namespace, mode: int
) -> None:
    one, stepped = (
        sparse_file(namespace, b"one", 4 * RANGES),
        sparse_file(namespace, b"stepped", 4 * RANGES),
    )
    for inode in (one, stepped):
        every_other_page(namespace, inode, RANGES)
        # One range straddling the span's end: an unmark splits it, a mark merges it.
        namespace.volatility.vrange(
            inode, 3 * RANGES * PAGE_SIZE, 8 * PAGE_SIZE, VRANGE_VOLATILE, 0
        )
    start, length = PAGE_SIZE, (3 * RANGES + 4) * PAGE_SIZE
    expected = namespace.volatility.vrange(one, start, length, mode, 0)
    steps = namespace.volatility.vrange_steps(stepped, start, length, mode, 0)
    taken, marked = run(steps)
    assert taken >= RANGES // VRANGE_STEP, "a long span was taken in one go"
    assert marked == expected[0]
    assert shape(stepped) == shape(one)
    assert stepped.vranges is not None and one.vranges is not None
    stepped.vranges._check()
    namespace.purger._check()


def test_a_refused_unmark_changes_nothing_before_its_first_step(namespace: Namespace) -> None:
    inode = sparse_file(namespace, b"f", 4 * RANGES)
    # Ranges that touch stay apart; purged, their lost pages make one run.
    for index in range(RANGES):
        namespace.volatility.vrange(inode, index * PAGE_SIZE, PAGE_SIZE, VRANGE_VOLATILE, 0)
    purge_all(namespace)
    assert inode.vranges is not None and inode.vranges.lost_pages == RANGES
    before = shape(inode)
    limits = namespace.purger.limits
    limits.per_inode = limits.per_mount = limits.records
    # Unmarking inside the lost run splits it: one record too many, refused before any step.
    steps = namespace.volatility.vrange_steps(
        inode, PAGE_SIZE, (RANGES - 2) * PAGE_SIZE, VRANGE_NONVOLATILE, 0
    )
    with pytest.raises(OSError) as refused:
        next(steps)
    assert refused.value.errno == errno.ENOSPC
    assert shape(inode) == before
    assert inode.vranges.lost_pages == RANGES


def test_a_purge_between_steps_of_an_unmark_is_reported(namespace: Namespace) -> None:
    inode = sparse_file(namespace, b"f", 4 * RANGES)
    assert inode.contents is not None
    inode.contents.write((2 * RANGES - 2) * PAGE_SIZE, b"x" * PAGE_SIZE)
    every_other_page(namespace, inode, RANGES)
    steps = namespace.volatility.vrange_steps(inode, 0, 0, VRANGE_NONVOLATILE, 0)
    next(steps)
    # The ranges not yet unmarked are still volatile: a purge may take them now.
    assert purge_all(namespace)
    with pytest.raises(StopIteration) as done:
        while True:
            next(steps)
    assert done.value.value == (4 * RANGES * PAGE_SIZE, True)
    assert inode.vranges is None
    assert namespace.purger.limits.records == 0


def test_the_last_close_ends_volatility_at_once_and_frees_the_records_in_budgets(
    namespace: Namespace,
) -> None:
    inode = sparse_file(namespace, b"f", 4 * RANGES)
    assert inode.contents is not None
    data = b"y" * (16 * PAGE_SIZE)
    inode.contents.write(0, data)
    every_other_page(namespace, inode, RANGES)
    limits = namespace.purger.limits
    assert limits.records == RANGES
    assert namespace.close(inode), "a file with many ranges was cleared in one go"
    statistics = namespace.purger.statistics()
    assert (statistics.ranges, statistics.volatile_bytes) == (0, 0)
    # Nothing of a closed file may be purged while its ranges wait to be dropped.
    assert purge_all(namespace) == []
    assert bytes(inode.contents.read(0, len(data))) == data
    rounds = 1
    while namespace.discard_ended():
        rounds += 1
    assert rounds >= RANGES // DISCARD_BUDGET - 1
    assert limits.records == 0
    assert len(namespace.purger) == 0


def test_truncation_drops_many_ranges_in_steps(namespace: Namespace) -> None:
    inode = sparse_file(namespace, b"f", 4 * RANGES)
    every_other_page(namespace, inode, RANGES)
    keep = 40
    steps = sum(1 for _step in namespace.truncate_steps(inode, keep * PAGE_SIZE - 100))
    assert steps >= RANGES // VRANGE_STEP - 1
    assert inode.size == keep * PAGE_SIZE - 100
    assert [(start, end) for start, end, _p, _q in shape(inode)] == [
        (page, page + 1) for page in range(0, keep, 2)
    ]
    assert namespace.purger.limits.records == keep // 2
    assert namespace.purger.statistics().volatile_bytes == keep // 2 * PAGE_SIZE


def test_a_truncation_between_steps_of_a_mark_leaves_nothing_past_the_end(
    namespace: Namespace,
) -> None:
    inode = sparse_file(namespace, b"f", 4 * RANGES)
    every_other_page(namespace, inode, RANGES)
    steps = namespace.volatility.vrange_steps(inode, 0, 0, VRANGE_VOLATILE, 0)
    next(steps)
    namespace.truncate(inode, 10 * PAGE_SIZE)
    assert run(steps)[1] == 4 * RANGES * PAGE_SIZE
    assert [(start, end) for start, end, _p, _q in shape(inode)] == [(0, 10)]
    assert inode.vranges is not None
    inode.vranges._check()
    namespace.purger._check()


def test_a_last_close_between_steps_of_a_truncation_leaves_no_lost_page_past_the_end(
    namespace: Namespace,
) -> None:
    inode = sparse_file(namespace, b"f", 4 * RANGES)
    assert inode.contents is not None
    inode.contents.write(0, b"x" * (4 * RANGES * PAGE_SIZE))
    every_other_page(namespace, inode, RANGES)
    purge_all(namespace)
    steps = namespace.truncate_steps(inode, 0)
    next(steps)
    namespace.close(inode)  # the only opener goes; a truncate(2) by path goes on
    for _step in steps:
        pass
    while namespace.discard_ended():
        pass
    assert inode.vranges is None, "lost pages past the end outlived the truncation"
    assert namespace.purger.limits.records == 0
    namespace.open(inode)
    namespace.truncate(inode, 4 * RANGES * PAGE_SIZE)  # holes again: they must read as zeros
    assert inode.vranges is None


def test_every_step_stays_bounded_whatever_happens_between_steps(namespace: Namespace) -> None:
    inode = sparse_file(namespace, b"f", 8 * RANGES)
    big = 4 * RANGES
    namespace.volatility.vrange(inode, 0, big * PAGE_SIZE, VRANGE_VOLATILE, 0)
    for index in range(RANGES):
        namespace.volatility.vrange(
            inode, (big + 2 * index) * PAGE_SIZE, PAGE_SIZE, VRANGE_VOLATILE, 0
        )
    steps = namespace.volatility.vrange_steps(inode, 0, 0, VRANGE_VOLATILE, 0)
    next(steps)
    # Another user splits what the first step marked into thousands of ranges.
    for index in range(1, RANGES):
        namespace.volatility.vrange(inode, 2 * index * PAGE_SIZE, PAGE_SIZE, VRANGE_NONVOLATILE, 0)
    assert inode.vranges is not None
    counts = [inode.vranges.range_count]
    for _step in steps:
        counts.append(inode.vranges.range_count)
    counts.append(inode.vranges.range_count)
    assert len(counts) > 2, "the rest of the span was taken in one step"
    # A step merges at most its own share of ranges, not all the fragments made meanwhile.
    assert all(before - after <= VRANGE_STEP + 2 for before, after in itertools.pairwise(counts))
    inode.vranges._check()
    namespace.purger._check()


def test_no_segment_takes_pages_a_mark_under_way_has_still_to_reach(namespace: Namespace) -> None:
    inode = sparse_file(namespace, b"f", 2 * RANGES + 16)
    every_other_page(namespace, inode, RANGES)
    volatility = namespace.volatility
    volatility.segment_table(inode, 4)
    beyond = 2 * RANGES  # past the ranges: the mark's last step reaches it

    def mark() -> Iterator[None]:
        return volatility.vrange_steps(inode, 0, (beyond + 4) * PAGE_SIZE, VRANGE_VOLATILE, 0)

    steps = mark()
    next(steps)  # the first piece is marked, the rest not yet
    with pytest.raises(OSError) as caught:
        volatility.register(inode, beyond * PAGE_SIZE, PAGE_SIZE, 0)
    assert caught.value.errno == errno.EBUSY
    run(steps)
    assert shape(inode) == [(0, beyond + 4, False, False)]
    volatility.register(inode, (beyond + 4) * PAGE_SIZE, PAGE_SIZE, 0)  # past the mark: free

    # A mark given up halfway (its request interrupted) holds nothing back.
    namespace.volatility.vrange(inode, 0, (beyond + 4) * PAGE_SIZE, VRANGE_NONVOLATILE, 0)
    every_other_page(namespace, inode, RANGES)
    steps = mark()
    next(steps)
    steps.close()
    volatility.register(inode, beyond * PAGE_SIZE, PAGE_SIZE, 0)
