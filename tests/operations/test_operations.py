"""The FUSE adapter without a kernel: VolfsOperations' handlers called directly, over the core
wired as ``run_mount`` wires it, with a recorder for the page cache.

pyfuse3's handlers are awaited with a stand-in request context; the handlers the C bridge calls
(ioctl, fallocate, lseek) get a stand-in :class:`volfs.daemon.bridge.Request` that records its one
reply. Each test checks what the kernel would pass on to a program: bytes, errnos, replies.
"""

from __future__ import annotations

from volfs.daemon import fs  # ahead of anything importing pyfuse3: see volfs.daemon.bridge

# isort: split
import errno
import itertools
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, cast

import pyfuse3
import pytest
import trio
import trio.testing

from tests.operations.fakes import Core, PageCache, page, serving, wait_until
from volfs.abi import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    PAGE_SIZE,
    VOLFS_IOC_PURGE,
    VOLFS_IOC_VRANGE,
    VOLFS_IOC_VRANGE_NEXT,
    VOLFS_IOC_VRANGE_STATUS,
    VOLFS_PURGE,
    VRANGE_ARGS,
    VRANGE_NEXT,
    VRANGE_NONVOLATILE,
    VRANGE_STATUS,
    VRANGE_VOLATILE,
)
from volfs.core.namespace import ROOT_INODE
from volfs.core.ranges import RecordLimits
from volfs.core.reclaim import FORGET_WAIT
from volfs.core.store import FORGET_WAITERS
from volfs.core.volatility import VRANGE_STEP
from volfs.daemon import bridge, session, wire
from volfs.daemon.handover import TableHandover

P = PAGE_SIZE
PUNCH = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
CTX = cast(pyfuse3.RequestContext, SimpleNamespace(uid=0, gid=0, pid=1, umask=0o022))
Reply = tuple[Any, ...]


class FakeRequest:
    """A bridge request: records its one reply (a second one raises, as the real one does)."""

    def __init__(self, uid: int = 0, events: list[tuple[str, int]] | None = None) -> None:
        self.uid = uid
        self.gid = 0
        self.pid = 1
        self.replies: list[Reply] = []
        self._events = events

    @property
    def answered(self) -> bool:
        return bool(self.replies)

    def reply_ioctl(self, result: int, data: bytes) -> None:
        self._reply(("ioctl", result, bytes(data)))

    def reply_error(self, code: int) -> None:
        self._reply(("error", code))

    def reply_ok(self) -> None:
        self._reply(("ok",))

    def reply_lseek(self, offset: int) -> None:
        self._reply(("lseek", offset))

    def _reply(self, reply: Reply) -> None:
        if self.replies:
            raise RuntimeError("a request answered twice")
        self.replies.append(reply)
        if self._events is not None:
            self._events.append(("answered", id(self)))

    @property
    def request(self) -> bridge.Request:
        return cast(bridge.Request, self)

    async def reply(self) -> Reply:
        """The reply, once there is one."""
        await wait_until(lambda: self.answered)
        return self.replies[0]


def error(code: int) -> Reply:
    return ("error", code)


@dataclass
class Mount:
    """The adapter over a core, with the calls a kernel makes."""

    core: Core
    ops: fs.VolfsOperations
    events: list[tuple[str, int]] = field(default_factory=list)

    @property
    def cache(self) -> PageCache:
        return self.core.cache

    async def create(self, name: bytes, data: bytes = b"", flags: int = os.O_RDWR) -> int:
        """Create and open ``name``, write ``data``; return the handle (its inode: ino_of)."""
        info, _attributes = await self.ops.create(ROOT_INODE, name, 0o644, flags, CTX)
        if data:
            assert await self.ops.write(info.fh, 0, data) == len(data)
        return info.fh

    async def open(self, name: bytes, flags: int) -> int:
        info = await self.ops.open(self.ino(name), flags, CTX)
        return info.fh

    def ino(self, name: bytes) -> int:
        return self.core.namespace.root.entries[name].ino  # type: ignore[index]

    def ioctl(self, ino: int, cmd: int, fh: int, data: bytes, *, uid: int = 0) -> FakeRequest:
        request = FakeRequest(uid, self.events)
        self.ops.ioctls.answer(request.request, ino, cmd, fh, False, data)
        return request

    def vrange(
        self, name: bytes, fh: int, start: int, length: int, mode: int, flags: int = 0
    ) -> FakeRequest:
        data = VRANGE_ARGS.pack(start, length, mode, flags, 0, 0, 0)
        return self.ioctl(self.ino(name), VOLFS_IOC_VRANGE, fh, data)

    async def marked(self, request: FakeRequest) -> tuple[int, int]:
        """``(marked, purged)`` of a VRANGE request's answer."""
        kind, result, data = await request.reply()
        assert (kind, result) == ("ioctl", 0)
        _start, _length, _mode, _flags, marked, purged, _reserved = VRANGE_ARGS.unpack(data)
        return marked, purged

    async def status(
        self, name: bytes, fh: int, start: int = 0, length: int = 0
    ) -> tuple[int, int]:
        """``(volatile bytes, purged bytes)`` through VOLFS_IOC_VRANGE_STATUS."""
        data = VRANGE_STATUS.pack(start, length, 0, 0)
        request = self.ioctl(self.ino(name), VOLFS_IOC_VRANGE_STATUS, fh, data)
        kind, result, answer = await request.reply()
        assert (kind, result) == ("ioctl", 0)
        _start, _length, volatile, purged = VRANGE_STATUS.unpack(answer)
        return volatile, purged

    def purge(self, wanted: int = 0, *, uid: int = 0) -> FakeRequest:
        return self.ioctl(ROOT_INODE, VOLFS_IOC_PURGE, 0, VOLFS_PURGE.pack(wanted, 0), uid=uid)

    async def purged(self, request: FakeRequest) -> int:
        kind, result, data = await request.reply()
        assert (kind, result) == ("ioctl", 0)
        return int(VOLFS_PURGE.unpack(data)[1])

    async def read(self, fh: int, offset: int, size: int) -> bytes | int:
        """The bytes a read returns, or its errno."""
        try:
            return bytes(await self.ops.read(fh, offset, size))
        except pyfuse3.FUSEError as failure:
            return failure.errno

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        """The bytes a write wrote, or minus its errno."""
        try:
            return await self.ops.write(fh, offset, data)
        except pyfuse3.FUSEError as failure:
            return -failure.errno

    async def truncate(self, name: bytes, size: int) -> pyfuse3.EntryAttributes:
        attributes = pyfuse3.EntryAttributes()
        attributes.st_size = size
        return await self.ops.setattr(self.ino(name), attributes, SIZE_ONLY, None, CTX)

    def fallocate(self, fh: int, mode: int, offset: int, length: int) -> FakeRequest:
        request = FakeRequest()
        self.ops.fallocate(request.request, 0, fh, mode, offset, length)
        return request

    def lseek(self, name: bytes, fh: int, offset: int, whence: int) -> Reply:
        request = FakeRequest()
        self.ops.lseek(request.request, self.ino(name), fh, offset, whence)
        assert request.answered, "lseek is answered at once"
        return request.replies[0]


