"""Reclaim without a kernel: purges for room, for pressure and on request, and the cache drops
that follow them (volfs.core.reclaim over a real store, namespace and worker thread).

The kernel's page cache is a recorder (:class:`tests.operations.fakes.PageCache`) that can hold a
drop in flight, so every test can tell which byte ranges left the cache and when.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Awaitable

import pytest
import trio
import trio.testing

from tests.operations.fakes import DEADLINE, Core, open_file, page, run_core, wait_until
from volfs.abi import PAGE_SIZE, VRANGE_PARTIAL, VRANGE_VOLATILE, pages_for
from volfs.core.inode import Inode
from volfs.core.namespace import ROOT_INODE, Namespace
from volfs.core.purge import PURGE_BUDGET, PurgeSource
from volfs.core.reclaim import DROP_BATCH, FORGET_WAIT
from volfs.core.store import FORGET_WAITERS

P = PAGE_SIZE


def mark(namespace: Namespace, inode: Inode, first: int, pages: int, flags: int = 0) -> None:
    """Mark pages [first, first + pages) of ``inode`` volatile: one range, newest in the LRU."""
    namespace.volatility.vrange(inode, first * P, pages * P, VRANGE_VOLATILE, flags)


def readable(namespace: Namespace, inode: Inode, index: int) -> bytes | None:
    """Page ``index`` of ``inode`` as a read returns it, or None if the read fails with EIO."""
    try:
        return bytes(namespace.read(inode, index * P, P))
    except OSError as error:
        assert error.errno == errno.EIO
        return None


def lost_pages(namespace: Namespace, inode: Inode) -> list[int]:
    """The pages of ``inode`` whose reads fail with EIO."""
    assert inode.contents is not None
    pages = pages_for(inode.contents.size)
    return [index for index in range(pages) if readable(namespace, inode, index) is None]


def write_making_room(core: Core, inode: Inode, first: int, data: bytes) -> Awaitable[int]:
    """Write ``data`` at page ``first`` of ``inode`` as the adapter does once it hit the cap."""
    assert inode.contents is not None
    end = first + pages_for(len(data))
    return core.reclaimer.make_room(
        inode.contents, first, end, lambda: core.namespace.write(inode, first * P, data)
    )


# -- making room under the size cap ---------------------------------------------------------


def test_a_write_over_the_cap_purges_the_oldest_ranges_of_any_file_first() -> None:
    async def test(core: Core) -> None:
        ns = core.namespace
        kept = open_file(ns, b"kept", range(16))
        one = open_file(ns, b"one", range(100, 124))
        other = open_file(ns, b"other", range(200, 224))
        # Marked alternately: the LRU runs across files, other[0:8] being the oldest.
        for first in (0, 8, 16):
            mark(ns, other, first, 8)
            mark(ns, one, first, 8)
        new = open_file(ns, b"new")
        data = b"n" * (20 * P)
        with pytest.raises(OSError) as full:
            ns.write(new, 0, data)
        assert full.value.errno == errno.ENOSPC

        assert await write_making_room(core, new, 0, data) == len(data)

        # 20 pages wanted: the three oldest 8-page ranges went, whole, and nothing else.
        assert lost_pages(ns, other) == list(range(16))
        assert lost_pages(ns, one) == list(range(8))
        assert [readable(ns, one, i) for i in range(8, 24)] == [page(100 + i) for i in range(8, 24)]
        assert [readable(ns, other, i) for i in range(16, 24)] == [
            page(200 + i) for i in range(16, 24)
        ]
        assert [readable(ns, kept, i) for i in range(16)] == [page(i) for i in range(16)]
        assert bytes(ns.read(new, 0, len(data))) == data
        assert ns.volatility.status(other, 0, 0) == (24 * P, 16 * P)
        assert ns.volatility.status(one, 0, 0) == (24 * P, 8 * P)
        await wait_until(lambda: not core.reclaimer.is_dropping(other.ino))
        assert sorted(core.cache.ranges) == sorted(
            [(other.ino, 0, 8 * P), (one.ino, 0, 8 * P), (other.ino, 8 * P, 8 * P)]
        )
        assert ns.statistics().purges_size == 1

    run_core(test)


def test_enospc_comes_only_once_no_volatile_data_is_left() -> None:
    async def test(core: Core) -> None:
        ns = core.namespace
        kept = open_file(ns, b"kept", range(32))
        cache = open_file(ns, b"cache", range(100, 132))
        for first in range(0, 32, 8):
            mark(ns, cache, first, 8)
        new = open_file(ns, b"new")
        written = 0
        with pytest.raises(OSError) as full:
            while True:
                await write_making_room(core, new, written, page(written) * 8)
                written += 8
        assert full.value.errno == errno.ENOSPC
        # Every volatile page made room before the first ENOSPC; non-volatile data never did.
        assert written == 32
        assert lost_pages(ns, cache) == list(range(32))
        assert [readable(ns, kept, i) for i in range(32)] == [page(i) for i in range(32)]
        assert bytes(ns.read(new, 0, 32 * P)) == b"".join(page(i) * 8 for i in range(0, 32, 8))
        assert ns.statistics().purgeable_ranges == 0

    run_core(test)


def test_a_write_at_the_cap_waits_for_removed_files_the_kernel_is_about_to_forget() -> None:
    """A removed file's memory comes back at the kernel's FORGET, which comes a few requests
    after the unlink: a write at the cap waits for it (a while) rather than purge or fail."""

    async def test(core: Core) -> None:
        ns = core.namespace
        cache = open_file(ns, b"cache", range(16))
        mark(ns, cache, 0, 16)
        new = open_file(ns, b"new")
        for forget_after in (0.01, None):
            gone = open_file(ns, b"gone", range(40))  # the kernel looked it up: CREATE
            ns.unlink(ROOT_INODE, b"gone")
            ns.close(gone)
            assert core.store.unforgotten_pages == 40

            async def forget(delay: float, ino: int = gone.ino) -> None:
                await trio.sleep(delay)
                ns.forget(ino, 1)

            if forget_after is not None:
                core.nursery.start_soon(forget, forget_after)
            started = trio.current_time()
            await write_making_room(core, new, 0, page(1) * 16)  # 16 + 40 + 16 > 64
            waited = trio.current_time() - started
            if forget_after is not None:
                # The forgotten file's pages made the room: nothing volatile was purged.
                assert forget_after <= waited < FORGET_WAIT
                assert lost_pages(ns, cache) == []
            else:
                # A program still holds the removed file: purging goes on, after a while.
                assert waited >= FORGET_WAIT
                assert lost_pages(ns, cache) != []
            ns.truncate(new, 0)

    run_core(test)


def test_past_forget_waiters_a_write_at_the_cap_goes_on_without_waiting() -> None:
    """Writes waiting at the cap for a removed file held for good each hold one of the
    request workers all users share: past FORGET_WAITERS of them, a write purges or fails
    at once instead of waiting too."""

    async def test(core: Core) -> None:
        ns = core.namespace
        held = open_file(ns, b"held", range(40))
        ns.unlink(ROOT_INODE, b"held")
        ns.close(held)  # the kernel still holds it: an O_PATH descriptor, say
        filler = open_file(ns, b"filler", range(24))
        writers = [open_file(ns, b"w%d" % index) for index in range(FORGET_WAITERS + 1)]
        outcomes: list[tuple[int, float]] = []

        async def write(inode: Inode) -> None:
            started = trio.current_time()
            with pytest.raises(OSError) as failure:
                await write_making_room(core, inode, 0, page(1))
            outcomes.append((failure.value.errno or 0, trio.current_time() - started))

        async with trio.open_nursery() as nursery:
            for inode in writers[:-1]:
                nursery.start_soon(write, inode)
            await trio.testing.wait_all_tasks_blocked()
            assert outcomes == []
            await write(writers[-1])
            assert outcomes[0][0] == errno.ENOSPC and outcomes[0][1] < FORGET_WAIT / 2
        assert {code for code, _waited in outcomes} == {errno.ENOSPC}
        assert min(waited for _code, waited in outcomes[1:]) >= FORGET_WAIT
        assert [readable(ns, filler, index) for index in range(24)] == [
            page(index) for index in range(24)
        ]

    run_core(test)


def test_writes_at_the_cap_wait_for_queued_forgets_however_many() -> None:
    """Waits for forgets the daemon has queued end as it takes them: they are not bounded
    by FORGET_WAITERS, and no write purges or fails for memory on its way back."""

    async def test(core: Core) -> None:
        ns, store = core.namespace, core.store
        gone = open_file(ns, b"gone", range(40))
        ns.unlink(ROOT_INODE, b"gone")
        ns.close(gone)
        cache = open_file(ns, b"cache", range(8))
        mark(ns, cache, 0, 8)
        writers = [open_file(ns, b"w%d" % index) for index in range(FORGET_WAITERS + 1)]
        filler = open_file(ns, b"filler")
        with pytest.raises(OSError):
            for index in range(64):
                ns.write(filler, index * P, page(index))
        store.note_forgets_queued(1)
        written: list[int] = []

        async def write(inode: Inode) -> None:
            written.append(await write_making_room(core, inode, 0, page(1)))

        async def take_forget() -> None:
            await trio.sleep(FORGET_WAIT / 4)
            ns.forget(gone.ino, 1)
            store.note_forgets_queued(-1)

        async with trio.open_nursery() as nursery:
            for inode in writers:
                nursery.start_soon(write, inode)
            nursery.start_soon(take_forget)
        assert written == [P] * len(writers)
        assert lost_pages(ns, cache) == []

    run_core(test)


def test_a_write_at_the_cap_waits_for_forgets_sent_but_not_taken_yet() -> None:
    """Forgets of a large batch wait their turn in the daemon (the forget task), however long
    that takes: what removed inodes among them hold is on its way back, so a write at the
    cap waits for them rather than purge or fail."""

    async def test(core: Core) -> None:
        ns, store = core.namespace, core.store
        cache = open_file(ns, b"cache", range(16))
        mark(ns, cache, 0, 16)
        new = open_file(ns, b"new")
        gone = open_file(ns, b"gone", range(40))
        ns.unlink(ROOT_INODE, b"gone")
        ns.close(gone)
        link = ns.symlink(ROOT_INODE, b"link", b"t" * 4000, 0, 0)  # a page of the cap
        ns.unlink(ROOT_INODE, b"link")
        assert store.unforgotten_pages == 41
        store.note_forgets_queued(2)
        taken_after = 3 * FORGET_WAIT

        async def take_forgets() -> None:
            await trio.sleep(taken_after)
            ns.forget(link.ino, 1)
            store.note_forgets_queued(-1)
            await trio.sleep(taken_after)
            ns.forget(gone.ino, 1)
            store.note_forgets_queued(-1)

        core.nursery.start_soon(take_forgets)
        started = trio.current_time()
        await write_making_room(core, new, 0, page(1) * 16)  # 16 + 40 + 1 + 16 > 64
        assert trio.current_time() - started >= 2 * taken_after
        assert lost_pages(ns, cache) == []
        assert store.unforgotten_pages == 0 and store.forgets_queued == 0

    run_core(test)


def test_a_span_larger_than_the_whole_store_fails_without_purging() -> None:
    async def test(core: Core) -> None:
        ns = core.namespace
        cache = open_file(ns, b"cache", range(32))
        mark(ns, cache, 0, 32)
        new = open_file(ns, b"new")
        with pytest.raises(OSError) as full:
            await write_making_room(core, new, 0, bytes(65 * P))
        assert full.value.errno == errno.ENOSPC
        assert ns.volatility.status(cache, 0, 0) == (32 * P, 0)
        assert [readable(ns, cache, i) for i in range(32)] == [page(i) for i in range(32)]
        assert core.cache.batches == []
        assert ns.statistics().purged_bytes == 0

    run_core(test)


def test_a_partial_range_gives_up_only_the_pages_wanted_from_its_end() -> None:
    async def test(core: Core) -> None:
        ns = core.namespace
        cache = open_file(ns, b"cache", range(64))
        mark(ns, cache, 0, 64, VRANGE_PARTIAL)
        new = open_file(ns, b"new")
        await write_making_room(core, new, 0, b"x" * (3 * P + 1))
        assert lost_pages(ns, cache) == [60, 61, 62, 63]
        assert readable(ns, cache, 59) == page(59)
        assert ns.volatility.status(cache, 0, 0) == (64 * P, 4 * P)

    run_core(test)


def test_memory_on_its_way_back_is_neither_purged_for_again_nor_reported_as_full() -> None:
    """A purge long enough for the reclaimer to start punching its first pages in the worker
    thread is followed neither by a second purge for those pages nor by ENOSPC.
    """

    async def test(core: Core) -> None:
        ns = core.namespace
        open_file(ns, b"kept", range(2048 - 800))
        cache = open_file(ns, b"cache", range(800))
        for first in range(0, 800, 20):
            mark(ns, cache, first, 20)
        # Punching takes a while (about 0.15 s a GiB): here, until the event loop is idle.
        arena = core.store.arena
        punch, gate = arena.punch, threading.Event()

        def slow_punch(runs: list[tuple[int, int]]) -> None:
            if threading.current_thread() is not threading.main_thread():
                gate.wait(DEADLINE)
            punch(runs)

        async def open_gate_when_idle() -> None:
            await trio.testing.wait_all_tasks_blocked()
            gate.set()

        arena.punch = slow_punch  # type: ignore[method-assign]
        core.nursery.start_soon(open_gate_when_idle)
        try:
            new = open_file(ns, b"new")
            await write_making_room(core, new, 0, bytes(700 * P))
        finally:
            gate.set()
        # 700 pages wanted: 35 of the 20-page ranges, the 5 newest untouched.
        assert ns.statistics().purged_bytes == 700 * P
        assert lost_pages(ns, cache) == list(range(700))

    run_core(test, capacity_pages=2048)


# -- purges racing writes -------------------------------------------------------------------


def test_a_write_into_the_range_purged_to_make_room_for_it_keeps_its_pages() -> None:
    async def test(core: Core) -> None:
        ns = core.namespace
        # 16 pages, the last 4 a hole: the write into them needs room, and the only volatile
        # range is the one holding them.
        sparse = open_file(ns, b"sparse", range(12))
        ns.truncate(sparse, 16 * P)
        mark(ns, sparse, 0, 16)
        open_file(ns, b"kept", range(100, 152))
        data = b"w" * (2 * P)
        assert await write_making_room(core, sparse, 12, data) == len(data)
        assert bytes(ns.read(sparse, 12 * P, 2 * P)) == data
        assert lost_pages(ns, sparse) == [*range(12), 14, 15]
        # Still volatile, all of it; purged and not rewritten: the other 14 pages.
        assert ns.volatility.status(sparse, 0, 0) == (16 * P, 14 * P)

    run_core(test)


def test_a_write_between_the_budgets_of_a_purge_is_kept_or_reported_lost() -> None:
    pages = 4 * PURGE_BUDGET
    wanted = 3 * PURGE_BUDGET

    async def test(core: Core) -> None:
        ns = core.namespace
        cache = open_file(ns, b"cache", range(pages + 1))
        for index in range(pages):
            mark(ns, cache, index, 1)  # one range each, oldest first
        written: dict[int, bytes] = {}

        async def writer() -> None:
            await wait_until(lambda: readable(ns, cache, 0) is None)
            # Between two budgets: the first was purged, the last one not yet.
            assert readable(ns, cache, wanted - 1) == page(wanted - 1)
            for index in (5, pages - 4, pages):  # purged, never reached, not volatile
                written[index] = b"w" * P
                ns.write(cache, index * P, written[index])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            result = await core.reclaimer.purge(wanted * P, PurgeSource.IOCTL, wait=True)

        assert result.freed_bytes == wanted * P
        assert result.ranges == wanted
        assert len(written) == 3
        contents = [readable(ns, cache, index) for index in range(pages + 1)]
        # A page reads as written, as it was, or fails: never as zeros.
        for index, found in enumerate(contents):
            assert found in (None, written.get(index, page(index))), index
        assert contents[pages - 4] == contents[pages] == b"w" * P
        # As many pages lost as ranges taken, but for the one taken twice if it was.
        assert contents.count(None) in (wanted, wanted - 1)
        assert ns.statistics().purges_ioctl == 1

    run_core(test, capacity_pages=256)


# -- cache drops ----------------------------------------------------------------------------


def test_an_inode_is_dropping_until_its_purged_pages_left_the_cache() -> None:
    async def test(core: Core) -> None:
        ns = core.namespace
        untouched = open_file(ns, b"untouched", range(4))
        cache = open_file(ns, b"cache", range(8))
        mark(ns, cache, 0, 8)
        core.cache.hold()
        result = await core.reclaimer.purge(0, PurgeSource.IOCTL)
        assert result.freed_bytes == 8 * P
        assert core.reclaimer.is_dropping(cache.ino)
        assert not core.reclaimer.is_dropping(untouched.ino)
        waited: list[str] = []

        async def wait_dropped() -> None:
            await core.reclaimer.dropped(cache.ino)
            waited.append("dropped")

        core.nursery.start_soon(wait_dropped)
        await wait_until(core.cache.entered.is_set)
        await trio.testing.wait_all_tasks_blocked()
        assert waited == []
        assert core.cache.batches == []
        assert core.reclaimer.is_dropping(cache.ino)
        core.cache.release()
        await wait_until(lambda: waited == ["dropped"])
        assert core.cache.batches == [[(cache.ino, 0, 8 * P)]]
        assert not core.reclaimer.is_dropping(cache.ino)
        await core.reclaimer.dropped(untouched.ino)  # nothing to wait for

    run_core(test)


def test_purged_ranges_leave_the_cache_in_batches_before_a_waiting_purge_returns() -> None:
    ranges = 2 * DROP_BATCH + 10

    async def test(core: Core) -> None:
        ns = core.namespace
        files = [open_file(ns, name, range(ranges // 2)) for name in (b"one", b"two")]
        for index in range(ranges // 2):
            for inode in files:
                mark(ns, inode, index, 1)
        result = await core.reclaimer.purge(0, PurgeSource.IOCTL, wait=True)
        core.cache.events.append(("returned", result.ranges))

        assert result.ranges == ranges
        assert core.cache.events[-1] == ("returned", ranges)
        sizes = [size for what, size in core.cache.events[:-1] if what == "dropped"]
        assert sum(sizes) == ranges
        assert len(sizes) == 3
        assert max(sizes) <= DROP_BATCH
        expected = {(inode.ino, i * P, P) for inode in files for i in range(ranges // 2)}
        assert sorted(core.cache.ranges) == sorted(expected)
        assert not any(core.reclaimer.is_dropping(inode.ino) for inode in files)

    run_core(test, capacity_pages=ranges + 8)


def test_a_waiting_purge_counts_the_write_back_its_drops_discarded(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def test(core: Core) -> None:
        ns = core.namespace
        sparse = open_file(ns, b"sparse", range(4))
        ns.truncate(sparse, 8 * P)  # pages 4 to 7 only in the kernel's cache, dirty
        mark(ns, sparse, 0, 8)
        core.cache.written_back = 3 * P
        waited = await core.reclaimer.purge(0, PurgeSource.IOCTL, wait=True)
        assert waited.freed_bytes == 4 * P + 3 * P

        # Pages held and dirty again are freed and discarded both: counted within the range.
        held = open_file(ns, b"held", range(4))
        mark(ns, held, 0, 4)
        waited = await core.reclaimer.purge(0, PurgeSource.IOCTL, wait=True)
        assert waited.freed_bytes == 4 * P

        # Without waiting, only what the purge took from the store is known when it returns.
        unwaited = open_file(ns, b"unwaited", range(4))
        mark(ns, unwaited, 0, 4)
        assert (await core.reclaimer.purge(0, PurgeSource.PRESSURE)).freed_bytes == 4 * P
        await wait_until(lambda: len(core.cache.batches) == 3)

    with caplog.at_level(logging.INFO, logger="volfs.core.reclaim"):
        run_core(test)
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("purge (")]
    assert logged[0].startswith(f"purge (ioctl): 1 ranges, {7 * P} bytes freed;")


def test_batches_stay_within_the_bound_when_the_order_holds_ended_ranges() -> None:
    async def test(core: Core) -> None:
        ns = core.namespace
        # A closed file's ranges go a bounded number at a time: until then a purge skips them.
        closed = open_file(ns, b"closed", range(206))
        for index in range(206):
            mark(ns, closed, index, 1)
        ns.close(closed)
        cache = open_file(ns, b"cache", range(DROP_BATCH + 100))
        for index in range(DROP_BATCH + 100):
            mark(ns, cache, index, 1)
        result = await core.reclaimer.purge(0, PurgeSource.IOCTL, wait=True)
        assert result.ranges == DROP_BATCH + 100
        assert max(len(batch) for batch in core.cache.batches) <= DROP_BATCH

    run_core(test, capacity_pages=2048)


def test_a_failing_drop_is_logged_and_purging_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    async def test(core: Core) -> None:
        ns = core.namespace
        cache = open_file(ns, b"cache", range(8))
        mark(ns, cache, 0, 4)
        mark(ns, cache, 4, 4)
        core.cache.failure = RuntimeError("the kernel refused")
        first = await core.reclaimer.purge(4 * P, PurgeSource.IOCTL, wait=True)
        assert first.freed_bytes == 4 * P
        assert not core.reclaimer.is_dropping(cache.ino)
        core.cache.failure = None
        second = await core.reclaimer.purge(0, PurgeSource.IOCTL, wait=True)
        assert second.freed_bytes == 4 * P
        assert core.cache.batches == [[(cache.ino, 0, 4 * P)], [(cache.ino, 4 * P, 4 * P)]]
        assert lost_pages(ns, cache) == list(range(8))

    with caplog.at_level(logging.ERROR, logger="volfs.core.reclaim"):
        run_core(test)
    failures = [r for r in caplog.records if "cannot drop purged pages" in r.getMessage()]
    assert len(failures) == 1
    assert failures[0].exc_info is not None
    assert "the kernel refused" in str(failures[0].exc_info[1])


# -- statistics and pressure ----------------------------------------------------------------


def test_purges_are_counted_by_what_asked_for_them() -> None:
    async def test(core: Core) -> None:
        ns = core.namespace
        cache = open_file(ns, b"cache", range(64))
        for first in range(0, 64, 8):
            mark(ns, cache, first, 8)
        await core.reclaimer.purge(8 * P, PurgeSource.IOCTL)
        await core.reclaimer.purge(8 * P, PurgeSource.IOCTL)
        new = open_file(ns, b"new")
        await write_making_room(core, new, 0, bytes(24 * P))  # 16 pages free, 8 more wanted
        assert await core.reclaimer.relieve_pressure(8 * P) == 8 * P
        statistics = ns.statistics()
        assert (
            statistics.purges_ioctl,
            statistics.purges_size,
            statistics.purges_pressure,
        ) == (2, 1, 1)
        assert statistics.purged_bytes == 32 * P
        assert statistics.purgeable_ranges == 4
        assert statistics.used_bytes == 56 * P
        assert lost_pages(ns, cache) == list(range(32))

    run_core(test)


def test_relieving_pressure_returns_the_bytes_freed_once_they_are_back() -> None:
    async def test(core: Core) -> None:
        ns = core.namespace
        cache = open_file(ns, b"cache", range(768))
        for first in range(0, 768, 256):
            mark(ns, cache, first, 256)
        assert core.store.used_bytes == 768 * P
        # 300 pages wanted: whole ranges go, two of them.
        assert await core.reclaimer.relieve_pressure(300 * P) == 512 * P
        assert not core.store.reclaim_pending
        assert core.store.used_bytes == 256 * P
        assert lost_pages(ns, cache) == list(range(512))
        assert ns.statistics().purges_pressure == 1
        assert await core.reclaimer.relieve_pressure(P) == 256 * P
        assert await core.reclaimer.relieve_pressure(P) == 0

    run_core(test, capacity_pages=1024)


@pytest.mark.parametrize("failure", [RuntimeError("a bug"), MemoryError()])
def test_relieving_pressure_never_raises(
    failure: BaseException, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def test(core: Core) -> None:
        ns = core.namespace
        cache = open_file(ns, b"cache", range(8))
        mark(ns, cache, 0, 8)
        purge = ns.purger.purge

        def failing(*args: object, **kwargs: object) -> object:
            raise failure

        monkeypatch.setattr(ns.purger, "purge", failing)
        assert await core.reclaimer.relieve_pressure(8 * P) == 0
        monkeypatch.setattr(ns.purger, "purge", purge)
        # The watcher's next batch works: nothing was left half done.
        assert await core.reclaimer.relieve_pressure(8 * P) == 8 * P
        assert lost_pages(ns, cache) == list(range(8))

    with caplog.at_level(logging.ERROR, logger="volfs.core.reclaim"):
        run_core(test)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == [
        "purging for memory pressure failed"
    ]
