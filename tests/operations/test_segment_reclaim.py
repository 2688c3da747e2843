"""Segments purged through the reclaimer, without a kernel: a claim is published only once its
pages have left the (recorded) page cache, whatever happens to the drop."""

from __future__ import annotations

import mmap
import os

import trio

from tests.operations.fakes import Core, open_file, page, run_core, wait_until
from volfs import _segments
from volfs.abi import (
    PAGE_SIZE,
    SEGMENT_PINNED,
    SEGMENT_PURGED,
    SEGMENT_PURGING,
    SEGMENT_STALE,
    SEGMENT_UNPINNED,
)
from volfs.core.inode import Inode
from volfs.core.purge import PurgeSource
from volfs.core.segments import Segment, SegmentTable

P = PAGE_SIZE


class Client:
    """A client's own mapping of a file's table, which outlives the daemon's."""

    def __init__(self, table: SegmentTable) -> None:
        self.view = mmap.mmap(table.memfd, table.size)

    def state(self, segment: Segment) -> int:
        return _segments.state(self.view, segment.index)

    def pin(self, segment: Segment) -> bool:
        """Pin (never on a PURGING word here: that would wait for the daemon)."""
        assert self.state(segment) != SEGMENT_PURGING
        return _segments.pin(self.view, segment.index, os.getpid())


def segments_of(core: Core, inode: Inode, count: int, pages: int) -> tuple[Client, list[Segment]]:
    """A table for ``inode`` with ``count`` segments of ``pages`` pages, all unpinned."""
    volatility = core.namespace.volatility
    client = Client(volatility.segment_table(inode, 16))
    segments = [volatility.register(inode, i * pages * P, pages * P, 0) for i in range(count)]
    for segment in segments:
        _segments.unpin(client.view, segment.index)
    return client, segments


def test_a_claimed_segment_is_published_only_after_its_drop() -> None:
    async def test(core: Core) -> None:
        inode = open_file(core.namespace, b"f", range(8))
        client, (first, second) = segments_of(core, inode, 2, 4)
        core.cache.hold()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(core.reclaimer.purge, 4 * P, PurgeSource.IOCTL)
            await wait_until(core.cache.entered.is_set)
            # The oldest is claimed and its pages gone, but a pin would still wait.
            assert client.state(first) == SEGMENT_PURGING
            assert client.state(second) == SEGMENT_UNPINNED
            assert inode.contents is not None and inode.contents.pages == 4
            core.cache.release()
        await wait_until(lambda: client.state(first) == SEGMENT_PURGED)
        assert client.pin(first) is True
        assert client.pin(second) is False
        assert bytes(core.namespace.read(inode, 0, 4 * P)) == bytes(4 * P)  # told: zeros
        assert bytes(core.namespace.read(inode, 4 * P, P)) == page(4)

    run_core(test)


def test_a_failed_drop_still_publishes_so_no_pin_waits_for_ever() -> None:
    async def test(core: Core) -> None:
        inode = open_file(core.namespace, b"f", range(4))
        client, (segment,) = segments_of(core, inode, 1, 4)
        core.cache.failure = OSError("the kernel said no")
        await core.reclaimer.purge(0, PurgeSource.IOCTL, wait=True)
        assert client.state(segment) == SEGMENT_PURGED
        assert client.pin(segment) is True

    run_core(test)


def test_a_pinned_segment_is_never_claimed_and_the_last_close_ends_the_table() -> None:
    async def test(core: Core) -> None:
        ns = core.namespace
        inode = open_file(ns, b"f", range(8))
        client, (kept, gone) = segments_of(core, inode, 2, 4)
        assert client.pin(kept) is False
        result = await core.reclaimer.purge(0, PurgeSource.IOCTL, wait=True)
        assert result.freed_bytes == 4 * P
        assert client.state(kept) == SEGMENT_PINNED
        assert bytes(ns.read(inode, 0, 4 * P)) == b"".join(page(i) for i in range(4))
        ns.close(inode)  # the last close
        assert inode.segments is None
        assert client.state(kept) == SEGMENT_STALE
        del gone

    run_core(test)