SIZE_ONLY = cast(
    pyfuse3.SetattrFields,
    SimpleNamespace(
        update_size=True,
        update_mode=False,
        update_uid=False,
        update_gid=False,
        update_atime=False,
        update_mtime=False,
    ),
)


def run(
    test: Callable[[Mount], Awaitable[None]],
    capacity_pages: int = 64,
    *,
    purged_reads_zero: bool = False,
    limits: RecordLimits | None = None,
) -> None:
    """Run ``test`` against fresh operations over ``capacity_pages`` in its own event loop."""

    async def main() -> None:
        async with serving(
            capacity_pages, purged_reads_zero=purged_reads_zero, limits=limits
        ) as core:
            ops = fs.VolfsOperations(
                core.namespace,
                core.reclaimer,
                nursery=core.nursery,
                discards=core.discards,
                handover=TableHandover(),
            )
            await test(Mount(core, ops))

    trio.run(main)


def pages(*tags: int) -> bytes:
    return b"".join(page(tag) for tag in tags)


# -- files ----------------------------------------------------------------------------------


def test_a_file_is_created_listed_written_read_truncated_and_freed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    listed: list[tuple[bytes, int, int]] = []

    def readdir_reply(
        token: pyfuse3.ReaddirToken, name: bytes, attributes: pyfuse3.EntryAttributes, next_id: int
    ) -> bool:
        listed.append((name, attributes.st_ino, next_id))
        return True

    monkeypatch.setattr(pyfuse3, "readdir_reply", readdir_reply)

    async def test(mount: Mount) -> None:
        ops = mount.ops
        data = pages(1, 2, 3) + b"tail"
        fh = await mount.create(b"file", data)
        assert await mount.read(fh, 0, len(data) + 100) == data
        assert await mount.read(fh, P + 10, 5) == page(2)[:5]
        attributes = await ops.lookup(ROOT_INODE, b"file", CTX)
        assert (attributes.st_size, attributes.st_blocks) == (len(data), 4 * P // 512)
        # A missing name is an entry of inode 0, which the kernel caches as absent.
        missing = await ops.lookup(ROOT_INODE, b"nothing", CTX)
        assert (missing.st_ino, missing.entry_timeout) == (0, fs.CACHE_TIMEOUT)

        directory = await ops.opendir(ROOT_INODE, CTX)
        await ops.readdir(directory, 0, cast(pyfuse3.ReaddirToken, None))
        await ops.releasedir(directory)
        assert [(name, ino) for name, ino, _next in listed] == [
            (b".", ROOT_INODE),
            (b"..", ROOT_INODE),
            (b"file", attributes.st_ino),
        ]

        truncated = await mount.truncate(b"file", P)
        assert truncated.st_size == P
        assert await mount.read(fh, 0, 3 * P) == page(1)
        assert (await ops.statfs(CTX)).f_bfree == 63
        await ops.unlink(ROOT_INODE, b"file", CTX)
        assert await mount.read(fh, 0, P) == page(1)  # open, though unlinked
        await ops.release(fh)
        # The kernel may still open what it looked up before the name went, as on tmpfs.
        assert (await ops.statfs(CTX)).f_bfree == 63
        await ops.forget([(attributes.st_ino, 3)])  # looked up by CREATE, LOOKUP and READDIR
        assert (await ops.statfs(CTX)).f_bfree == 64

    run(test)


def test_a_read_of_contiguous_pages_is_a_view_of_the_store_not_a_copy() -> None:
    """Zero-copy reads: the reply for pages held in one run is the store's memory itself."""

    async def test(mount: Mount) -> None:
        fh = await mount.create(b"f", pages(1, 2, 3, 4))
        reply = await mount.ops.read(fh, P, 2 * P)
        assert isinstance(reply, memoryview)
        assert bytes(reply) == pages(2, 3)
        # A later write shows through the reply already taken: the same memory, not a copy.
        assert await mount.ops.write(fh, P, page(9)) == P
        assert bytes(reply) == pages(9, 3)

    run(test)


# -- volatility ioctls ----------------------------------------------------------------------


def test_a_range_marked_through_the_ioctl_is_purged_then_reported_and_reads_zeros() -> None:
    async def test(mount: Mount) -> None:
        fh = await mount.create(b"f", pages(*range(8)))
        assert await mount.marked(mount.vrange(b"f", fh, 0, 4 * P, VRANGE_VOLATILE)) == (4 * P, 0)
        assert await mount.status(b"f", fh) == (4 * P, 0)

        assert await mount.purged(mount.purge()) == 4 * P
        assert await mount.status(b"f", fh) == (4 * P, 4 * P)
        assert await mount.read(fh, 0, P) == errno.EIO
        assert await mount.read(fh, 3 * P, 2 * P) == errno.EIO  # the whole read fails
        assert await mount.read(fh, 4 * P, 4 * P) == pages(4, 5, 6, 7)
        assert mount.cache.ranges == [(mount.ino(b"f"), 0, 4 * P)]

        # Told once, through the unmark: the purged pages read as zeros from then on.
        assert await mount.marked(mount.vrange(b"f", fh, 0, 8 * P, VRANGE_NONVOLATILE)) == (
            8 * P,
            1,
        )
        assert await mount.read(fh, 0, 8 * P) == bytes(4 * P) + pages(4, 5, 6, 7)
        assert await mount.status(b"f", fh) == (0, 0)
        assert await mount.marked(mount.vrange(b"f", fh, 0, 8 * P, VRANGE_NONVOLATILE)) == (
            8 * P,
            0,
        )

    run(test)


@pytest.mark.parametrize("mode", [VRANGE_VOLATILE, VRANGE_NONVOLATILE])
def test_a_read_only_handle_may_ask_but_not_change_volatility(mode: int) -> None:
    async def test(mount: Mount) -> None:
        writer = await mount.create(b"f", pages(1, 2))
        await mount.marked(mount.vrange(b"f", writer, 0, P, VRANGE_VOLATILE))
        reader = await mount.open(b"f", os.O_RDONLY)
        assert await mount.vrange(b"f", reader, 0, 2 * P, mode).reply() == error(errno.EBADF)
        assert await mount.status(b"f", reader) == (P, 0)
        assert await mount.vrange(b"f", 12345, 0, 2 * P, mode).reply() == error(errno.EBADF)

    run(test)


def test_ioctls_refused_with_the_errno_of_their_abi() -> None:
    async def test(mount: Mount) -> None:
        fh = await mount.create(b"f", pages(1, 2))
        await mount.marked(mount.vrange(b"f", fh, 0, 2 * P, VRANGE_VOLATILE))
        directory = await mount.ops.opendir(ROOT_INODE, CTX)
        args = VRANGE_ARGS.pack(0, P, VRANGE_VOLATILE, 0, 0, 0, 0)

        on_directory = FakeRequest()
        mount.ops.ioctls.answer(
            on_directory.request, ROOT_INODE, VOLFS_IOC_VRANGE, directory, True, args
        )
        assert await on_directory.reply() == error(errno.EISDIR)
        unknown = mount.ioctl(mount.ino(b"f"), 0xC0287699, fh, args)
        assert await unknown.reply() == error(errno.ENOTTY)
        reserved = VRANGE_ARGS.pack(0, P, VRANGE_VOLATILE, 0, 0, 0, 1)
        assert await mount.ioctl(mount.ino(b"f"), VOLFS_IOC_VRANGE, fh, reserved).reply() == error(
            errno.EINVAL
        )
        past_end = mount.vrange(b"f", fh, 0, 3 * P, VRANGE_VOLATILE)
        assert await past_end.reply() == error(errno.EINVAL)
        assert await mount.purge(uid=12345).reply() == error(errno.EPERM)
        # Refused means nothing changed.
        assert await mount.status(b"f", fh) == (2 * P, 0)
        assert await mount.read(fh, 0, 2 * P) == pages(1, 2)

    run(test)


def test_a_volatility_ioctl_waits_for_a_truncation_in_steps() -> None:
    ranges = 3 * VRANGE_STEP + 17

    async def test(mount: Mount) -> None:
        ns = mount.core.namespace
        fh = await mount.create(b"f")
        await mount.truncate(b"f", 2 * ranges * P)
        inode = ns.get(mount.ino(b"f"))
        for index in range(ranges, 2 * ranges):
            ns.volatility.vrange(inode, index * P, P, VRANGE_VOLATILE, 0)

        async def truncate() -> None:
            await mount.truncate(b"f", ranges * P)
            mount.events.append(("truncated", 0))

        mount.core.nursery.start_soon(truncate)
        await wait_until(lambda: inode.size == ranges * P)
        # The new size holds, and the ranges past it are still going, a step at a time.
        assert ns.volatility.next_range(inode, ranges * P) is not None
        following = mount.ioctl(
            inode.ino, VOLFS_IOC_VRANGE_NEXT, fh, VRANGE_NEXT.pack(ranges * P, 0, 0, 0, 0)
        )
        mark = mount.vrange(b"f", fh, 0, ranges * P, VRANGE_VOLATILE)

        async def write() -> None:
            # Past the new end: it would land in a range about to go.
            assert ns.volatility.next_range(inode, ranges * P) is not None
            assert await mount.write(fh, (2 * ranges - 1) * P, page(7)) == P
            mount.events.append(("written", 0))

        mount.core.nursery.start_soon(write)
        assert not following.answered and not mark.answered

        _kind, _result, answer = await following.reply()
        assert VRANGE_NEXT.unpack(answer) == (ranges * P, 0, 0, 0, 0)
        assert await mount.marked(mark) == (ranges * P, 0)
        await wait_until(lambda: ("written", 0) in mount.events)
        assert mount.events[0] == ("truncated", 0)
        # What was written past the end after the truncation is not volatile: no purge takes it.
        await mount.purged(mount.purge())
        assert await mount.read(fh, (2 * ranges - 1) * P, P) == page(7)

    run(test, capacity_pages=4 * ranges)


def test_a_volatility_ioctl_is_answered_once_purged_pages_left_the_cache() -> None:
    async def test(mount: Mount) -> None:
        fh = await mount.create(b"f", pages(*range(8)))
        await mount.marked(mount.vrange(b"f", fh, 0, 8 * P, VRANGE_VOLATILE))
        mount.cache.hold()
        purge = mount.purge()
        await wait_until(mount.cache.entered.is_set)
        # Purged already, the pages still in the kernel's cache.
        assert await mount.read(fh, 0, P) == errno.EIO
        unmark = mount.vrange(b"f", fh, 0, 8 * P, VRANGE_NONVOLATILE)
        status = mount.ioctl(mount.ino(b"f"), VOLFS_IOC_VRANGE_STATUS, fh, bytes(32))
        await trio.testing.wait_all_tasks_blocked()
        assert not (purge.answered or unmark.answered or status.answered)

        mount.events.clear()
        mount.cache.events = mount.events
        mount.cache.release()
        assert await mount.marked(unmark) == (8 * P, 1)
        assert await mount.purged(purge) == 8 * P
        await status.reply()
        assert [what for what, _detail in mount.events] == ["dropped", *["answered"] * 3]
        assert mount.cache.ranges == [(mount.ino(b"f"), 0, 8 * P)]

    run(test)


def test_the_ranges_of_a_closed_file_go_in_the_background() -> None:
    ranges = 450

    async def test(mount: Mount) -> None:
        for name in (b"one", b"two"):
            fh = await mount.create(name, bytes(ranges * P))
            for index in range(ranges):
                await mount.marked(mount.vrange(name, fh, index * P, P, VRANGE_VOLATILE))
            # Both files' ranges together would pass the mount's bound: the first file's
            # must have gone with its last close.
            await mount.ops.release(fh)
            await trio.testing.wait_all_tasks_blocked()
        assert mount.core.namespace.statistics().ranges == 0

    run(test, capacity_pages=2 * ranges, limits=RecordLimits(per_inode=500, per_mount=500))


# -- size cap -------------------------------------------------------------------------------


def test_a_write_over_the_cap_purges_volatile_data_then_fails_with_enospc() -> None:
    async def test(mount: Mount) -> None:
        cache = await mount.create(b"cache", pages(*range(48)))
        for first in range(0, 48, 8):
            await mount.marked(mount.vrange(b"cache", cache, first * P, 8 * P, VRANGE_VOLATILE))
        fh = await mount.create(b"new")
        assert await mount.write(fh, 0, pages(*range(100, 124))) == 24 * P
        assert await mount.read(fh, 0, 24 * P) == pages(*range(100, 124))
        # 16 pages were free: the oldest 8-page range went, and only it.
        assert await mount.status(b"cache", cache) == (48 * P, 8 * P)
        assert await mount.read(fh, 0, 24 * P) == pages(*range(100, 124))
        assert await mount.read(cache, 7 * P, P) == errno.EIO
        assert await mount.read(cache, 8 * P, 40 * P) == pages(*range(8, 48))

        assert await mount.write(fh, 24 * P, bytes(41 * P)) == -errno.ENOSPC
        assert await mount.write(fh, 24 * P, bytes(40 * P)) == 40 * P
        assert await mount.status(b"cache", cache) == (48 * P, 48 * P)
        assert await mount.write(fh, 64 * P, b"x") == -errno.ENOSPC
        assert mount.core.namespace.statistics().purges_size >= 2

    run(test)


def test_purged_reads_return_zeros_when_the_mount_says_so() -> None:
    async def test(mount: Mount) -> None:
        fh = await mount.create(b"f", pages(1, 2, 3))
        await mount.marked(mount.vrange(b"f", fh, P, P, VRANGE_VOLATILE))
        assert await mount.purged(mount.purge()) == P
        assert await mount.read(fh, 0, 3 * P) == page(1) + bytes(P) + page(3)
        assert await mount.status(b"f", fh) == (P, P)  # lost all the same

    run(test, purged_reads_zero=True)


def test_fallocate_over_the_cap_purges_volatile_data_then_fails_with_enospc() -> None:
    async def test(mount: Mount) -> None:
        cache = await mount.create(b"cache", pages(*range(48)))
        for first in range(0, 48, 8):
            await mount.marked(mount.vrange(b"cache", cache, first * P, 8 * P, VRANGE_VOLATILE))
        fh = await mount.create(b"new")
        assert await mount.fallocate(fh, 0, 0, 24 * P).reply() == ("ok",)
        attributes = await mount.ops.getattr(mount.ino(b"new"), CTX)
        assert (attributes.st_size, attributes.st_blocks) == (24 * P, 24 * P // 512)
        assert await mount.read(fh, 0, 24 * P) == bytes(24 * P)
        assert await mount.status(b"cache", cache) == (48 * P, 8 * P)
        assert await mount.fallocate(fh, 0, 0, 65 * P).reply() == error(errno.ENOSPC)
        assert await mount.fallocate(fh, 0, 24 * P, 41 * P).reply() == error(errno.ENOSPC)
        assert await mount.status(b"cache", cache) == (48 * P, 48 * P)
        assert (await mount.ops.getattr(mount.ino(b"new"), CTX)).st_size == 24 * P

    run(test)


def test_an_enospc_of_the_range_bounds_purges_nobody() -> None:
    """Only the cap's ENOSPC is worth a purge: one from a bound on range records is answered
    at once, and other files' volatile data stays."""

    async def test(mount: Mount) -> None:
        lost = await mount.create(b"lost", pages(*range(8)))
        await mount.marked(mount.vrange(b"lost", lost, 0, 8 * P, VRANGE_VOLATILE))
        assert await mount.purged(mount.purge()) == 8 * P
        cache = await mount.create(b"cache", pages(*range(8)))
        await mount.marked(mount.vrange(b"cache", cache, 0, 8 * P, VRANGE_VOLATILE))
        # A hole in the middle of the purged run would split it: a third record in the file.
        assert await mount.fallocate(lost, PUNCH, 3 * P, P).reply() == error(errno.ENOSPC)
        assert await mount.status(b"cache", cache) == (8 * P, 0)
        assert await mount.read(cache, 0, 8 * P) == pages(*range(8))

    run(test, limits=RecordLimits(per_inode=2, per_mount=100))


def test_lseek_finds_data_and_holes() -> None:
    async def test(mount: Mount) -> None:
        fh = await mount.create(b"f", page(1))
        assert await mount.write(fh, 3 * P, page(3)) == P
        await mount.truncate(b"f", 5 * P)
        assert mount.lseek(b"f", fh, P, os.SEEK_DATA) == ("lseek", 3 * P)
        assert mount.lseek(b"f", fh, 10, os.SEEK_DATA) == ("lseek", 10)
        assert mount.lseek(b"f", fh, 0, os.SEEK_HOLE) == ("lseek", P)
        assert mount.lseek(b"f", fh, 3 * P, os.SEEK_HOLE) == ("lseek", 4 * P)
        assert mount.lseek(b"f", fh, 4 * P, os.SEEK_DATA) == error(errno.ENXIO)
        assert mount.lseek(b"f", fh, 5 * P, os.SEEK_HOLE) == error(errno.ENXIO)
        assert mount.lseek(b"f", fh, 0, os.SEEK_END) == error(errno.EINVAL)

    run(test)


# -- a bug fails its request only -----------------------------------------------------------


async def _call(mount: Mount, handler: str, fh: int) -> object:
    """Call one handler on file ``f`` (handle ``fh``); what the caller would see."""
    ops, ino = mount.ops, mount.ino(b"f")
    try:
        if handler == "read":
            return bytes(await ops.read(fh, 0, P))
        if handler == "write":
            return await ops.write(fh, P, b"more")
        if handler == "lookup":
            return (await ops.lookup(ROOT_INODE, b"f", CTX)).st_ino
        if handler == "setattr":
            return (await mount.truncate(b"f", P)).st_size
    except pyfuse3.FUSEError as failure:
        return error(failure.errno)
    if handler == "ioctl":
        return await mount.ioctl(ino, VOLFS_IOC_VRANGE_STATUS, fh, bytes(32)).reply()
    if handler == "fallocate":
        return await mount.fallocate(fh, 0, 0, P).reply()
    assert handler == "lseek"
    return mount.lseek(b"f", fh, 0, os.SEEK_DATA)


@pytest.mark.parametrize(
    ("handler", "method", "works"),
    [
        ("read", "read", page(1)),
        ("write", "write", 4),
        ("lookup", "lookup", 2),
        ("setattr", "setattr_steps", P),
        ("ioctl", "volatility.status", ("ioctl", 0, VRANGE_STATUS.pack(0, 0, 0, 0))),
        ("fallocate", "fallocate", ("ok",)),
        ("lseek", "seek", ("lseek", 0)),
    ],
)
def test_a_bug_answers_eio_for_its_request_only(
    handler: str,
    method: str,
    works: object,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def test(mount: Mount) -> None:
        fh = await mount.create(b"f", page(1))
        owner: object = mount.core.namespace
        *path, name = method.split(".")
        for part in path:
            owner = getattr(owner, part)
        original = getattr(owner, name)

        def bug(*args: object, **kwargs: object) -> object:
            raise RuntimeError("a bug")

        monkeypatch.setattr(owner, name, bug)
        assert await _call(mount, handler, fh) == error(errno.EIO)
        monkeypatch.setattr(owner, name, original)
        assert await _call(mount, handler, fh) == works
        assert await mount.read(fh, 0, 4) == page(1)[:4]

    with caplog.at_level(logging.ERROR):
        run(test)
    logged = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(logged) == 1
    assert "answering EIO" in logged[0].getMessage()
    assert logged[0].exc_info is not None
    assert str(logged[0].exc_info[1]) == "a bug"


# -- requests answered at once (the bridge passes them undecoded) ----------------------------


def _stat_of(attr: tuple[int, ...]) -> tuple[int, ...]:
    """A decoded ``struct fuse_attr`` as stat(2) would show it, times in nanoseconds."""
    ino, size, blocks, atime, mtime, ctime, atime_ns, mtime_ns, ctime_ns, *rest = attr
    mode, nlink, uid, gid, rdev, blksize, flags = rest
    assert (
        flags == 0
        and min(atime_ns, mtime_ns, ctime_ns) >= 0
        and max(atime_ns, mtime_ns, ctime_ns) < 10**9
    )
    times = (atime * 10**9 + atime_ns, mtime * 10**9 + mtime_ns, ctime * 10**9 + ctime_ns)
    return (ino, size, blocks, *times, mode, nlink, uid, gid, rdev, blksize)


def _stat_from(attributes: pyfuse3.EntryAttributes) -> tuple[int, ...]:
    """The same of pyfuse3's attributes."""
    a = attributes
    return (
        a.st_ino, a.st_size, a.st_blocks, a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns,
        a.st_mode, a.st_nlink, a.st_uid, a.st_gid, a.st_rdev, a.st_blksize,
    )  # fmt: skip


def _create_at_once(
    ops: fs.VolfsOperations, name: bytes, uid: int, gid: int
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """CREATE ``name`` (0640) in the root as the bridge would; the decoded entry and open."""
    argument = wire.CREATE_IN.pack(os.O_RDWR, 0o100640, 0o022, 0) + name + b"\0"
    reply = ops.answer_at_once(wire.FUSE_CREATE, ROOT_INODE, uid, gid, argument)
    assert isinstance(reply, bytes)
    assert len(reply) == wire.ENTRY_OUT.size + wire.OPEN_OUT.size
    return wire.ENTRY_OUT.unpack_from(reply), wire.OPEN_OUT.unpack_from(reply, wire.ENTRY_OUT.size)


def test_requests_answered_at_once_reply_what_pyfuse3_would() -> None:
    seconds, nanoseconds = int(fs.CACHE_TIMEOUT), 0
    valid = (seconds, seconds, nanoseconds, nanoseconds)  # entry, then attributes

    async def test(mount: Mount) -> None:
        ops = mount.ops
        entry, (fh, open_flags, _backing) = _create_at_once(ops, b"made", 41001, 41002)
        assert open_flags == wire.FOPEN_KEEP_CACHE
        assert await ops.write(fh, 0, pages(1) + b"x") == P + 1
        # Times before 1970 too: seconds are signed, nanoseconds not.
        mount.core.namespace.get(entry[0]).mtime_ns = -1_500_000_000_123
        looked_up = await ops.lookup(ROOT_INODE, b"made", CTX)
        assert (looked_up.st_uid, looked_up.st_gid, looked_up.st_mode) == (41001, 41002, 0o100640)
        lookup = ops.answer_at_once(wire.FUSE_LOOKUP, ROOT_INODE, 0, 0, b"made\0")
        assert isinstance(lookup, bytes)
        decoded = wire.ENTRY_OUT.unpack(lookup)
        assert decoded[:6] == (looked_up.st_ino, 0, *valid)
        assert _stat_of(decoded[6:]) == _stat_from(looked_up)
        assert decoded[6 + 4] == -1501  # mtime's seconds: before 1970, rounded down
        getattr_reply = ops.answer_at_once(wire.FUSE_GETATTR, entry[0], 0, 0, bytes(16))
        assert isinstance(getattr_reply, bytes)
        attributes = await ops.getattr(entry[0], CTX)
        decoded = wire.ATTR_OUT.unpack(getattr_reply)
        assert decoded[:3] == (seconds, nanoseconds, 0)
        assert _stat_of(decoded[3:]) == _stat_from(attributes)
        absent = ops.answer_at_once(wire.FUSE_LOOKUP, ROOT_INODE, 0, 0, b"absent\0")
        assert isinstance(absent, bytes)
        assert wire.ENTRY_OUT.unpack(absent)[:6] == (0, 0, *valid)
        # Requests it does not answer go to pyfuse3.
        assert ops.answer_at_once(16, entry[0], 0, 0, b"") is None

    run(test)


def test_files_opened_released_and_forgotten_at_once_live_as_through_pyfuse3() -> None:
    async def test(mount: Mount) -> None:
        ops = mount.ops
        entry, (fh, _open_flags, _backing) = _create_at_once(ops, b"made", 0, 0)
        assert await ops.write(fh, 0, pages(1) + b"x") == P + 1
        # An open that must truncate goes through pyfuse3, having done nothing.
        truncating = wire.OPEN_IN.pack(os.O_WRONLY | os.O_TRUNC, 0)
        assert ops.answer_at_once(wire.FUSE_OPEN, entry[0], 0, 0, truncating) is None
        assert (await ops.getattr(entry[0], CTX)).st_size == P + 1
        reader = ops.answer_at_once(wire.FUSE_OPEN, entry[0], 0, 0, wire.OPEN_IN.pack(0, 0))
        assert isinstance(reader, bytes)
        (reader_fh, _flags, _backing) = wire.OPEN_OUT.unpack(reader)
        assert await mount.read(reader_fh, 0, 2) == page(1)[:2]
        assert ops.answer_at_once(wire.FUSE_UNLINK, ROOT_INODE, 0, 0, b"made\0") == b""
        assert ops.answer_at_once(wire.FUSE_UNLINK, ROOT_INODE, 0, 0, b"made\0") == errno.ENOENT
        release = wire.RELEASE_IN.pack(fh, 0, 0, 0)
        assert ops.answer_at_once(wire.FUSE_RELEASE, entry[0], 0, 0, release) == b""
        assert await mount.read(reader_fh, 0, 2) == page(1)[:2]  # open, though unlinked
        release = wire.RELEASE_IN.pack(reader_fh, 0, 0, 0)
        assert ops.answer_at_once(wire.FUSE_RELEASE, entry[0], 0, 0, release) == b""
        # Looked up by CREATE: the kernel may open it until it forgets it.
        assert (await ops.statfs(CTX)).f_bfree == 62
        forget = wire.BATCH_FORGET_IN.pack(1, 0) + wire.FORGET_ONE.pack(entry[0], 1)
        assert ops.answer_at_once(wire.FUSE_BATCH_FORGET, 0, 0, 0, forget) == b""
        with pytest.raises(OSError) as gone:
            mount.core.namespace.get(entry[0])
        assert gone.value.errno == errno.ENOENT
        assert (await ops.statfs(CTX)).f_bfree == 64

    run(test)


def test_a_large_batch_of_forgets_is_taken_a_slice_a_turn() -> None:
    """Forgets of many removed files, sent together, free them all, without holding the
    event loop for the whole batch: the request returns at once and the forget task takes
    a slice a turn."""
    count = 8 * fs.FORGET_SLICE + 5

    async def test(mount: Mount) -> None:
        ops, namespace, store = mount.ops, mount.core.namespace, mount.core.store
        removed = []
        for index in range(count):
            name = b"r%d" % index
            entry, (fh, _open_flags, _backing) = _create_at_once(ops, name, 0, 0)
            assert await ops.write(fh, 0, page(index)) == P
            release = wire.RELEASE_IN.pack(fh, 0, 0, 0)
            assert ops.answer_at_once(wire.FUSE_RELEASE, entry[0], 0, 0, release) == b""
            assert ops.answer_at_once(wire.FUSE_UNLINK, ROOT_INODE, 0, 0, name + b"\0") == b""
            removed.append(entry[0])

        def known() -> int:
            """Removed files the namespace still holds."""
            held = 0
            for ino in removed:
                try:
                    namespace.get(ino)
                except OSError:
                    continue
                held += 1
            return held

        forgets = b"".join(wire.FORGET_ONE.pack(ino, 1) for ino in removed)
        batch = wire.BATCH_FORGET_IN.pack(count, 0) + forgets
        assert store.unforgotten_pages == count
        assert ops.answer_at_once(wire.FUSE_BATCH_FORGET, 0, 0, 0, batch) == b""
        assert store.forgets_queued == count
        remaining = [known()]
        with trio.fail_after(10):
            while remaining[-1]:
                await trio.sleep(0)
                remaining.append(known())
        assert remaining[0] == count, "the request itself took forgets"
        taken = [before - after for before, after in itertools.pairwise(remaining)]
        # Trio orders a turn's tasks at random: two turns of the forget task may fall between
        # two of this one.
        assert max(taken) <= 2 * fs.FORGET_SLICE and len(taken) >= 4, taken
        assert store.forgets_queued == 0 and store.unforgotten_pages == 0
        await store.wait_reclaimed()
        assert store.used_bytes == 0

    run(test, capacity_pages=count + 64)


def test_a_create_at_the_inode_limit_waits_for_a_removed_inode_to_be_forgotten() -> None:
    """A removed inode keeps its nr_inodes slot until the kernel forgets it, as on tmpfs: a
    create that finds the slots taken meanwhile waits for the FORGET the kernel sent
    before the unlink returned, and fails with ENOSPC only once FORGET_WAIT passed without
    one (an O_PATH descriptor may hold the inode for good)."""

    async def test(mount: Mount) -> None:
        ops, namespace = mount.ops, mount.core.namespace
        namespace.max_inodes = 3  # the root and two files
        opened = [_create_at_once(ops, name, 0, 0) for name in (b"first", b"second")]
        for entry, (fh, _open_flags, _backing) in opened:
            release = wire.RELEASE_IN.pack(fh, 0, 0, 0)
            assert ops.answer_at_once(wire.FUSE_RELEASE, entry[0], 0, 0, release) == b""
        first = opened[0][0]
        assert ops.answer_at_once(wire.FUSE_UNLINK, ROOT_INODE, 0, 0, b"first\0") == b""
        assert (await ops.statfs(CTX)).f_ffree == 0
        third = wire.CREATE_IN.pack(os.O_RDWR, 0o100640, 0o022, 0) + b"third\0"
        assert ops.answer_at_once(wire.FUSE_CREATE, ROOT_INODE, 0, 0, third) is None
        created: list[object] = []

        async def create(name: bytes) -> None:
            try:
                created.append(await ops.create(ROOT_INODE, name, 0o100640, os.O_RDWR, CTX))
            except pyfuse3.FUSEError as failure:
                created.append(failure.errno)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(create, b"third")
            await trio.testing.wait_all_tasks_blocked()
            assert created == []
            forget = wire.FORGET_IN.pack(1)
            assert ops.answer_at_once(wire.FUSE_FORGET, first[0], 0, 0, forget) == b""
        assert len(created) == 1 and not isinstance(created[0], int), created

        # Never forgotten: ENOSPC once the wait is over, and nothing created.
        assert ops.answer_at_once(wire.FUSE_UNLINK, ROOT_INODE, 0, 0, b"second\0") == b""
        started = trio.current_time()
        await create(b"fourth")
        assert created[1] == errno.ENOSPC
        assert trio.current_time() - started >= FORGET_WAIT
        assert ops.answer_at_once(wire.FUSE_LOOKUP, ROOT_INODE, 0, 0, b"fourth\0") == (
            fs._ABSENT_ENTRY
        )

    run(test)


def test_a_create_at_the_inode_limit_waits_for_the_release_of_a_removed_file() -> None:
    """The kernel sends the RELEASE of a last close in the background, where it may wait
    behind other requests: a create at the limit that comes first waits for it."""

    async def test(mount: Mount) -> None:
        ops, namespace = mount.ops, mount.core.namespace
        namespace.max_inodes = 2  # the root and one file
        entry, (fh, _open_flags, _backing) = _create_at_once(ops, b"first", 0, 0)
        assert ops.answer_at_once(wire.FUSE_UNLINK, ROOT_INODE, 0, 0, b"first\0") == b""
        created: list[object] = []

        async def create() -> None:
            created.append(await ops.create(ROOT_INODE, b"second", 0o100640, os.O_RDWR, CTX))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(create)
            await trio.testing.wait_all_tasks_blocked()
            assert created == []
            release = wire.RELEASE_IN.pack(fh, 0, 0, 0)
            assert ops.answer_at_once(wire.FUSE_RELEASE, entry[0], 0, 0, release) == b""
            forget = wire.FORGET_IN.pack(1)
            assert ops.answer_at_once(wire.FUSE_FORGET, entry[0], 0, 0, forget) == b""
        assert len(created) == 1

    run(test)


def test_a_create_at_the_inode_limit_waits_while_its_forget_is_queued() -> None:
    """A large batch of forgets is taken a slice a turn, however long that takes: a create
    whose slot a forget of the batch frees waits for it past FORGET_WAIT."""

    async def test(mount: Mount) -> None:
        ops, namespace, store = mount.ops, mount.core.namespace, mount.core.store
        namespace.max_inodes = 2
        entry, (fh, _open_flags, _backing) = _create_at_once(ops, b"gone", 0, 0)
        release = wire.RELEASE_IN.pack(fh, 0, 0, 0)
        assert ops.answer_at_once(wire.FUSE_RELEASE, entry[0], 0, 0, release) == b""
        assert ops.answer_at_once(wire.FUSE_UNLINK, ROOT_INODE, 0, 0, b"gone\0") == b""
        store.note_forgets_queued(2)  # queued in the daemon, that of gone second

        async def take_forgets() -> None:
            await trio.sleep(2 * FORGET_WAIT)
            store.note_forgets_queued(-1)  # another inode's
            await trio.sleep(FORGET_WAIT / 4)
            namespace.forget(entry[0], 1)
            store.note_forgets_queued(-1)

        mount.core.nursery.start_soon(take_forgets)
        started = trio.current_time()
        await ops.create(ROOT_INODE, b"new", 0o100640, os.O_RDWR, CTX)
        assert trio.current_time() - started >= 2 * FORGET_WAIT

    run(test)


def test_no_more_than_forget_waiters_requests_wait_for_forgets() -> None:
    """Each request waiting for a removed inode holds one of the request workers all users
    share: past FORGET_WAITERS of them, a create at the limit fails at once."""

    async def test(mount: Mount) -> None:
        ops, namespace = mount.ops, mount.core.namespace
        namespace.max_inodes = 2
        entry, (fh, _open_flags, _backing) = _create_at_once(ops, b"held", 0, 0)
        release = wire.RELEASE_IN.pack(fh, 0, 0, 0)
        assert ops.answer_at_once(wire.FUSE_RELEASE, entry[0], 0, 0, release) == b""
        assert ops.answer_at_once(wire.FUSE_UNLINK, ROOT_INODE, 0, 0, b"held\0") == b""
        failed: list[tuple[int, float]] = []

        async def create(name: bytes) -> None:
            started = trio.current_time()
            with pytest.raises(pyfuse3.FUSEError) as failure:
                await ops.create(ROOT_INODE, name, 0o100640, os.O_RDWR, CTX)
            failed.append((failure.value.errno, trio.current_time() - started))

        async with trio.open_nursery() as nursery:
            for index in range(FORGET_WAITERS):
                nursery.start_soon(create, b"waits-%d" % index)
            await trio.testing.wait_all_tasks_blocked()
            assert failed == []
            await create(b"one-too-many")
            assert failed[0][0] == errno.ENOSPC and failed[0][1] < FORGET_WAIT / 2
        assert len(failed) == FORGET_WAITERS + 1
        assert {code for code, _waited in failed} == {errno.ENOSPC}
        assert min(waited for _code, waited in failed[1:]) >= FORGET_WAIT

    run(test)


def test_a_malformed_request_answered_at_once_fails_alone(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def test(mount: Mount) -> None:
        ops = mount.ops
        assert ops.answer_at_once(wire.FUSE_CREATE, ROOT_INODE, 0, 0, b"\0\0") == errno.EIO
        assert ops.answer_at_once(
            wire.FUSE_RELEASE, 1, 0, 0, wire.RELEASE_IN.pack(99, 0, 0, 0)
        ) == (errno.EIO)
        created = wire.CREATE_IN.pack(os.O_RDWR, 0o100600, 0, 0) + b"f\0"
        assert isinstance(ops.answer_at_once(wire.FUSE_CREATE, ROOT_INODE, 0, 0, created), bytes)
        assert ops.answer_at_once(wire.FUSE_CREATE, ROOT_INODE, 0, 0, created) == errno.EEXIST

    with caplog.at_level(logging.ERROR):
        run(test)
    logged = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(logged) == 2 and all("answering EIO" in message for message in logged)


# -- the session ------------------------------------------------------------------------------


def test_a_stop_asked_for_before_the_mount_ends_serving_at_once() -> None:
    """A stop signal may come while mounting: it must neither reach libfuse without a session
    (a crash) nor be lost (a daemon serving on after SIGTERM)."""
    stopped = session.Session()
    stopped.stop()
    trio.run(stopped.serve)  # pyfuse3.main would fail here: nothing is mounted
    assert stopped.stopping and not stopped.mounted
