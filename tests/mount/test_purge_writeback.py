"""One purge frees volatile data also when its newest bytes sit dirty in the kernel's cache.

Dropping a purged range from the kernel's page cache makes the kernel write the range's dirty
mmap pages back to the daemon first. That write-back belongs to the purge and is discarded;
a write(2) after the purge still repopulates.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import Mount
from tests.mount.test_bridge import fuse_connections
from tests.mount.test_limits import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate
from volfs.client import VRANGE_VOLATILE, fvrange, purge, statistics, vrange_status
from volfs.ring import Consumer, Producer, RingTimeoutError

__all__ = ["fuse_connections"]  # the fixture, shared with test_bridge

PAGE = 4096
MiB = 1 << 20
#: Bytes dirtied through the mapping, then marked volatile and purged.
DIRTY = 8 * MiB
#: How much the daemon's memory may grow over a purge: allocator noise, far below DIRTY.
MEMORY_SLACK = MiB
#: What a ring keeps from volatility once its consumer caught up: the segment holding head.
RING_KEEPS = 64 * 1024


@pytest.fixture
def volfs(mount_volfs: Callable[..., Mount]) -> Mount:
    """A volfs that purges only when asked: a purge for the machine's memory pressure, with
    other work running, would take what these tests count."""
    return mount_volfs("pressure=off")


@pytest.fixture
def dirty_mapping(volfs: Mount) -> Iterator[tuple[int, mmap.mmap, bytes]]:
    """A file of DIRTY bytes and one page more, all written through MAP_SHARED only.

    The first DIRTY bytes are volatile; the last page is not. None of it has reached the
    daemon yet: the pages are dirty in the kernel's cache.
    """
    fd = os.open(volfs.path / "mapped", os.O_RDWR | os.O_CREAT)
    os.ftruncate(fd, DIRTY + PAGE)
    view = mmap.mmap(fd, DIRTY + PAGE, mmap.MAP_SHARED)
    data = os.urandom(DIRTY + PAGE)
    view[:] = data
    assert fvrange(fd, 0, DIRTY, VRANGE_VOLATILE) == (DIRTY, False)
    try:
        yield fd, view, data
    finally:
        view.close()
        os.close(fd)


def test_one_purge_frees_pages_dirtied_through_a_mapping(
    volfs: Mount, dirty_mapping: tuple[int, mmap.mmap, bytes]
) -> None:
    fd, _view, data = dirty_mapping
    assert statistics(volfs.path)["used_bytes"] == 0  # nothing written back yet
    held = volfs.memory_bytes()

    assert purge(volfs.path) == DIRTY  # the write-back the purge caused is counted, not kept
    assert statistics(volfs.path)["purged_bytes"] == DIRTY  # in the counters too
    assert purge(volfs.path) == 0  # nothing came back to purge again
    assert vrange_status(fd) == (DIRTY, DIRTY)
    with pytest.raises(OSError) as caught:
        os.pread(fd, PAGE, 0)
    assert caught.value.errno == errno.EIO
    assert volfs.memory_bytes() - held < MEMORY_SLACK
    assert statistics(volfs.path)["used_bytes"] == 0

    # The dirty page outside the range is written back and stored as always.
    os.fsync(fd)
    assert statistics(volfs.path)["used_bytes"] == PAGE
    assert os.pread(fd, PAGE, DIRTY) == data[DIRTY:]


def test_a_write_after_the_purge_still_repopulates(
    volfs: Mount, dirty_mapping: tuple[int, mmap.mmap, bytes]
) -> None:
    fd, _view, _data = dirty_mapping
    assert purge(volfs.path) == DIRTY
    os.fsync(fd)  # the dirty page outside the range: stored now, not in the figures below
    fresh = os.urandom(2 * PAGE)
    assert os.pwrite(fd, fresh, 4 * PAGE) == len(fresh)
    assert os.pread(fd, len(fresh), 4 * PAGE) == fresh
    assert vrange_status(fd) == (DIRTY, DIRTY - len(fresh))
    assert statistics(volfs.path)["used_bytes"] == PAGE + len(fresh)
    # The rewritten pages are volatile data again, and the next purge takes them.
    assert purge(volfs.path) == len(fresh)
    assert vrange_status(fd) == (DIRTY, DIRTY)


def test_an_idle_caught_up_ring_gives_its_memory_back_in_one_purge(volfs: Mount) -> None:
    ring = volfs.path / "ring"
    message = os.urandom(64 * 1024 - 8)
    count = 96  # 6 MiB of records in an 8 MiB ring: nothing waits for room
    consumed = count * (len(message) + 8)
    with Producer(ring, capacity=DIRTY) as producer, Consumer(ring) as consumer:
        for _ in range(count):
            producer.send(message)
        for _ in range(count):
            assert consumer.receive(timeout=10) == message
        with pytest.raises(RingTimeoutError):
            consumer.receive(timeout=0.1)  # idle, caught up: what it passed is volatile
        fd = os.open(ring, os.O_RDONLY)
        try:
            assert vrange_status(fd)[0] >= consumed - RING_KEEPS
            used = statistics(volfs.path)["used_bytes"]
            held = volfs.memory_bytes()

            assert purge(volfs.path) >= consumed - RING_KEEPS  # the messages, only in the cache
            assert purge(volfs.path) == 0
            assert statistics(volfs.path)["used_bytes"] <= used
            assert volfs.memory_bytes() - held < MEMORY_SLACK
        finally:
            os.close(fd)
        # The ring goes on: the producer takes purged pages back and writes them afresh.
        producer.send(message)
        assert consumer.receive(timeout=10) == message


def test_write_back_of_an_unpurged_file_is_stored(mnt: Path) -> None:
    path = mnt / "plain"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        os.ftruncate(fd, 4 * PAGE)
        with mmap.mmap(fd, 4 * PAGE, mmap.MAP_SHARED) as view:
            data = os.urandom(4 * PAGE)
            view[:] = data
            view.flush()
        assert statistics(mnt)["used_bytes"] == 4 * PAGE
        assert purge(mnt) == 0
    finally:
        os.close(fd)
    assert path.read_bytes() == data


@contextlib.contextmanager
def purged_in_a_batch(volfs: Mount, fd: int, pages: int, *, last: bool) -> Iterator[None]:
    """Mark the first ``pages`` pages of ``fd`` volatile and purge everything, in one batch
    of 1024 ranges whose cache drop writes back the dirty pages of 1023 others one at a
    time; run the body once all are purged, as the drop begins: with ``last``, while it is
    busy with the others before this range; else with this one, first."""
    if not last:
        fvrange(fd, 0, pages * PAGE, VRANGE_VOLATILE)
    others = os.open(volfs.path / "others", os.O_RDWR | os.O_CREAT)
    os.pwrite(others, b"y" * (1023 * 4 * PAGE), 0)  # held by the daemon: purged_bytes counts it
    others_view = mmap.mmap(others, 1023 * 4 * PAGE)
    others_view[:] = b"z" * (1023 * 4 * PAGE)
    for index in range(1023):
        fvrange(others, index * 4 * PAGE, 4 * PAGE, VRANGE_VOLATILE)
    if last:
        fvrange(fd, 0, pages * PAGE, VRANGE_VOLATILE)
    purged_all = statistics(volfs.path)["purged_bytes"] + 1023 * 4 * PAGE + pages * PAGE
    purging = threading.Thread(target=purge, args=(volfs.path,))
    purging.start()
    try:
        while statistics(volfs.path)["purged_bytes"] < purged_all:
            pass
        yield
    finally:
        purging.join()
        others_view.close()
        os.close(others)


@pytest.mark.parametrize("cut", ["truncate", "punch", "rewrite"])
def test_data_mapped_after_a_purged_range_became_data_again_outlives_its_drop(
    volfs: Mount, cut: str
) -> None:
    """A purged range truncated away, punched, or rewritten after the last close, before its
    pages leave the cache: what a mapping writes there afterwards is plain data, which the
    cache drop must store."""
    path = volfs.path / "cut"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    os.pwrite(fd, b"x" * PAGE, 0)
    view = None
    try:
        with purged_in_a_batch(volfs, fd, 1, last=True):
            if cut == "truncate":
                os.ftruncate(fd, 0)
                os.ftruncate(fd, PAGE)
            else:
                os.close(fd)  # the last close ends its volatility; its page stays lost
                fd = os.open(path, os.O_RDWR)
                if cut == "punch":
                    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, PAGE)
                else:
                    os.pwrite(fd, b"W" * PAGE, 0)
            view = mmap.mmap(fd, PAGE)
            view[:] = b"N" * PAGE  # dirty in the kernel's cache when the drop comes
        # Only now: closing the mapping's descriptor flushes its dirty pages.
        view.close()
        assert os.pread(fd, PAGE, 0) == b"N" * PAGE
        assert vrange_status(fd) == (0, 0)
    finally:
        if view is not None:
            view.close()
        os.close(fd)


def test_an_o_trunc_open_keeps_nothing_of_the_purged_pages_leaving_the_cache(
    volfs: Mount,
) -> None:
    """The pages dirty in the cache of a purged file truncated by an O_TRUNC open while they
    leave the cache: the file stays empty."""
    path = volfs.path / "reopened"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    os.pwrite(fd, b"x" * DIRTY, 0)
    view = mmap.mmap(fd, DIRTY)
    view[:] = b"z" * DIRTY  # dirty, written back page by page as the drop begins
    try:
        with purged_in_a_batch(volfs, fd, DIRTY // PAGE, last=False):
            truncated = os.open(path, os.O_RDWR | os.O_TRUNC)
    finally:
        view.close()
        os.close(fd)
    try:
        assert os.fstat(truncated).st_size == 0
        assert statistics(volfs.path)["used_bytes"] < MiB
    finally:
        os.close(truncated)


def test_o_trunc_opens_waiting_for_a_drop_leave_the_daemon_serving(
    volfs: Mount, fuse_connections: Path
) -> None:
    """More O_TRUNC opens of a file whose purged pages are leaving the cache than the daemon
    has request workers: all of them finish, the drop's write-back being served meanwhile."""
    # Found before anything can hang: a hung mount must be aborted without a new process,
    # whose closing of inherited descriptors would wait on the mount too.
    abort = fuse_connections / str(os.minor(os.stat(volfs.path).st_dev)) / "abort"
    assert abort.exists()
    path = volfs.path / "opened"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    os.pwrite(fd, b"x" * PAGE, 0)
    opened: list[int] = []

    def open_truncating() -> None:
        os.close(os.open(path, os.O_RDWR | os.O_TRUNC))
        opened.append(1)

    openers = [threading.Thread(target=open_truncating, daemon=True) for _ in range(120)]
    try:
        with purged_in_a_batch(volfs, fd, 1, last=False):
            for opener in openers:
                opener.start()
            deadline = time.monotonic() + 30
            for opener in openers:
                opener.join(max(deadline - time.monotonic(), 0))
            if len(opened) < len(openers):
                abort.write_text("1")  # or the purge would wait for ever
        assert len(opened) == len(openers)
    finally:
        os.close(fd)
